"""A round-robin TCP load balancer for tests only: the shape of HAProxy ``mode tcp`` / nginx
``stream`` in front of several ``switch serve`` processes (docs/scale-out.md), small enough to
read.

Owns: one listening socket on 127.0.0.1 (a free port), and for each client connection a
connection to the next backend in turn (round robin; a backend that refuses or does not answer
within ``connect_timeout`` is skipped for the next one, at most one try per backend), then bytes
copied both ways until either side closes, when both are closed (a backend killed with SIGKILL
drops its terminals' connections, as a real balancer would). No health checks, no stickiness:
each new connection may land on another process. ``drain(backend)`` stops sending new connections
to a backend (existing ones continue), as a release does before stopping a process.

Bounded: at most ``max_connections`` client connections at once (more are closed at once), reads
of at most ``CHUNK`` bytes, every connect under a timeout; ``close()`` ends every pump. Must not
listen anywhere but 127.0.0.1 or be used outside tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field

CHUNK = 65536
Backend = tuple[str, int]


@dataclass
class BalancerStats:
    accepted: int = 0
    refused: int = 0  # over max_connections, or no backend answered
    connect_failures: Counter[Backend] = field(default_factory=Counter)
    routed: Counter[Backend] = field(default_factory=Counter)  # connections per backend


class TcpBalancer:
    """``async with TcpBalancer([(host, port), ...]) as lb:`` then connect to ``lb.port``."""

    def __init__(self, backends: list[Backend], *, max_connections: int = 256, connect_timeout: float = 2.0) -> None:
        if not backends:
            raise ValueError("at least one backend")
        self.backends = list(backends)
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.stats = BalancerStats()
        self.port = 0
        self._next = 0
        self._drained: set[Backend] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._open = 0

    async def __aenter__(self) -> TcpBalancer:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def drain(self, backend: Backend) -> None:
        """No new connections to ``backend`` (the ones it has keep going)."""
        self._drained.add(backend)

    def undrain(self, backend: Backend) -> None:
        self._drained.discard(backend)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):  # the pumps see their sockets close and end
            _close(writer)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        if server is not None:
            await asyncio.wait_for(server.wait_closed(), 5)

    def _candidates(self) -> list[Backend]:
        """Every backend once, starting with the next in turn; drained ones left out."""
        n = len(self.backends)
        start = self._next
        self._next = (self._next + 1) % n
        return [b for b in (self.backends[(start + i) % n] for i in range(n)) if b not in self._drained]

    async def _connect(self) -> tuple[Backend, asyncio.StreamReader, asyncio.StreamWriter] | None:
        for backend in self._candidates():
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(*backend), self.connect_timeout)
            except (OSError, asyncio.TimeoutError):
                self.stats.connect_failures[backend] += 1
                continue
            return backend, reader, writer
        return None

    async def _client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(c_writer)
        self._open += 1
        try:
            if self._open > self.max_connections:
                self.stats.refused += 1
                return
            got = await self._connect()
            if got is None:
                self.stats.refused += 1
                return
            backend, b_reader, b_writer = got
            self._writers.add(b_writer)
            self.stats.accepted += 1
            self.stats.routed[backend] += 1
            try:
                pumps = [asyncio.ensure_future(_pump(c_reader, b_writer)), asyncio.ensure_future(_pump(b_reader, c_writer))]
                try:
                    # either side closing (or failing) ends the pair: the other side is closed too
                    await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for p in pumps:
                        p.cancel()
                    await asyncio.wait(pumps, timeout=5)
            finally:
                _close(b_writer)
                self._writers.discard(b_writer)
        finally:
            _close(c_writer)
            self._writers.discard(c_writer)
            self._open -= 1
            self._tasks.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while True:  # ends at EOF, on an error, or when cancelled
            data = await reader.read(CHUNK)
            if not data:
                return
            writer.write(data)
            await writer.drain()


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        writer.close()
