"""A tiny fake switch for the terminal client tests: a real anyio TCP server on 127.0.0.1 (port 0)
that frames with ``switch.core.framing`` and lets each test script its side of the conversation
(canned golden frames, reordering, closing without an answer)."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream

from switch.core.codec import Codec, Fields, load_dialect
from switch.core.framing import Frame, FrameReader, encode_frame
from switch.crypto.mac import cup_mac
from switch.crypto.working_keys import WorkingKeys, build_f62

VECTORS_PATH = Path(__file__).resolve().parents[3] / "shared" / "vectors.json"
CODEC = Codec(load_dialect("terminal"))


def load_vectors() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in json.loads(VECTORS_PATH.read_text())["vectors"]}


class FakeConn:
    """The switch's side of one accepted connection."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.reader = FrameReader(0xFFFF)

    async def recv(self) -> Frame | None:
        """The next whole frame, or None at EOF."""
        while True:  # ends at a frame or EOF
            frame = self.reader.next_frame()
            if frame is not None:
                return frame
            try:
                data = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return None
            self.reader.receive_data(data)

    async def send(self, frame: bytes) -> None:
        await self.stream.send(frame)


Handler = Callable[[FakeConn], Awaitable[None]]


class FakeSwitch:
    """Records every frame the handlers saw (``frames``) and how many connections came in."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.connections = 0

    @asynccontextmanager
    async def serve(self, handler: Handler) -> AsyncIterator[int]:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(SocketAttribute.local_port)

        async def one(stream: SocketStream) -> None:
            self.connections += 1
            async with stream:
                await handler(FakeConn(stream))

        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, one)
            try:
                yield port
            finally:
                tg.cancel_scope.cancel()

    def responder(self, respond: Callable[[Frame], bytes | None]) -> Handler:
        """A handler answering each frame with ``respond(frame)``; None closes without answering."""

        async def handler(conn: FakeConn) -> None:
            while (frame := await conn.recv()) is not None:  # ends at EOF
                self.frames.append(frame)
                out = respond(frame)
                if out is None:
                    return
                await conn.send(out)

        return handler

    def standard(self, frame: Frame) -> bytes:
        """Plausible answers built from the golden vectors: sign-on (keys = the vector's clear
        keys under terminal 10000001's TMK), 0820, 0800/360, consume / balance approvals with a
        valid MAC under the vector MAK, 0410."""
        mti, req = decode(frame)
        v = load_vectors()
        signon = v["sign_on_response_004"]
        keys = WorkingKeys(bytes.fromhex(signon["clear_pik"]), bytes.fromhex(signon["clear_mak"]),
                           bytes.fromhex(signon["clear_tdk"]))
        echo = {k: req[k] for k in (2, 3, 4, 11, 25, 41, 42, 49, 60) if k in req}
        f60 = str(req.get(60, ""))
        out: Fields
        if mti == "0800" and f60[8:11] in ("001", "003", "004"):
            mode = f60[8:11]
            if mode != "004":
                keys = WorkingKeys(keys.pik[:8] if mode == "001" else keys.pik, keys.mak)
            out = {**echo, 12: "101530", 13: "1126", 32: "48521000", 37: "112610153001", 39: "00",
                   62: build_f62(bytes.fromhex(signon["tmk"]), mode, keys)}
            return reply(frame, CODEC.encode("0810", dict(sorted(out.items()))))
        if mti == "0800" and f60[8:11] == "360":
            tlv = b"".join(tag + b"%03d" % len(val) + val for tag, val in (
                (b"01", "老王便利店".encode("gbk")), (b"02", b"10000001"), (b"06", b"0.60")))
            out = {**echo, 39: "00", 62: tlv}
            return reply(frame, CODEC.encode("0810", dict(sorted(out.items()))))
        if mti == "0820":
            out = {**echo, 12: "101530", 13: "1126", 39: "00"}
            return reply(frame, CODEC.encode("0830", dict(sorted(out.items()))))
        # financial: the approved consume vector with this request's echoes and a fresh MAC
        base = v["balance_response" if req.get(3) == "310000" else "consume_response_approved"]
        _, fields = CODEC.decode(bytes.fromhex(base["frame_hex"])[13:])
        fields.pop(4, None)
        fields.update(echo)
        fields[64] = bytes(8)
        body = CODEC.encode(f"{int(mti) + 10:04d}", dict(sorted(fields.items())))
        body = body[:-8] + cup_mac(keys.mak, body[:-8])
        return reply(frame, body)

    # helpers for the tests (conftest modules are not imported by name)
    codec = CODEC

    @staticmethod
    def reply(request: Frame, body: bytes) -> bytes:
        return reply(request, body)

    @staticmethod
    def reencode(vector_hex: str, **changes: str | bytes) -> bytes:
        return reencode(vector_hex, **changes)

    @staticmethod
    def decode(frame: Frame) -> tuple[str, Fields]:
        return decode(frame)


def reply(request: Frame, body: bytes) -> bytes:
    """A response frame echoing the request's TPDU and header."""
    return encode_frame(request.tpdu, request.header, body)


def reencode(vector_hex: str, **changes: str | bytes) -> bytes:
    """The body of a vector frame with some fields replaced (``f11="000007"``)."""
    raw = bytes.fromhex(vector_hex)
    mti, fields = CODEC.decode(raw[13:])
    for name, value in changes.items():
        fields[int(name[1:])] = value
    return CODEC.encode(mti, dict(sorted(fields.items())))


def decode(frame: Frame) -> tuple[str, Fields]:
    return CODEC.decode(frame.body)


@pytest.fixture
def fake_switch() -> FakeSwitch:
    return FakeSwitch()


@pytest.fixture
def vectors() -> dict[str, dict[str, Any]]:
    return load_vectors()


@pytest.fixture(autouse=True)
def _pos_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's simulator starts from trace number 1 (its state file lives in tmp_path)."""
    monkeypatch.setenv("SWITCH_POS_STATE", str(tmp_path / "pos-state"))
