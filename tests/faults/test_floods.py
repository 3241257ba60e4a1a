"""Connection floods against the terminal port (issue 7, "Resource limits"): the switch with small
limits (``AppConfig.max_connections``, ``idle_timeout``, ``read_timeout``), built from
``run_switch`` + ``run_demo_issuers`` in this process, on real 127.0.0.1 sockets.

- connections beyond ``max_connections`` are closed at once, unread, and counted
  (``switch_connections_closed_total{reason="max_connections"}``); capacity comes back when the
  flood goes;
- a slowloris (one byte at a time, never finishing a frame) is closed by the read timeout, and
  idle or half-open connections (nothing sent, half a frame then silence, signed on then silence)
  by the idle and read timeouts, each counted by reason;
- all the while a normal terminal is served: sign-on and an approved consume.

Every wait is bounded; nothing asserts on elapsed time.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from switch.app import AppConfig, Running, load_master_key, run_switch, seed_demo
from switch.issuers.cards import demo_issuers
from switch.issuers.run import demo_mocks, run_demo_issuers
from switch.network import IssuerEndpoint

from tests.e2e.helpers import ICBC_CARD, do, metric, signed_on, terminal_client, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

HOST = "127.0.0.1"
EOF_BOUND = 10.0  # seconds to wait for the switch to close a connection: a bound, not an assertion


@asynccontextmanager
async def flood_switch(data_dir: Path, **limits: Any) -> AsyncIterator[Running]:
    """The demo switch (fixture, mock issuers) with the given AppConfig limits on free ports."""
    master_key = load_master_key(data_dir, create=True)
    fixture = demo_issuers()
    async with anyio.create_task_group() as tg:
        bound: dict[str, int] = await tg.start(
            functools.partial(run_demo_issuers, HOST, None, mocks=demo_mocks()))
        cfg = AppConfig(
            data_dir=data_dir, host=HOST, port=0, metrics_port=0, admin_port=None, issuer_timeout=2.0,
            drain_timeout=2.0, wait_for_links=tuple(bound),
            issuers=[IssuerEndpoint(n, HOST, p, fixture[n].prefixes, fixture[n].kind) for n, p in bound.items()],
            **limits,
        )

        async def switch_then_stop(*, task_status: anyio.abc.TaskStatus[Running]) -> None:
            await run_switch(cfg, master_key, seed=seed_demo, handle_signals=False, task_status=task_status)
            tg.cancel_scope.cancel()  # drained: stop the mock issuers too

        running: Running = await tg.start(switch_then_stop)
        try:
            yield running
        finally:
            running.shutdown()


def exposition(running: Running) -> str:
    return running.metrics.exposition().decode()


def closed(running: Running, reason: str) -> float:
    return metric(exposition(running), "switch_connections_closed_total", reason=reason)


def open_connections(running: Running) -> float:
    return metric(exposition(running), "switch_connections_open")


class Peer:
    """A raw TCP connection to the terminal port that records what it received and when the
    switch closed it."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.received = b""
        self.sent = 0
        self.eof = anyio.Event()

    async def watch(self) -> None:
        """Read until the switch closes the connection (run it in a task group)."""
        try:
            while True:  # ends at EOF; the caller's scope bounds it
                self.received += await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.eof.set()

    async def send(self, data: bytes) -> bool:
        try:
            await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return False
        self.sent += len(data)
        return True


async def open_peers(stack: AsyncExitStack, tg: anyio.abc.TaskGroup, count: int, port: int) -> list[Peer]:
    peers = []
    for _ in range(count):
        stream = await stack.enter_async_context(await anyio.connect_tcp(HOST, port))
        peer = Peer(stream)
        tg.start_soon(peer.watch)
        peers.append(peer)
    return peers


async def serve_normal_terminal(running: Running, tid: str, first_stan: int) -> None:
    """A well-behaved terminal: sign-on and a consume, both answered 00."""
    term = terminal_client(HOST, running.port, tid, first_stan)
    term.timeout = 10.0
    async with signed_on(term):
        r = await do(term, "consume", ICBC_CARD, 1_234)
        assert r.code == "00", r


# ---- max_connections ------------------------------------------------------------------------
async def test_connections_beyond_the_limit_are_closed_and_counted(tmp_path: Path) -> None:
    limit, flood = 4, 10
    async with flood_switch(tmp_path, max_connections=limit, idle_timeout=60.0, read_timeout=60.0) as running:
        term = terminal_client(HOST, running.port, "10000001", 1)
        term.timeout = 10.0
        async with signed_on(term), AsyncExitStack() as stack, anyio.create_task_group() as tg:
            peers = await open_peers(stack, tg, flood, running.port)
            refused = flood - (limit - 1)
            assert await wait_until(lambda: closed(running, "max_connections") == refused, EOF_BOUND)
            assert await wait_until(lambda: sum(p.eof.is_set() for p in peers) == refused, EOF_BOUND)
            assert all(p.received == b"" for p in peers if p.eof.is_set())  # closed unread, unanswered
            assert open_connections(running) == limit
            # the flood holds every other slot: the terminal already connected is still served
            r = await do(term, "consume", ICBC_CARD, 1_000)
            assert r.code == "00", r
            assert closed(running, "max_connections") == refused
            # the flood leaves: capacity comes back for a new terminal
            for p in peers:
                await p.stream.aclose()
            tg.cancel_scope.cancel()
        assert await wait_until(lambda: open_connections(running) == 0, EOF_BOUND)
        await serve_normal_terminal(running, "20000001", 1)
        assert closed(running, "max_connections") == refused


