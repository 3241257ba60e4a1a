"""TerminalServer over real TCP on 127.0.0.1 (protocol §1): persistent connections, frames split
byte by byte, concurrent frames answered as soon as each is ready, closes (handler says close,
LEN above max_frame, idle timeout, stall mid-frame) counted by reason, and graceful shutdown.

The handler is a fake (Frame -> bytes | None) that answers ``R`` + the request body, closes on
``CLOSE``, and holds frames whose body starts with ``HOLD`` until the test opens their gate, so
every ordering is decided by the test, not by timing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
import pytest

from switch.adapters.terminal_server import ServerSettings, TerminalServer
from switch.core.framing import Frame, FrameReader, encode_frame

pytestmark = pytest.mark.anyio

TPDU = bytes.fromhex("6000030000")
HEADER = bytes.fromhex("603100000000")
LIMIT = 10.0  # every test body is bounded by this


def frame(body: bytes) -> bytes:
    return encode_frame(TPDU, HEADER, body)


# ---- fakes ---------------------------------------------------------------------------------------
@dataclass
class RecordingMetrics:
    """Counts connections and closes; ``changed`` is replaced on every update so tests can wait."""

    opened: int = 0
    closed: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    @property
    def connections_open(self) -> int:
        return self.opened - len(self.closed)

    def _bump(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_closed(self, n: int) -> list[str]:
        """Wait until ``n`` closes were counted (bounded by the caller's fail_after)."""
        while len(self.closed) < n:
            await self.changed.wait()
        return self.closed

    def request_completed(self, transaction: str, response_code: str, seconds: float) -> None:
        pass

    def issuer_request(self, issuer: str, outcome: str, seconds: float) -> None:
        pass

    def issuer_link_state(self, issuer: str, up: bool) -> None:
        pass

    def issuer_late_reply(self, issuer: str) -> None:
        pass

    def connection_opened(self) -> None:
        self.opened += 1
        self._bump()

    def connection_closed(self, reason: str) -> None:
        self.closed.append(reason)
        self._bump()

    def malformed_frame(self, reason: str) -> None:
        self.malformed.append(reason)
        self._bump()

    def mac_failure(self) -> None:
        pass

    def journal_commit(self, batch_size: int, seconds: float) -> None:
        pass

    def store_write_failed(self) -> None:
        pass

    def in_flight(self, delta: int) -> None:
        pass


class FakeHandler:
    """Answers ``R`` + body; ``CLOSE`` -> None; ``BOOM`` raises; ``HOLD...`` waits for ``gate(body)``."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.done: list[bytes] = []
        self._gates: dict[bytes, anyio.Event] = {}
        self._entered: dict[bytes, anyio.Event] = {}

    def gate(self, body: bytes) -> anyio.Event:
        return self._gates.setdefault(body, anyio.Event())

    def entered(self, body: bytes) -> anyio.Event:
        return self._entered.setdefault(body, anyio.Event())

    async def __call__(self, f: Frame) -> bytes | None:
        self.calls.append(f.body)
        self.entered(f.body).set()
        if f.body == b"CLOSE":
            return None
        if f.body == b"BOOM":
            raise RuntimeError("handler failed")
        if f.body.startswith(b"HOLD"):
            await self.gate(f.body).wait()
        self.done.append(f.body)
        return encode_frame(f.tpdu, f.header, b"R" + f.body)


@dataclass
class Running:
    server: TerminalServer
    port: int
    handler: FakeHandler
    metrics: RecordingMetrics
    returned: anyio.Event


@asynccontextmanager
async def running_server(
    *, idle: float = 0.3, read: float = 0.3, max_frame: int = 2048, drain: float = 5.0
) -> AsyncIterator[Running]:
    """A TerminalServer on a free port; shut down (and awaited) on exit."""
    handler = FakeHandler()
    metrics = RecordingMetrics()
    settings = ServerSettings("127.0.0.1", 0, idle_timeout=idle, read_timeout=read, max_frame=max_frame,
                              drain_timeout=drain)
    server = TerminalServer(settings, handler, metrics)
    returned = anyio.Event()

    async def serve(*, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        await server.serve(task_status=task_status)
        returned.set()

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve)
            yield Running(server, port, handler, metrics, returned)
            server.shutdown()


class Client:
    """A raw TCP client that reads whole frames."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.reader = FrameReader(0xFFFF)

    async def read(self) -> Frame | None:
        """The next frame, or None at EOF / reset."""
        while (got := self.reader.next_frame()) is None:
            try:
                self.reader.receive_data(await self.stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                return None
        return got

    async def read_eof(self) -> bool:
        """True when the server closes without sending anything more."""
        return await self.read() is None and not self.reader.mid_frame


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[Client]:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        yield Client(stream)


# ---- tests ---------------------------------------------------------------------------------------
async def test_persistent_connection_answers_many_frames() -> None:
    async with running_server(idle=5.0) as srv, connect(srv.port) as c:
        for i in range(50):
            body = f"ECHO{i:03d}".encode()
            await c.stream.send(frame(body))
            got = await c.read()
            assert got is not None
            assert (got.tpdu, got.header, got.body) == (TPDU, HEADER, b"R" + body)
        # pipelined: 20 frames in one write, 20 answers
        bodies = [f"PIPE{i:03d}".encode() for i in range(20)]
        await c.stream.send(b"".join(frame(b) for b in bodies))
        answers = []
        for _ in bodies:
            got = await c.read()
            assert got is not None
            answers.append(got.body)
        assert sorted(answers) == sorted(b"R" + b for b in bodies)
        assert srv.metrics.opened == 1 and srv.metrics.closed == []


async def test_one_shot_connections() -> None:
    async with running_server() as srv:
        for i in range(5):
            async with connect(srv.port) as c:
                await c.stream.send(frame(b"ONE%d" % i))
                got = await c.read()
                assert got is not None and got.body == b"RONE%d" % i
        closed = await srv.metrics.wait_closed(5)
        assert closed == ["peer"] * 5
        assert srv.metrics.opened == 5 and srv.metrics.connections_open == 0


async def test_frames_split_byte_by_byte() -> None:
    async with running_server(idle=5.0, read=5.0) as srv, connect(srv.port) as c:
        data = frame(b"SPLIT-ONE") + frame(b"SPLIT-TWO")
        for i in range(len(data)):
            await c.stream.send(data[i : i + 1])
        first, second = await c.read(), await c.read()
        assert first is not None and second is not None
        assert sorted([first.body, second.body]) == [b"RSPLIT-ONE", b"RSPLIT-TWO"]
        assert srv.handler.calls == [b"SPLIT-ONE", b"SPLIT-TWO"]


async def test_concurrent_frames_are_answered_as_soon_as_each_is_ready() -> None:
    async with running_server(idle=5.0) as srv, connect(srv.port) as c:
        h = srv.handler
        await c.stream.send(frame(b"HOLD-1") + frame(b"HOLD-2") + frame(b"HOLD-3"))
        for body in (b"HOLD-1", b"HOLD-2", b"HOLD-3"):
            await h.entered(body).wait()  # all three are being handled at once
        h.gate(b"HOLD-3").set()
        got = await c.read()
        assert got is not None and got.body == b"RHOLD-3"  # while 1 and 2 are still held
        # a new frame on the same connection overtakes the held ones too
        await c.stream.send(frame(b"QUICK"))
        got = await c.read()
        assert got is not None and got.body == b"RQUICK"
        h.gate(b"HOLD-1").set()
        got = await c.read()
        assert got is not None and got.body == b"RHOLD-1"
        h.gate(b"HOLD-2").set()
        got = await c.read()
        assert got is not None and got.body == b"RHOLD-2"
        assert h.done == [b"HOLD-3", b"QUICK", b"HOLD-1", b"HOLD-2"]


async def test_handler_returning_none_closes_the_connection() -> None:
    async with running_server(idle=5.0) as srv:
        async with connect(srv.port) as c:
            await c.stream.send(frame(b"BEFORE"))
            got = await c.read()
            assert got is not None and got.body == b"RBEFORE"
            await c.stream.send(frame(b"CLOSE"))
            assert await c.read_eof()
        assert srv.metrics.closed == ["protocol"]
        assert srv.metrics.connections_open == 0
        # the server itself goes on
        async with connect(srv.port) as c:
            await c.stream.send(frame(b"AFTER"))
            got = await c.read()
            assert got is not None and got.body == b"RAFTER"


async def test_close_waits_for_the_other_frames_in_flight() -> None:
    async with running_server(idle=5.0) as srv, connect(srv.port) as c:
        await c.stream.send(frame(b"HOLD-A"))
        await srv.handler.entered(b"HOLD-A").wait()
        await c.stream.send(frame(b"CLOSE"))
        await srv.handler.entered(b"CLOSE").wait()
        srv.handler.gate(b"HOLD-A").set()
        got = await c.read()
        assert got is not None and got.body == b"RHOLD-A"
        assert await c.read_eof()
        assert await srv.metrics.wait_closed(1) == ["protocol"]


async def test_len_above_max_frame_closes_at_once_without_reading_the_body() -> None:
    # long timeouts: only the LEN check can close this connection within the test's limit
    async with running_server(idle=30.0, read=30.0, max_frame=100) as srv, connect(srv.port) as c:
        await c.stream.send((101).to_bytes(2, "big"))  # LEN only: the body never comes
        assert await c.read_eof()
        assert srv.metrics.closed == ["frame_too_large"]
        assert srv.metrics.malformed == ["frame_too_large"]
        assert srv.handler.calls == []


async def test_len_equal_to_max_frame_is_accepted() -> None:
    async with running_server(idle=5.0, max_frame=100) as srv, connect(srv.port) as c:
        body = b"B" * (100 - 11)
        await c.stream.send(frame(body))
        got = await c.read()
        assert got is not None and got.body == b"R" + body


async def test_idle_connection_is_closed() -> None:
    async with running_server(idle=0.3, read=30.0) as srv:
        async with connect(srv.port) as c:
            assert await c.read_eof()
        assert srv.metrics.closed == ["idle_timeout"]
        async with connect(srv.port) as c:  # idle again after a request was answered
            await c.stream.send(frame(b"ONCE"))
            got = await c.read()
            assert got is not None and got.body == b"RONCE"
            assert await c.read_eof()
        assert await srv.metrics.wait_closed(2) == ["idle_timeout", "idle_timeout"]


async def test_connection_stalled_mid_frame_is_closed_after_read_timeout() -> None:
    # idle is long: only the read timeout can close it within the test's limit
    async with running_server(idle=30.0, read=0.3) as srv, connect(srv.port) as c:
        data = frame(b"NEVER-FINISHED")
        await c.stream.send(data[:9])
        assert await c.read_eof()
        assert srv.metrics.closed == ["read_timeout"]
        assert srv.handler.calls == []


async def test_stall_with_only_part_of_len_is_a_read_timeout() -> None:
    async with running_server(idle=30.0, read=0.3) as srv, connect(srv.port) as c:
        await c.stream.send(b"\x00")
        assert await c.read_eof()
        assert srv.metrics.closed == ["read_timeout"]


async def test_connections_open_returns_to_zero() -> None:
    async with running_server(idle=0.3, read=0.3, max_frame=100) as srv:
        m = srv.metrics
        async with connect(srv.port) as a, connect(srv.port) as b, connect(srv.port) as c:
            await a.stream.send(frame(b"X"))
            got = await a.read()
            assert got is not None
            await b.stream.send(frame(b"CLOSE"))
            assert await b.read_eof()
            await c.stream.send(b"\xff\xff")
            assert await c.read_eof()
            assert m.opened == 3
        async with connect(srv.port) as d:
            await d.stream.send(b"\x00\x20\x60")  # stalls mid-frame
            assert await d.read_eof()
        async with connect(srv.port) as e:
            assert await e.read_eof()  # idle
        closed = await m.wait_closed(5)
        assert sorted(closed) == sorted(["peer", "protocol", "frame_too_large", "read_timeout", "idle_timeout"])
        assert m.opened == 5 and m.connections_open == 0


async def test_many_connections_at_once() -> None:
    async with running_server(idle=5.0) as srv:
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            async with connect(srv.port) as c:
                await c.stream.send(frame(b"C%02d" % i))
                got = await c.read()
                assert got is not None
                results[i] = got.body

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
        assert results == {i: b"RC%02d" % i for i in range(20)}
        await srv.metrics.wait_closed(20)
        assert srv.metrics.connections_open == 0


async def test_shutdown_stops_accepting_and_drains_in_flight_requests() -> None:
    async with running_server(idle=30.0, read=30.0) as srv:
        h, m = srv.handler, srv.metrics
        async with connect(srv.port) as c, connect(srv.port) as idle_peer:
            await c.stream.send(frame(b"HOLD-X") + frame(b"HOLD-Y"))
            await h.entered(b"HOLD-X").wait()
            await h.entered(b"HOLD-Y").wait()
            srv.server.shutdown()

            # no new connection is served: refused, or accepted and closed unanswered
            try:
                late = await anyio.connect_tcp("127.0.0.1", srv.port)
            except OSError:
                pass
            else:
                async with late:
                    late_client = Client(late)
                    try:
                        await late.send(frame(b"LATE"))
                    except (anyio.BrokenResourceError, ConnectionError):
                        pass
                    assert await late_client.read_eof()
            assert b"LATE" not in h.calls

            # the in-flight requests finish and are answered before the close
            assert not srv.returned.is_set()
            h.gate(b"HOLD-Y").set()
            got = await c.read()
            assert got is not None and got.body == b"RHOLD-Y"
            h.gate(b"HOLD-X").set()
            got = await c.read()
            assert got is not None and got.body == b"RHOLD-X"
            assert await c.read_eof()
            assert await idle_peer.read_eof()  # an idle connection is closed too
            await srv.returned.wait()  # serve() returns once drained
        # c and idle_peer; the late connection too if it was accepted before the listener closed
        assert set(m.closed) == {"shutdown"} and len(m.closed) in (2, 3)
        assert m.connections_open == 0


async def test_shutdown_with_no_connections_returns_promptly() -> None:
    async with running_server() as srv:
        srv.server.shutdown()
        await srv.returned.wait()
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", srv.port)


async def test_a_failing_handler_call_does_not_take_down_other_connections() -> None:
    async with running_server(idle=5.0) as srv, connect(srv.port) as other:
        await other.stream.send(frame(b"HOLD-OTHER"))
        await srv.handler.entered(b"HOLD-OTHER").wait()
        async with connect(srv.port) as c:
            await c.stream.send(frame(b"BOOM"))
            await srv.handler.entered(b"BOOM").wait()
            srv.handler.gate(b"HOLD-OTHER").set()
            got = await other.read()
            assert got is not None and got.body == b"RHOLD-OTHER"
        async with connect(srv.port) as fresh:
            await fresh.stream.send(frame(b"AFTER-BOOM"))
            got = await fresh.read()
            assert got is not None and got.body == b"RAFTER-BOOM"


async def fill_the_slots(srv: Running, c: Client, limit: int) -> list[bytes]:
    """Send limit + 8 held frames in one write; returns their bodies once the first ``limit``
    are being handled (the rest wait for a free in-flight slot)."""
    bodies = [b"HOLD-%02d" % i for i in range(limit + 8)]
    await c.stream.send(b"".join(frame(b) for b in bodies))
    for body in bodies[:limit]:
        await srv.handler.entered(body).wait()
    return bodies


async def test_frames_beyond_the_in_flight_limit_wait_for_a_free_slot() -> None:
    # 40 frames in one write; at most max_in_flight_per_connection (32) are handled at once, the
    # rest wait unread until answers free slots, then all 40 are answered
    async with running_server(idle=5.0) as srv, connect(srv.port) as c:
        h = srv.handler
        limit = srv.server.settings.max_in_flight_per_connection
        bodies = await fill_the_slots(srv, c, limit)
        for _ in range(20):  # give the server every chance to take more than the limit
            await anyio.sleep(0.01)
        assert h.calls == bodies[:limit]
        h.gate(bodies[0]).set()
        got = await c.read()
        assert got is not None and got.body == b"R" + bodies[0]
        await h.entered(bodies[limit]).wait()  # the freed slot took the next frame
        assert len(h.calls) == limit + 1
        for body in bodies:
            h.gate(body).set()
        answers = {got.body}
        for _ in bodies[1:]:
            got = await c.read()
            assert got is not None
            answers.add(got.body)
        assert answers == {b"R" + b for b in bodies}
        assert srv.metrics.closed == []


async def test_whole_frames_waiting_for_a_slot_are_not_a_stalled_read() -> None:
    # §1: only a frame stalled mid-way is closed after read_timeout; complete frames that wait
    # because the in-flight slots are full (reading paused by the server) are not a stall
    async with running_server(idle=5.0, read=0.3) as srv, connect(srv.port) as c:
        h = srv.handler
        limit = srv.server.settings.max_in_flight_per_connection
        bodies = await fill_the_slots(srv, c, limit)
        await anyio.sleep(0.8)  # well past read_timeout with 8 whole frames buffered
        assert srv.metrics.closed == []
        for body in bodies:
            h.gate(body).set()
        answers = set()
        for _ in bodies:
            got = await c.read()
            assert got is not None
            answers.add(got.body)
        assert answers == {b"R" + b for b in bodies}
        assert srv.metrics.closed == []
