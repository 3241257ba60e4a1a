"""The switch's links to its issuers: one persistent TCP connection per issuer (specs/issuer.md).

Owns: the issuer dialect's codec (loaded once), host-to-host framing (2-byte big-endian length,
no header), the link's STAN counter and F7 stamp, matching replies to waiting requests by F11,
reconnecting forever with capped backoff, and reporting link state, per-request outcomes, late
replies and malformed frames to Metrics. Also ``InMemoryIssuerLink`` for pipeline unit tests.

It must not hold business rules (what to send, what a response code means, when to reverse) and
must never log a PAN, track, PIN block or key: log lines carry the issuer, MTI and STAN only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from datetime import datetime, timezone
from typing import Protocol

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.buffered import BufferedByteReceiveStream

from switch.core.codec import Codec, CodecError, Fields, load_dialect
from switch.ports import IssuerTimeout, IssuerUnavailable, Metrics

log = logging.getLogger(__name__)

LENGTH_PREFIX = 2
STAN_MAX = 999_999
CONNECT_TIMEOUT = 5.0
MAX_RECONNECT_DELAY = 5.0


@functools.cache
def issuer_codec() -> Codec:
    """The issuer host-to-host codec, ``load_dialect("issuer")`` loaded once per process."""
    return Codec(load_dialect("issuer"))


def max_frame(codec: Codec) -> int:
    return int(codec.dialect.framing.get("max_frame", 4096))


class FrameTooLarge(ValueError):
    """A length prefix announced more than ``max_frame`` bytes."""


def frame(body: bytes) -> bytes:
    """Prefix ``body`` with its 2-byte big-endian length."""
    if len(body) > 0xFFFF:
        raise FrameTooLarge(f"body of {len(body)} bytes cannot be framed")
    return len(body).to_bytes(LENGTH_PREFIX, "big") + body


async def receive_frame(reader: BufferedByteReceiveStream, limit: int) -> bytes:
    """Read one frame's body. Raises anyio.IncompleteRead at end of stream, FrameTooLarge."""
    size = int.from_bytes(await reader.receive_exactly(LENGTH_PREFIX), "big")
    if size > limit:
        raise FrameTooLarge(f"frame of {size} bytes exceeds {limit}")
    return await reader.receive_exactly(size)


class LinkFramer:
    """Host-to-host frames out of whatever chunks the socket delivers (several replies often
    arrive in one read): the link reads big chunks instead of two exact reads per frame."""

    __slots__ = ("_buf", "_limit")

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, chunk: bytes) -> list[bytes]:
        """The complete frame bodies in ``chunk`` plus what was buffered; FrameTooLarge when a
        length prefix announces more than the limit."""
        buf = self._buf
        buf += chunk
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while end - pos >= LENGTH_PREFIX:
            size = int.from_bytes(buf[pos : pos + LENGTH_PREFIX], "big")
            if size > self._limit:
                raise FrameTooLarge(f"frame of {size} bytes exceeds {self._limit}")
            stop = pos + LENGTH_PREFIX + size
            if stop > end:
                break
            out.append(bytes(buf[pos + LENGTH_PREFIX : stop]))
            pos = stop
        if pos:
            del buf[:pos]
        return out


_f7_cache: tuple[int, str] = (-1, "")


def transmission_datetime(now: datetime | None = None) -> str:
    """F7: MMDDhhmmss in UTC (formatted once per second when ``now`` is not given)."""
    global _f7_cache
    if now is not None:
        return now.astimezone(timezone.utc).strftime("%m%d%H%M%S")
    second = int(time.time())
    if _f7_cache[0] != second:
        _f7_cache = (second, datetime.fromtimestamp(second, timezone.utc).strftime("%m%d%H%M%S"))
    return _f7_cache[1]


def response_mti(mti: str) -> str:
    """Request MTI + 10 (0200 -> 0210); a repeat is answered like its first transmission
    (0401 -> 0410, 0221 -> 0230; specs/issuer.md)."""
    return mti[:2] + str(int(mti[2]) + 1) + ("0" if mti[3] == "1" else mti[3])


class _StanCounter:
    """1..999999, wrapping, skipping STANs still in flight."""

    def __init__(self) -> None:
        self._last = 0

    def next(self, in_flight: dict[str, _Waiter]) -> str:
        for _ in range(STAN_MAX):
            self._last = self._last % STAN_MAX + 1
            stan = f"{self._last:06d}"
            if stan not in in_flight:
                return stan
        raise IssuerUnavailable("no free STAN: 999999 requests in flight")


