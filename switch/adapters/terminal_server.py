"""The terminal-facing TCP server (protocol §1): moves bytes between sockets and the sans-IO
framer, hands each frame to the transaction manager, writes responses as soon as they are
ready (several in flight per connection, answered in any order).

Timeouts: a connection with no partial frame is closed after ``idle_timeout``; one stalled
mid-frame after ``read_timeout``; a LEN above ``max_frame`` closes at once. Every close is
logged and counted by reason. Graceful shutdown: stop accepting, stop reading, let in-flight
requests finish and send their answers (bounded by ``drain_timeout``).

Holds no business rules.
"""

from __future__ import annotations

import logging
import math
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


class _Closed(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class TerminalServer:
    def __init__(self, settings: ServerSettings, handler: Handler, metrics: Metrics) -> None:
        self.settings = settings
        self.handler = handler
        self.metrics = metrics
        self.port: int | None = None
        self._stop_reading = anyio.Event()
        self._accept_scope: anyio.CancelScope | None = None
        self.open_connections = 0

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host=self.settings.host, local_port=self.settings.port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as connections:
            with anyio.CancelScope() as scope:
                self._accept_scope = scope
                task_status.started(self.port)
                log.info("terminal port listening on %s:%s", self.settings.host, self.port)
                async with listener:
                    await listener.serve(self._connection, task_group=connections)
            # accepting stopped (shutdown): connections drain inside the task group

    def shutdown(self) -> None:
        """Stop accepting and reading; in-flight requests finish and are answered."""
        self._stop_reading.set()
        if self._accept_scope is not None:
            self._accept_scope.cancel()

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        if self.open_connections >= self.settings.max_connections:
            # over the limit: refused at once, counted, never read
            self.metrics.connection_opened()
            self.metrics.connection_closed("max_connections")
            log.warning("refusing a terminal connection: %d open", self.open_connections)
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            return
        self.open_connections += 1
        try:
            await self._serve_connection(stream)
        finally:
            self.open_connections -= 1

    async def _serve_connection(self, stream: anyio.abc.SocketStream) -> None:
        s = self.settings
        try:
            peer = str(stream.extra(anyio.abc.SocketAttribute.remote_address)[0])
        except Exception:
            peer = ""
        reader = FrameReader(s.max_frame, peer)
        write_lock = anyio.Lock()
        slots = anyio.Semaphore(s.max_in_flight_per_connection)
        closing = anyio.Event()  # set when a handler decided the connection must close
        failed = anyio.Event()  # set when a handler raised
        in_flight = [0]
        reason = "peer"
        self.metrics.connection_opened()

        async def respond(frame: Frame) -> None:
            try:
                data = await self.handler(frame)
                if data is None:  # §2/§12.1: bit 1, bad MTI, undecodable: closed and counted
                    closing.set()
                    return
                # the lock is nearly always free: take it without anyio's two checkpoints (a
                # shielded cancel scope and a trip through the event loop) when it is
                try:
                    write_lock.acquire_nowait()
                except anyio.WouldBlock:
                    await write_lock.acquire()
                try:
                    await stream.send(data)
                finally:
                    write_lock.release()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                closing.set()
            except Exception:
                # never let one request take the server down: close this connection only
                log.exception("request handler failed; closing this connection")
                failed.set()
                closing.set()
            finally:
                in_flight[0] -= 1
                slots.release()

        try:
            async with anyio.create_task_group() as handlers:
                with anyio.CancelScope() as read_scope:

                    async def watch_stop() -> None:
                        await self._stop_reading.wait()
                        read_scope.cancel()

                    async def watch_closing() -> None:
                        await closing.wait()
                        read_scope.cancel()

                    handlers.start_soon(watch_stop)
                    handlers.start_soon(watch_closing)
                    # read_timeout runs from the first byte of a frame, not from the last chunk: a
                    # client trickling a byte at a time is closed all the same (slowloris)
                    frame_deadline = math.inf

                    def next_deadline() -> float:
                        if reader.mid_frame:
                            return frame_deadline
                        return anyio.current_time() + s.idle_timeout if s.idle_timeout > 0 else math.inf

                    try:
                        while True:  # one iteration per timeout; ends with the connection
                            # one scope for many reads, its deadline moved after each (cheaper
                            # than a new cancel scope per read); off while frames are dispatched
                            with anyio.CancelScope(deadline=next_deadline()) as t:
                                while True:  # one iteration per read; left by a timeout or an error
                                    chunk = await stream.receive(65536)
                                    t.deadline = math.inf
                                    was_mid_frame = reader.mid_frame
                                    reader.receive_data(chunk)
                                    completed = False
                                    while (frame := reader.next_frame()) is not None:
                                        completed = True
                                        try:  # as for write_lock: the fast path without checkpoints
                                            slots.acquire_nowait()
                                        except anyio.WouldBlock:
                                            await slots.acquire()
                                        in_flight[0] += 1
                                        handlers.start_soon(respond, frame)
                                    if reader.mid_frame and (completed or not was_mid_frame):
                                        frame_deadline = anyio.current_time() + s.read_timeout  # a new frame began
                                    t.deadline = next_deadline()
                            if reader.mid_frame:
                                raise _Closed("read_timeout")
                            if in_flight[0] == 0:  # not idle while answers are still due
                                raise _Closed("idle_timeout")
                    except FramingError as exc:
                        reason = exc.reason
                        self.metrics.malformed_frame(exc.reason)
                    except _Closed as exc:
                        reason = exc.reason
                    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                        reason = "peer"
                if failed.is_set():
                    reason = "internal_error"
                elif closing.is_set():
                    reason = "protocol"
                elif self._stop_reading.is_set():
                    reason = "shutdown"
                # wait for in-flight handlers (bounded), then stop the watchers
                with anyio.move_on_after(s.drain_timeout):
                    for _ in range(s.max_in_flight_per_connection):
                        await slots.acquire()
                handlers.cancel_scope.cancel()
        finally:
            if reason != "peer":
                log.info("closing terminal connection: %s", reason)
            self.metrics.connection_closed(reason)
            with anyio.CancelScope(shield=True):
                await stream.aclose()
