"""The terminal-facing TCP server (protocol §1): moves bytes between sockets and the sans-IO
framer, hands each frame to the transaction manager, writes responses as soon as they are
ready (several in flight per connection, answered in any order).

Timeouts: a connection with no partial frame is closed after ``idle_timeout``; one stalled
mid-frame (no byte for ``read_timeout``) is closed, and so is a frame still incomplete after
``max(idle_timeout, read_timeout)`` however it trickles in (a slowloris holds a connection no
longer than an idle terminal does); a LEN above ``max_frame`` closes at once; a peer that reads
none of its answers for ``read_timeout`` while they fill the transport's buffer is aborted
(``write_timeout``: a terminal sends one request at a time and reads each answer, so only a
broken or hostile peer lets answers pile up, and it must not hold its slots and descriptor for
ever: handlers waiting to write keep the idle timer from firing). Every close is
logged and counted by reason. Graceful shutdown: stop accepting, stop reading, let in-flight
requests finish and send their answers (bounded by ``drain_timeout``).

Each connection is an ``asyncio.Protocol`` (the switch runs anyio on asyncio, uvloop when
installed): bytes are framed in ``data_received`` and every frame's handler runs as a task of
its own, which writes its answer straight to the transport. A stream-based reader (anyio's
``SocketStream``) cost a task switch, a cancel scope and an ``epoll_ctl`` pair per read and a
checkpoint per write; on the 2-core bench machine those were a tenth of the switch's CPU per
request. Timeouts are loop timers, moved rather than re-created. The handlers run under the
server's ``serve``: cancelling it aborts the connections and cancels them.

Holds no business rules.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import anyio
import anyio.abc

from switch.core.framing import Frame, FrameReader, FramingError
from switch.ports import Metrics

log = logging.getLogger("switch.server")

Handler = Callable[[Frame], Awaitable[bytes | None]]


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 5000
    idle_timeout: float = 60.0
    read_timeout: float = 10.0
    max_frame: int = 2048
    max_in_flight_per_connection: int = 32
    drain_timeout: float = 10.0
    max_connections: int = 1000


class TerminalServer:
    def __init__(self, settings: ServerSettings, handler: Handler, metrics: Metrics) -> None:
        self.settings = settings
        self.handler = handler
        self.metrics = metrics
        self.port: int | None = None
        self.open_connections = 0
        self._connections: set[_Connection] = set()
        self._stopping = False
        self._stop: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve terminals until ``shutdown`` (then drain and return) or cancellation
        (then abort every connection and cancel its handlers)."""
        loop = asyncio.get_running_loop()
        self._stop, self._drained = asyncio.Event(), asyncio.Event()
        s = self.settings
        server = await loop.create_server(
            lambda: _Connection(self, loop), s.host, s.port, reuse_address=True, backlog=65535
        )
        try:
            self.port = int(server.sockets[0].getsockname()[1])
            task_status.started(self.port)
            log.info("terminal port listening on %s:%s", s.host, self.port)
            if not self._stopping:
                await self._stop.wait()
            server.close()  # stop accepting; the open connections drain (each bounded)
            for conn in list(self._connections):
                conn.stop_reading()
            if self._connections:
                await self._drained.wait()
        finally:
            server.close()
            tasks = [t for conn in list(self._connections) for t in conn.abort()]
            if tasks:  # cancelled: the handlers end here, not after us
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.drain_timeout):
                    await asyncio.gather(*tasks, return_exceptions=True)

    def shutdown(self) -> None:
        """Stop accepting and reading; in-flight requests finish and are answered."""
        self._stopping = True
        if self._stop is not None:
            self._stop.set()

    # ---- called by connections -----------------------------------------------------------
    def _opened(self, conn: _Connection) -> bool:
        self.metrics.connection_opened()
        if self.open_connections >= self.settings.max_connections or self._stopping:
            # over the limit (or shutting down): refused at once, counted, never read
            reason = "shutdown" if self._stopping else "max_connections"
            self.metrics.connection_closed(reason)
            if not self._stopping:
                log.warning("refusing a terminal connection: %d open", self.open_connections)
            return False
        self.open_connections += 1
        self._connections.add(conn)
        return True

    def _closed(self, conn: _Connection, reason: str) -> None:
        if reason != "peer":
            log.info("closing terminal connection: %s", reason)
        self.metrics.connection_closed(reason)
        self.open_connections -= 1
        self._connections.discard(conn)
        if not self._connections and self._stopping and self._drained is not None:
            self._drained.set()