_QUEUED, _SENT = 0, 1


# what an issuer's reply repeats of its request (specs/issuer.md), compared before it is taken:
# the processing code, the amount, the transmission time and the RRN. Not F2: issuers may mask
# the card number in replies, and the other four already tell one request from another.
_ECHOED = (3, 4, 7, 37)


class _Waiter:
    """One request on the link: its frame, then its reply or error. ``done`` is an
    ``asyncio.Event`` (anyio's costs a backend lookup per request to create)."""

    __slots__ = ("request_mti", "frame", "echo", "state", "done", "reply", "error")

    def __init__(self, request_mti: str, frame: bytes = b"", echo: tuple[object, ...] = ()) -> None:
        self.request_mti = request_mti
        self.frame = frame
        self.echo = echo  # the request's values of _ECHOED (None where it had none)
        self.state = _QUEUED  # until the link's write takes the frame, then _SENT
        self.done = asyncio.Event()
        self.reply: tuple[str, Fields] | None = None
        self.error: Exception | None = None


def _stamp(fields: Fields, stans: _StanCounter, in_flight: dict[str, _Waiter]) -> str:
    """Set F11 (if absent) and F7 (if absent) in ``fields``; return the STAN."""
    stan = fields.get(11)
    if stan is None:
        stan = stans.next(in_flight)
        fields[11] = stan
    elif not isinstance(stan, str) or stan in in_flight:
        raise ValueError(f"F11 {stan!r} is not a free STAN on this link")
    fields.setdefault(7, transmission_datetime())
    return stan