# ---- slowloris ------------------------------------------------------------------------------
async def trickle(peer: Peer, gap: float, max_bytes: int) -> None:
    """One byte every ``gap`` seconds of a frame announcing 256 bytes (never finished), until the
    switch closes the connection or ``max_bytes`` were sent."""
    data = b"\x01\x00" + b"\x60\x00\x03\x00\x00" + bytes(250)
    for i in range(min(max_bytes, 255)):  # bounded: never the whole frame
        if peer.eof.is_set() or not await peer.send(data[i:i + 1]):
            return
        with anyio.move_on_after(gap):
            await peer.eof.wait()


async def test_slowloris_is_closed_by_the_read_timeout_while_a_terminal_is_served(tmp_path: Path) -> None:
    count = 6
    async with flood_switch(tmp_path, max_connections=50, idle_timeout=30.0, read_timeout=0.5) as running:
        async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
            peers = await open_peers(stack, tg, count, running.port)
            for p in peers:
                tg.start_soon(trickle, p, 1.0, 15)
            assert await wait_until(lambda: open_connections(running) == count, EOF_BOUND)
            await serve_normal_terminal(running, "10000001", 1)
            assert await wait_until(lambda: all(p.eof.is_set() for p in peers), EOF_BOUND)
            tg.cancel_scope.cancel()
        assert closed(running, "read_timeout") == count
        assert all(0 < p.sent < 258 and p.received == b"" for p in peers)  # never a whole frame
        assert await wait_until(lambda: open_connections(running) == 0, EOF_BOUND)


async def test_slowloris_trickling_faster_than_the_read_timeout_is_closed_like_an_idle_one(
    tmp_path: Path,
) -> None:
    """No gap reaches read_timeout, so the frame never stalls (§1); a frame still incomplete after
    idle_timeout is closed all the same: a slowloris holds a slot no longer than an idle terminal."""
    read_timeout, idle_timeout = 1.0, 2.0
    async with flood_switch(tmp_path, max_connections=50, idle_timeout=idle_timeout,
                            read_timeout=read_timeout) as running:
        async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
            [peer] = await open_peers(stack, tg, 1, running.port)
            # up to 16 bytes, one every read_timeout / 2: by the last one the frame has been
            # incomplete for 4 x idle_timeout, so the switch must have closed it long before
            await trickle(peer, read_timeout / 2, 16)
            trickled_to_the_end = peer.sent == 16 and not peer.eof.is_set()
            tg.cancel_scope.cancel()
        assert not trickled_to_the_end
        assert closed(running, "read_timeout") == 1


async def test_a_frame_arriving_in_pieces_slower_than_the_read_timeout_in_total_is_answered(
    tmp_path: Path,
) -> None:
    """§1: only a stall (no byte for read_timeout) closes; a frame sent in four pieces, each gap
    half the read timeout and the whole 1.5 x it, is answered."""
    read_timeout = 2.0
    async with flood_switch(tmp_path, max_connections=50, idle_timeout=30.0, read_timeout=read_timeout) as running:
        term = terminal_client(HOST, running.port, "20000001", 970001)
        frame, _ = term.build_frame("0820", {11: term.take_stan(), 41: term.tid, 42: term.mid,
                                             60: "00000001301"}, mac=False)
        async with await anyio.connect_tcp(HOST, running.port) as stream:
            cut = len(frame) // 4
            pieces = [frame[:cut], frame[cut:2 * cut], frame[2 * cut:3 * cut], frame[3 * cut:]]
            for i, piece in enumerate(pieces):
                if i:
                    await anyio.sleep(read_timeout / 2)
                await stream.send(piece)
            answer = b""
            with anyio.fail_after(EOF_BOUND):
                while len(answer) < 15:
                    answer += await stream.receive()
        assert answer[13:15] == bytes.fromhex("0830")  # LEN 2 + TPDU 5 + header 6, then the MTI
        assert closed(running, "read_timeout") == 0


# ---- idle and half-open ---------------------------------------------------------------------
async def test_idle_and_half_open_connections_are_closed_while_a_terminal_is_served(tmp_path: Path) -> None:
    silent, half_frame, signed_on_then_silent = 4, 3, 2
    async with flood_switch(tmp_path, max_connections=50, idle_timeout=1.5, read_timeout=1.0) as running:
        async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
            idle = await open_peers(stack, tg, silent, running.port)
            stalled = await open_peers(stack, tg, half_frame, running.port)
            quiet = await open_peers(stack, tg, signed_on_then_silent, running.port)
            for p in stalled:  # LEN says 100 bytes; 10 arrive, then nothing (a peer gone mid-frame)
                assert await p.send(b"\x00\x64" + bytes(8))
            for n, p in enumerate(quiet):  # a sign-on, then silence with nothing in flight
                client = terminal_client(HOST, running.port, "10000002", 500 + 10 * n)
                sign_on = {11: client.take_stan(), 41: client.tid, 42: client.mid,
                           60: "00" + client.batch + "003", 63: "01 "}
                data, _ = client.build_frame("0800", sign_on, mac=False)
                assert await p.send(data)
            await serve_normal_terminal(running, "10000001", 1)  # closes its own connection (peer)
            everyone = idle + stalled + quiet
            assert await wait_until(lambda: all(p.eof.is_set() for p in everyone), EOF_BOUND)
            tg.cancel_scope.cancel()
        assert closed(running, "idle_timeout") == silent + signed_on_then_silent
        assert closed(running, "read_timeout") == half_frame
        assert closed(running, "peer") == 1  # the normal terminal, which left by itself
        assert all(p.received == b"" for p in idle + stalled)
        assert all(len(p.received) > 2 for p in quiet)  # its sign-on was answered before the close
        assert await wait_until(lambda: open_connections(running) == 0, EOF_BOUND)
