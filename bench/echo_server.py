"""The bench baselines: servers that speak the terminal framing but hold no business logic.

- ``codec`` (the codec-echo baseline): per frame, decode the body with the terminal dialect
  (``switch.core.codec``), encode a response (request MTI + 10, the §6.1 echo fields the request
  carried, 39 = ``00``) and send it with the request's TPDU and header. This is the floor every
  switch figure is divided by: same framing, same codec, same generator, no pipeline.
- ``plain``: per frame, send the frame's bytes back unchanged (the loopback + event-loop floor).

Both are an ``asyncio.Protocol`` on uvloop, one process, one thread.

    python -m bench.echo_server --mode codec|plain [--host 127.0.0.1] [--port 0]

prints ``echo ready: port N`` once listening and runs until SIGTERM or SIGINT.

Must not: check MACs, keys, terminals or anything else the switch checks (it would stop being
a baseline), log message contents.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import cast

from switch.core.codec import Codec, CodecError, Fields, load_dialect
from switch.core.framing import DEFAULT_MAX_FRAME, ENVELOPE_LEN, LEN_BYTES

# §6.1: fields every financial response echoes when its request carried them.
ECHO_FIELDS = (2, 3, 4, 11, 25, 41, 42, 49, 60)


def codec_echo_body(codec: Codec, body: bytes) -> bytes | None:
    """The response body for one request body, or None when it does not decode."""
    try:
        mti, fields = codec.decode(body)
    except CodecError:
        return None
    out: Fields = {k: fields[k] for k in ECHO_FIELDS if k in fields}
    out[39] = "00"
    return codec.encode(f"{int(mti) + 10:04d}", out)


class EchoProtocol(asyncio.Protocol):
    """One connection: split LEN-prefixed frames, answer each one."""

    def __init__(self, codec: Codec | None) -> None:
        self._codec = codec
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        while len(buf) >= LEN_BYTES:
            length = int.from_bytes(buf[:LEN_BYTES], "big")
            if length > DEFAULT_MAX_FRAME or length < ENVELOPE_LEN:
                assert self._transport is not None
                self._transport.close()
                return
            end = LEN_BYTES + length
            if len(buf) < end:
                break
            frame = bytes(buf[:end])
            del buf[:end]
            if self._codec is None:
                out.append(frame)
                continue
            body = codec_echo_body(self._codec, frame[LEN_BYTES + ENVELOPE_LEN :])
            if body is None:
                continue
            envelope = frame[LEN_BYTES : LEN_BYTES + ENVELOPE_LEN]
            out.append((ENVELOPE_LEN + len(body)).to_bytes(LEN_BYTES, "big") + envelope + body)
        if out and self._transport is not None:
            self._transport.write(b"".join(out))


async def serve(mode: str, host: str, port: int) -> None:
    codec = Codec(load_dialect("terminal")) if mode == "codec" else None
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: EchoProtocol(codec), host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"echo ready: port {bound}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("codec", "plain"), required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)
    try:
        import uvloop

        uvloop.run(serve(a.mode, a.host, a.port))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(a.mode, a.host, a.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