class TcpIssuerLink:
    """``switch.ports.IssuerLink`` over one persistent TCP connection.

    Start ``run`` in the application's task group: it reports started at once (a dead issuer
    never blocks start-up), then connects, reads replies and reconnects forever. ``send`` may be
    called from many tasks at once; replies are matched by F11, in any order, and a reply is
    taken only if it repeats the F3, F4, F7 and F37 its request sent (specs/issuer.md).

    A connection that drops while requests are in flight fails them with IssuerTimeout: they were
    written, so their outcome at the issuer is unknown and the caller must treat them like a
    timeout (reverse the reversible ones).
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        metrics: Metrics,
        codec: Codec | None = None,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = MAX_RECONNECT_DELAY,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self._metrics = metrics
        self._codec = codec or issuer_codec()
        self._reconnect_delay = reconnect_delay
        self._max_reconnect_delay = max(max_reconnect_delay, reconnect_delay)
        self._link: _LinkProtocol | None = None
        self._outbox: list[_Waiter] = []  # frames waiting for the link's next write
        self._pending: dict[str, _Waiter] = {}
        self._stans = _StanCounter()
        self._up_event = anyio.Event()

    # ---- state ----------------------------------------------------------------------------
    @property
    def is_up(self) -> bool:
        return self._link is not None

    async def wait_up(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the link to be connected; return ``is_up``."""
        with anyio.move_on_after(timeout):
            while not self.is_up:  # bounded by the timeout scope
                await self._up_event.wait()
        return self.is_up

    # ---- connection loop ------------------------------------------------------------------
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, read, reconnect, until cancelled. Reports started before the first connect."""
        # the link's gauge exists from the start: an issuer that never answers a connect shows 0,
        # not a missing series (an alert on "== 0" would never fire for it)
        self._metrics.issuer_link_state(self.name, False)
        task_status.started()
        delay = self._reconnect_delay
        loop = asyncio.get_running_loop()
        while True:  # runs for the life of the application; cancelled by its task group
            proto = _LinkProtocol(self, loop)
            try:
                with anyio.fail_after(CONNECT_TIMEOUT):
                    await loop.create_connection(lambda: proto, self.host, self.port)
            except (OSError, TimeoutError) as exc:
                log.info("issuer %s: connect to %s:%s failed (%s), retry in %.2fs",
                         self.name, self.host, self.port, type(exc).__name__, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self._max_reconnect_delay)
                continue
            delay = self._reconnect_delay
            await self._serve(proto)
            await anyio.sleep(self._reconnect_delay)

    async def _serve(self, proto: _LinkProtocol) -> None:
        outbox: list[_Waiter] = []
        self._link, self._outbox = proto, outbox
        proto.outbox = outbox
        self._metrics.issuer_link_state(self.name, True)
        log.info("issuer %s: link up (%s:%s)", self.name, self.host, self.port)
        self._up_event.set()
        reason = "closed by issuer"
        try:
            reason = await proto.closed
        except anyio.get_cancelled_exc_class():
            reason = "shutdown"
            raise
        finally:
            proto.close()
            self._link = None
            self._up_event = anyio.Event()
            dropped = list(self._pending.values())
            for waiter in dropped:
                if not waiter.done.is_set():
                    # a frame still queued never left: the issuer cannot have applied it
                    waiter.error = (
                        IssuerUnavailable(f"{self.name}: link dropped before the request was sent")
                        if waiter.state == _QUEUED
                        else IssuerTimeout(f"{self.name}: link dropped with the request in flight")
                    )
                    waiter.done.set()
            outbox.clear()
            self._metrics.issuer_link_state(self.name, False)
            log.log(logging.INFO if reason == "shutdown" else logging.WARNING,
                    "issuer %s: link down (%s), %d request(s) in flight failed",
                    self.name, reason, len(dropped))

    def _on_frame(self, body: bytes) -> None:
        try:
            mti, fields = self._codec.decode(body)
        except CodecError as exc:
            self._metrics.malformed_frame("issuer")
            log.warning("issuer %s: undecodable reply (%s), dropped", self.name, exc)
            return
        stan = fields.get(11)
        waiter = self._pending.get(stan) if isinstance(stan, str) else None
        if waiter is None or waiter.done.is_set():
            self._metrics.issuer_late_reply(self.name)
            log.warning("issuer %s: late or unknown reply %s STAN %s, dropped", self.name, mti, stan)
            return
        if mti != response_mti(waiter.request_mti):
            self._metrics.malformed_frame("issuer")
            log.warning("issuer %s: reply %s to request %s STAN %s, dropped",
                        self.name, mti, waiter.request_mti, stan)
            return
        for key, sent in zip(_ECHOED, waiter.echo):
            got = fields.get(key)
            if sent is not None and got is not None and got != sent:
                # not this request's answer (an approval of another amount, another request's
                # reply on a reused STAN): never taken; the request waits for its own reply and,
                # without one, times out like any unanswered request (reversed if reversible)
                self._metrics.malformed_frame("issuer")
                log.warning("issuer %s: reply %s STAN %s repeats another F%d than its request sent, dropped",
                            self.name, mti, stan, key)
                return
        waiter.reply = (mti, fields)
        waiter.done.set()

    # ---- requests -------------------------------------------------------------------------
    def stamp(self, fields: Fields) -> None:
        """Assign F11 and F7 now (before sending), so the caller can record how to reverse the
        request before it leaves (write-ahead, crash safety)."""
        _stamp(fields, self._stans, self._pending)

    async def send(self, mti: str, fields: Fields, timeout: float) -> tuple[str, Fields]:
        """See ``switch.ports.IssuerLink.send``. F11/F7 are written into ``fields``."""
        started = time.perf_counter()
        outcome = "error"
        try:
            reply = await self._send(mti, fields, timeout)
            outcome = "answered"
            return reply
        except IssuerUnavailable:
            outcome = "unavailable"
            raise
        except IssuerTimeout:
            outcome = "timeout"
            raise
        finally:
            self._metrics.issuer_request(self.name, outcome, time.perf_counter() - started)

    async def _send(self, mti: str, fields: Fields, timeout: float) -> tuple[str, Fields]:
        link = self._link
        if link is None:
            raise IssuerUnavailable(f"{self.name}: link down")
        stan = _stamp(fields, self._stans, self._pending)
        waiter = _Waiter(mti, frame(self._codec.encode(mti, fields)), tuple(map(fields.get, _ECHOED)))
        self._pending[stan] = waiter
        self._metrics.issuer_pending(self.name, len(self._pending))
        outbox = self._outbox
        outbox.append(waiter)
        link.schedule_flush()
        try:
            # the timeout as a timer on the loop that wakes the waiter (cheaper than a cancel
            # scope per request); a wake-up with neither reply nor error is the timeout
            timer = asyncio.get_running_loop().call_later(timeout, waiter.done.set)
            try:
                await waiter.done.wait()
            finally:
                timer.cancel()
            if waiter.reply is not None:
                return waiter.reply
            if waiter.error is not None:
                raise waiter.error
            if waiter.state == _QUEUED:  # the writer never got to it (the issuer is not reading)
                if waiter in outbox:
                    outbox.remove(waiter)
                raise IssuerUnavailable(f"{self.name}: could not write within {timeout}s")
            log.warning("issuer %s: no reply to %s STAN %s within %.2fs", self.name, mti, stan, timeout)
            raise IssuerTimeout(f"{self.name}: no reply within {timeout}s")
        finally:
            if self._pending.get(stan) is waiter:
                del self._pending[stan]
            self._metrics.issuer_pending(self.name, len(self._pending))


class _LinkProtocol(asyncio.Protocol):
    """One connection of a ``TcpIssuerLink``: replies are matched in ``data_received``; frames
    queued by ``send`` go out together in one write per loop iteration (one system call and one
    wake-up of the issuer for many requests under load), none while the issuer is not reading
    (they stay queued and fail as never sent). Cheaper than a reader task and a writer task on
    anyio streams: no task switch, cancel scope or ``epoll_ctl`` pair per read or write."""

    def __init__(self, link: TcpIssuerLink, loop: asyncio.AbstractEventLoop) -> None:
        self.link = link
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.framer = LinkFramer(max_frame(link._codec))
        self.outbox: list[_Waiter] = []
        self.flush_scheduled = False
        self.writable = True
        self.closed: asyncio.Future[str] = loop.create_future()  # why the connection ended

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            bodies = self.framer.feed(data)
        except FrameTooLarge as exc:
            self.link._metrics.malformed_frame("issuer")
            self._end(str(exc))
            return
        on_frame = self.link._on_frame
        for body in bodies:
            on_frame(body)

    def eof_received(self) -> bool:
        self._end("closed by issuer")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(type(exc).__name__ if exc is not None else "closed by issuer")

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        self.schedule_flush()

    def schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        outbox = self.outbox
        transport = self.transport
        if not outbox or not self.writable or transport is None or self.closed.done():
            return
        batch = outbox[:]
        outbox.clear()
        for waiter in batch:
            waiter.state = _SENT  # from here on its outcome at the issuer is unknown
        try:
            transport.write(b"".join(w.frame for w in batch))
        except (RuntimeError, OSError) as exc:
            log.warning("issuer %s: write failed (%s)", self.link.name, type(exc).__name__)
            self._end(type(exc).__name__)  # the requests fail as timeouts

    def _end(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class MessageHandler(Protocol):
    """What ``InMemoryIssuerLink`` wraps: a mock issuer's pure handler (None = no answer)."""

    def handle(self, mti: str, fields: Fields) -> tuple[str, Fields] | None: ...