class _Connection(asyncio.Protocol):
    """One terminal connection: frames in, a task per frame, answers out in any order."""

    def __init__(self, server: TerminalServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        s = server.settings
        self.settings = s
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(s.max_frame)
        self.tasks: set[asyncio.Task[None]] = set()
        self.reading = True  # False once no more frames are taken (close decided, EOF, shutdown)
        self.paused = False  # reading paused: max_in_flight_per_connection reached
        self.reason: str | None = None  # why the connection ends, once decided
        self.done = False
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.timer_at = 0.0
        self.frame_deadline = 0.0
        self.frame_started = 0.0
        self.drain_timer: asyncio.TimerHandle | None = None
        self.write_ready: asyncio.Future[None] | None = None  # set while the peer is not reading
        self.write_timer: asyncio.TimerHandle | None = None  # runs while write_ready is pending

    # ---- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        if not self.server._opened(self):
            self.done = True
            transport.close()
            return
        try:
            self.reader.peer = str(transport.get_extra_info("peername")[0])
        except Exception:
            self.reader.peer = ""
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if not self.reading or self.done:
            return
        reader = self.reader
        was_mid_frame = reader.mid_frame
        reader.receive_data(data)
        completed = self._dispatch()
        if self.reading and reader.mid_frame:
            self._frame_progress(new_frame=completed or not was_mid_frame)
        if self.reading:
            self._arm_idle()

    def eof_received(self) -> bool:
        self._finish("peer")
        return True  # keep the write side open: answers still due are sent

    def connection_lost(self, exc: Exception | None) -> None:
        if self.write_ready is not None and not self.write_ready.done():
            self.write_ready.set_result(None)
        # handlers still running finish (their answers have nowhere to go, their journal rows
        # are written); the connection is counted closed after them, as after an EOF
        self._finish("peer")

    def pause_writing(self) -> None:
        if self.write_ready is None or self.write_ready.done():
            self.write_ready = self.loop.create_future()
            if self.write_timer is None:
                self.write_timer = self.loop.call_later(self.settings.read_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        if self.write_ready is not None and not self.write_ready.done():
            self.write_ready.set_result(None)

    def _write_stalled(self) -> None:
        """The peer has read nothing for ``read_timeout`` while our answers filled the buffer:
        abort (the queued answers are dropped; their journal rows are written). Handlers waiting
        to write wake up to a closing transport; those still running finish and answer nobody."""
        self.write_timer = None
        transport = self.transport
        if self.done or transport is None or transport.is_closing():
            return
        log.warning("terminal connection from %s reads none of its answers: aborted", self.reader.peer or "?")
        self._finish("write_timeout", override=True)
        transport.abort()

    # ---- frames ----------------------------------------------------------------------------
    def _dispatch(self) -> bool:
        """Start a handler for every complete frame buffered while there is a free slot;
        returns whether any frame was taken."""
        reader = self.reader
        limit = self.settings.max_in_flight_per_connection
        completed = False
        try:
            while self.reading and len(self.tasks) < limit and (frame := reader.next_frame()) is not None:
                completed = True
                task = self.loop.create_task(self._respond(frame))
                self.tasks.add(task)
        except FramingError as exc:
            self.server.metrics.malformed_frame(exc.reason)
            self._finish(exc.reason)
            return completed
        if self.reading and len(self.tasks) >= limit and not self.paused:
            self.paused = True  # the rest waits in the socket until a slot frees
            assert self.transport is not None
            self.transport.pause_reading()
        return completed

    async def _respond(self, frame: Frame) -> None:
        try:
            data = await self.server.handler(frame)
            if data is None:  # §2/§12.1: bit 1, bad MTI, undecodable: closed and counted
                self._finish("protocol")
                return
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            if self.write_ready is not None and not self.write_ready.done():
                await self.write_ready  # the peer is not reading: hold this slot until it does
                if transport.is_closing():
                    return
            transport.write(data)
        except Exception:
            # never let one request take the server down: close this connection only
            log.exception("request handler failed; closing this connection")
            self._finish("internal_error", override=True)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self.tasks.discard(task)
            self._slot_freed()

    def _slot_freed(self) -> None:
        if self.done:
            return
        if not self.reading:
            if not self.tasks:
                self._close()
            return
        if self.paused and len(self.tasks) < self.settings.max_in_flight_per_connection:
            self.paused = False
            completed = self._dispatch()  # frames that arrived with the one that filled the slots
            if self.reading and not self.paused:
                assert self.transport is not None
                self.transport.resume_reading()
                if completed and self.reader.mid_frame:
                    self._frame_progress(new_frame=True)
                self._arm_idle()

    # ---- timeouts ------------------------------------------------------------------------
    def _frame_progress(self, *, new_frame: bool) -> None:
        """Bytes of an incomplete frame arrived: §1 closes a connection that *stalls* mid-frame
        for ``read_timeout``, so the read timeout runs from the last byte; a frame that started
        more than ``max(idle_timeout, read_timeout)`` ago is closed however it trickles in."""
        s = self.settings
        now = self.loop.time()
        if new_frame:
            self.frame_started = now
        self.frame_deadline = min(now + s.read_timeout, self.frame_started + max(s.idle_timeout, s.read_timeout))

    def _arm_idle(self) -> None:
        """Move the connection's one timer to its next deadline (idle or read timeout)."""
        s = self.settings
        if self.reader.mid_frame:
            deadline = self.frame_deadline
        elif s.idle_timeout > 0:
            deadline = self.loop.time() + s.idle_timeout
        else:
            return
        self.deadline = deadline
        if self.timer is not None and deadline < self.timer_at:  # earlier: a read timeout began
            self.timer.cancel()
            self.timer = None
        if self.timer is None:  # a later deadline keeps the timer: it re-arms when it fires
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if not self.reading or self.done:
            return
        now = self.loop.time()
        if now < self.deadline:  # moved since it was set: sleep on
            self.timer_at = self.deadline
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        if self.reader.mid_frame:
            self._finish("read_timeout")
        elif not self.tasks:  # not idle while answers are still due
            self._finish("idle_timeout")
        else:
            self._arm_idle()

    # ---- closing ---------------------------------------------------------------------------
    def stop_reading(self) -> None:
        """Shutdown: no more frames; close once the in-flight ones are answered."""
        self._finish("shutdown")

    def _finish(self, reason: str, *, override: bool = False) -> None:
        """Take no more frames; close now or when the last handler is done (bounded by
        ``drain_timeout``). The first reason given wins, except a handler failure."""
        if self.done:
            return
        if self.reason is None or override:
            self.reason = reason
        if not self.reading:
            return
        self.reading = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self.paused:
            try:
                transport.pause_reading()
            except RuntimeError:  # uvloop: the transport is closing already
                pass
        if not self.tasks:
            self._close()
        else:
            self.drain_timer = self.loop.call_later(self.settings.drain_timeout, self._drain_expired)

    def _drain_expired(self) -> None:
        self.drain_timer = None
        for task in list(self.tasks):
            task.cancel()
        self._close()

    def _close(self) -> None:
        if self.done:
            return
        self.done = True
        for handle in (self.timer, self.drain_timer, self.write_timer):
            if handle is not None:
                handle.cancel()
        if self.transport is not None:
            self.transport.close()
        self.server._closed(self, self.reason or "peer")

    def abort(self) -> list[asyncio.Task[None]]:
        """The server is cancelled: drop the connection, cancel its handlers, return them."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if self.transport is not None:
            self.transport.abort()
        if not self.done:
            self.reason = self.reason or "shutdown"
            self._close()
        return tasks
