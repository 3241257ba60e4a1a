"""The test balancer (tests/e2e/tcp_lb.py) itself, against two tiny echo servers on 127.0.0.1:
connections alternate between backends, a backend that is down is skipped, a backend closing its
side closes the client's, a drained backend gets no new connections, and connections above the
bound are refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from procs import free_port

from .tcp_lb import TcpBalancer

pytestmark = [pytest.mark.anyio]


@asynccontextmanager
async def echo_server(name: bytes) -> AsyncIterator[tuple[tuple[str, int], asyncio.Server]]:
    """Answers each read with ``name + data``; closes when the client sends ``bye``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(100):
                data = await reader.read(1024)
                if not data or data == b"bye":
                    return
                writer.write(name + data)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield ("127.0.0.1", int(server.sockets[0].getsockname()[1])), server
    finally:
        server.close()


async def ask(port: int, data: bytes = b"x") -> bytes:
    """One exchange through the balancer; ``b""`` when it closed the connection instead."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(1024), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_round_robin_skip_drain_and_close() -> None:
    async with echo_server(b"A:") as (a, _), echo_server(b"B:") as (b, _):
        async with TcpBalancer([a, b]) as lb:
            answers = [await ask(lb.port) for _ in range(4)]
            assert sorted(answers) == [b"A:x", b"A:x", b"B:x", b"B:x"] and answers[0] != answers[1]
            lb.drain(a)
            assert [await ask(lb.port) for _ in range(3)] == [b"B:x"] * 3
            lb.undrain(a)
            # the backend closing its side closes the client's
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
            writer.write(b"bye")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(1024), 5) == b""
            writer.close()
        assert lb.stats.routed[a] >= 2 and lb.stats.routed[b] >= 5


async def test_a_backend_that_is_down_is_skipped() -> None:
    dead = ("127.0.0.1", free_port())  # nothing listens there
    async with echo_server(b"B:") as (b, _):
        async with TcpBalancer([dead, b]) as lb:
            assert [await ask(lb.port) for _ in range(4)] == [b"B:x"] * 4
        assert lb.stats.connect_failures[dead] >= 2 and lb.stats.routed[b] == 4


async def test_connections_above_the_bound_are_refused() -> None:
    async with echo_server(b"A:") as (a, _):
        async with TcpBalancer([a], max_connections=1) as lb:
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
            writer.write(b"1")
            assert await asyncio.wait_for(reader.read(1024), 5) == b"A:1"
            assert await ask(lb.port) == b""  # the second at once is closed
            writer.close()
        assert lb.stats.refused == 1