class InMemoryIssuerLink:
    """An IssuerLink that calls a mock issuer's handler directly (pipeline unit tests).

    Messages still go through the issuer codec both ways, so a field the dialect cannot carry
    fails here as it would on the wire. A handler that does not answer gives IssuerTimeout at
    once (no waiting); ``up = False`` gives IssuerUnavailable.
    """

    def __init__(self, name: str, handler: MessageHandler, codec: Codec | None = None) -> None:
        self.name = name
        self.up = True
        self._handler = handler
        self._codec = codec or issuer_codec()
        self._stans = _StanCounter()
        self.sent: list[tuple[str, Fields]] = []

    @property
    def is_up(self) -> bool:
        return self.up

    async def wait_up(self, timeout: float) -> bool:
        return self.up

    def stamp(self, fields: Fields) -> None:
        _stamp(fields, self._stans, {})

    async def send(self, mti: str, fields: Fields, timeout: float) -> tuple[str, Fields]:
        if not self.up:
            raise IssuerUnavailable(f"{self.name}: link down")
        _stamp(fields, self._stans, {})
        req_mti, req_fields = self._codec.decode(self._codec.encode(mti, fields))
        self.sent.append((req_mti, dict(req_fields)))
        await anyio.lowlevel.checkpoint()
        reply = self._handler.handle(req_mti, req_fields)
        if reply is None:
            raise IssuerTimeout(f"{self.name}: no reply")
        return self._codec.decode(self._codec.encode(*reply))
