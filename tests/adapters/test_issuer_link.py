"""TcpIssuerLink over real TCP on 127.0.0.1 against the mock issuers, and InMemoryIssuerLink."""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from switch.adapters.issuer_link import (
    InMemoryIssuerLink,
    TcpIssuerLink,
    _StanCounter,
    _Waiter,
    frame,
    issuer_codec,
    receive_frame,
)
from switch.core.codec import Fields
from switch.issuers.cards import demo_issuers
from switch.issuers.mock import MockIssuer, mock_from_demo
from switch.ports import IssuerLink, IssuerTimeout, IssuerUnavailable, NullMetrics

pytestmark = pytest.mark.anyio

CODEC = issuer_codec()
RICH = "6222029375642931684"
POOR = "6222028992986377539"
WAIT = 10.0  # upper bound for waiting on an event that must happen; never reached when green


class RecordingMetrics(NullMetrics):
    """Records issuer-side metric calls; ``wait_until`` waits for a condition on them."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.states: list[tuple[str, bool]] = []
        self.late: list[str] = []
        self.malformed: list[str] = []
        self._changed = anyio.Event()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def issuer_request(self, issuer: str, outcome: str, seconds: float) -> None:
        assert seconds >= 0
        self.requests.append((issuer, outcome))
        self._touch()

    def issuer_link_state(self, issuer: str, up: bool) -> None:
        self.states.append((issuer, up))
        self._touch()

    def issuer_late_reply(self, issuer: str) -> None:
        self.late.append(issuer)
        self._touch()

    def malformed_frame(self, reason: str) -> None:
        self.malformed.append(reason)
        self._touch()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        with anyio.fail_after(WAIT):
            while not condition():  # bounded by fail_after
                await self._changed.wait()


async def poll(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for state that has no event of its own, e.g. a mock's frame counter."""
    with anyio.fail_after(WAIT):
        while not condition():
            await anyio.sleep(0.005)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def consume(pan: str, amount_fen: int) -> Fields:
    return {2: pan, 3: "000000", 4: f"{amount_fen:012d}", 22: "012", 32: "48521000",
            41: "10000001", 42: "898310048990001", 49: "156"}


@asynccontextmanager
async def linked(
    mock: MockIssuer, metrics: RecordingMetrics
) -> AsyncIterator[tuple[TcpIssuerLink, anyio.abc.TaskGroup]]:
    async with anyio.create_task_group() as tg:
        port = await tg.start(mock.serve, "127.0.0.1", 0)
        link = TcpIssuerLink(mock.name, "127.0.0.1", port, metrics, reconnect_delay=0.02)
        await tg.start(link.run)
        assert await link.wait_up(WAIT)
        yield link, tg
        tg.cancel_scope.cancel()


def test_links_satisfy_the_port() -> None:
    links: list[IssuerLink] = [
        TcpIssuerLink("ICBC", "127.0.0.1", 1, NullMetrics()),
        InMemoryIssuerLink("ICBC", mock_from_demo(demo_issuers()["ICBC"])),
    ]
    assert [link.name for link in links] == ["ICBC", "ICBC"]


async def test_send_assigns_stan_and_f7_and_reports_answered() -> None:
    metrics = RecordingMetrics()
    async with linked(mock_from_demo(demo_issuers()["ICBC"]), metrics) as (link, _):
        fields = consume(RICH, 100)
        mti, reply = await link.send("0200", fields, timeout=WAIT)
        given = {**consume(RICH, 100), 11: "123456", 7: "0101000000"}
        _, reply2 = await link.send("0200", given, timeout=WAIT)
    assert (mti, reply[39]) == ("0210", "00")
    assert re.fullmatch(r"\d{6}", str(fields[11])) and reply[11] == fields[11]
    assert re.fullmatch(r"\d{10}", str(fields[7])) and reply[7] == fields[7]
    assert (reply2[11], reply2[7]) == ("123456", "0101000000")  # the caller's own F11/F7 are kept
    assert metrics.requests == [("ICBC", "answered"), ("ICBC", "answered")]
    assert metrics.states[:2] == [("ICBC", False), ("ICBC", True)]  # down until connected


async def test_many_concurrent_sends_matched_by_stan_out_of_order() -> None:
    metrics = RecordingMetrics()
    mock = mock_from_demo(demo_issuers()["ICBC"])
    gate = mock.hold(POOR)  # every POOR request is answered only after the RICH ones
    rich: dict[int, tuple[Fields, Fields]] = {}
    poor: dict[int, tuple[Fields, Fields]] = {}
    rich_done = anyio.Event()

    async def one(pan: str, amount: int, into: dict[int, tuple[Fields, Fields]]) -> None:
        request = consume(pan, amount)
        _, reply = await link.send("0200", request, timeout=WAIT)
        into[amount] = (request, reply)
        if len(rich) == 20:
            rich_done.set()

    async with linked(mock, metrics) as (link, _):
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, POOR, i + 1, poor)
            for i in range(20):
                tg.start_soon(one, RICH, 100 + i, rich)
            with anyio.fail_after(WAIT):
                await rich_done.wait()
            assert poor == {}  # held: the later requests overtook them on the same connection
            gate.set()
    for amount, (request, reply) in {**rich, **poor}.items():
        assert reply[4] == f"{amount:012d}"
        assert reply[11] == request[11] and reply[39] == "00"
    assert len({str(r[11]) for r, _ in [*rich.values(), *poor.values()]}) == 30
    assert mock.balance_of(RICH) == 100_000_000 - sum(range(100, 120))
    assert mock.balance_of(POOR) == 10_000 - sum(range(1, 11))


async def test_timeout_then_late_reply_is_counted_not_fatal() -> None:
    metrics = RecordingMetrics()
    mock = mock_from_demo(demo_issuers()["ICBC"])
    gate = mock.hold(RICH)
    async with linked(mock, metrics) as (link, _):
        with pytest.raises(IssuerTimeout):
            await link.send("0200", consume(RICH, 100), timeout=0.2)
        assert metrics.requests == [("ICBC", "timeout")]
        gate.set()
        await metrics.wait_until(lambda: metrics.late == ["ICBC"])
        assert link.is_up
        _, reply = await link.send("0200", consume(POOR, 1), timeout=WAIT)
    assert reply[39] == "00"


async def test_silent_issuer_gives_timeout_with_the_link_up() -> None:
    metrics = RecordingMetrics()
    async with linked(mock_from_demo(demo_issuers()["SLOW"]), metrics) as (link, _):
        with pytest.raises(IssuerTimeout):
            await link.send("0800", {}, timeout=0.1)
        assert link.is_up
    assert metrics.requests == [("SLOW", "timeout")]


async def test_closed_port_never_blocks_run_and_connects_once_the_issuer_listens() -> None:
    metrics = RecordingMetrics()
    port = closed_port()
    link = TcpIssuerLink("BOC", "127.0.0.1", port, metrics, reconnect_delay=0.02, max_reconnect_delay=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(link.run)  # returns although nothing listens
        assert not link.is_up
        with pytest.raises(IssuerUnavailable):
            await link.send("0200", consume(RICH, 1), timeout=WAIT)
        assert metrics.requests == [("BOC", "unavailable")]
        assert metrics.states == [("BOC", False)]  # the gauge reads 0, not missing, before any connect
        assert not await link.wait_up(0.05)
        await tg.start(mock_from_demo(demo_issuers()["ICBC"]).serve, "127.0.0.1", port)
        assert await link.wait_up(WAIT)
        _, reply = await link.send("0200", consume(RICH, 1), timeout=WAIT)
        assert reply[39] == "00"
        tg.cancel_scope.cancel()


async def test_reconnects_after_the_issuer_restarts() -> None:
    metrics = RecordingMetrics()
    mock = mock_from_demo(demo_issuers()["ICBC"])
    async with anyio.create_task_group() as tg:
        async with anyio.create_task_group() as server:
            port = await server.start(mock.serve, "127.0.0.1", 0)
            link = TcpIssuerLink("ICBC", "127.0.0.1", port, metrics, reconnect_delay=0.02)
            await tg.start(link.run)
            assert await link.wait_up(WAIT)
            assert (await link.send("0200", consume(RICH, 1), timeout=WAIT))[1][39] == "00"
            server.cancel_scope.cancel()
        await metrics.wait_until(lambda: ("ICBC", False) in metrics.states[2:])
        with pytest.raises(IssuerUnavailable):
            await link.send("0200", consume(RICH, 1), timeout=WAIT)
        await tg.start(mock.serve, "127.0.0.1", port)
        assert await link.wait_up(WAIT)
        assert (await link.send("0200", consume(RICH, 2), timeout=WAIT))[1][39] == "00"
        tg.cancel_scope.cancel()
    assert metrics.states == [("ICBC", False), ("ICBC", True), ("ICBC", False), ("ICBC", True), ("ICBC", False)]
    assert mock.balance_of(RICH) == 100_000_000 - 3


async def test_drop_with_request_in_flight_fails_it_at_once_as_a_timeout() -> None:
    metrics = RecordingMetrics()
    mock = mock_from_demo(demo_issuers()["ICBC"])
    mock.hold(RICH)  # never released
    errors: list[IssuerTimeout] = []

    async def in_flight() -> None:
        try:
            await link.send("0200", consume(RICH, 5), timeout=50)
        except IssuerTimeout as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        async with anyio.create_task_group() as server:
            port = await server.start(mock.serve, "127.0.0.1", 0)
            link = TcpIssuerLink("ICBC", "127.0.0.1", port, metrics, reconnect_delay=0.02)
            await tg.start(link.run)
            assert await link.wait_up(WAIT)
            tg.start_soon(in_flight)
            await poll(lambda: mock.frames_received == 1)
            server.cancel_scope.cancel()
        await metrics.wait_until(lambda: bool(metrics.requests))
        tg.cancel_scope.cancel()
    assert len(errors) == 1 and "link dropped" in str(errors[0])
    assert metrics.requests == [("ICBC", "timeout")]


@asynccontextmanager
async def rogue_linked(
    handler: Callable[[anyio.abc.SocketStream], Awaitable[None]], metrics: RecordingMetrics, name: str = "ROGUE"
) -> AsyncIterator[TcpIssuerLink]:
    """A link to a hand-written issuer on 127.0.0.1 (``handler`` serves each connection)."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        tg.start_soon(listener.serve, handler)
        link = TcpIssuerLink(name, "127.0.0.1", port, metrics, reconnect_delay=0.02)
        await tg.start(link.run)
        yield link
        tg.cancel_scope.cancel()


async def test_garbage_and_unknown_stan_replies_are_counted_and_the_link_survives() -> None:
    metrics = RecordingMetrics()

    async def rogue(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            for _ in range(2):  # bounded: the test sends two requests
                mti, fields = CODEC.decode(await receive_frame(reader, 4096))
                await stream.send(frame(b"0210ZZZZ"))  # undecodable
                stray = {11: "999999" if fields[11] != "999999" else "888888", 39: "00"}
                await stream.send(frame(CODEC.encode("0210", stray)))  # nobody waits for it
                await stream.send(frame(CODEC.encode("0210", {11: fields[11], 39: "00"})))
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()  # stay connected until the link closes

    async with rogue_linked(rogue, metrics) as link:
        assert await link.wait_up(WAIT)
        first = await link.send("0200", consume(RICH, 1), timeout=WAIT)
        second = await link.send("0200", consume(RICH, 1), timeout=WAIT)
        await metrics.wait_until(lambda: len(metrics.late) == 2)
        assert (first[0], first[1][39], second[1][39]) == ("0210", "00", "00")
        assert metrics.malformed == ["issuer", "issuer"]
        assert metrics.states == [("ROGUE", False), ("ROGUE", True)]  # never dropped


async def test_a_reply_repeating_other_values_than_its_request_is_not_taken() -> None:
    """specs/issuer.md: a reply repeats the request's F3/F4/F7/F37. An approval of another
    amount (or a reply meant for another request on the same STAN) is dropped and counted; the
    request takes its own reply if one follows, else it times out (reversed by the caller)."""
    metrics = RecordingMetrics()

    async def rogue(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            _, first = CODEC.decode(await receive_frame(reader, 4096))
            wrong = {k: first[k] for k in (3, 7, 11, 37) if k in first}
            wrong[2] = "6222020000001684"  # another card number (masked, say) is not a mismatch
            await stream.send(frame(CODEC.encode("0210", {**wrong, 4: "000000000999", 38: "123456", 39: "00"})))
            await stream.send(frame(CODEC.encode("0210", {**wrong, 4: first[4], 38: "123456", 39: "00"})))
            _, second = CODEC.decode(await receive_frame(reader, 4096))
            other_f7 = "0101000000" if second[7] != "0101000000" else "0202000000"
            await stream.send(frame(CODEC.encode("0210", {11: second[11], 4: second[4], 7: other_f7, 39: "00"})))
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()  # stay connected until the link closes

    async with rogue_linked(rogue, metrics) as link:
        assert await link.wait_up(WAIT)
        request = {**consume(RICH, 250), 37: "000000000042"}
        mti, reply = await link.send("0200", request, timeout=WAIT)
        assert (mti, reply[4], reply[39]) == ("0210", "000000000250", "00")  # its own reply, not the first
        assert metrics.malformed == ["issuer"]
        with pytest.raises(IssuerTimeout):
            await link.send("0200", consume(RICH, 251), timeout=0.5)
        assert metrics.malformed == ["issuer", "issuer"]
        assert metrics.states == [("ROGUE", False), ("ROGUE", True)]


async def test_oversized_frame_drops_the_connection_and_the_link_reconnects() -> None:
    metrics = RecordingMetrics()
    connections = 0

    async def server(stream: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            if connections == 1:
                await stream.send(b"\xff\xff")  # 65535 > max_frame
            else:
                mti, fields = CODEC.decode(await receive_frame(reader, 4096))
                await stream.send(frame(CODEC.encode("0810", {11: fields[11], 39: "00"})))
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()  # until the link closes

    async with rogue_linked(server, metrics, "BIG") as link:
        await metrics.wait_until(lambda: len(metrics.states) >= 4)
        assert metrics.states[:4] == [("BIG", False), ("BIG", True), ("BIG", False), ("BIG", True)]
        assert metrics.malformed == ["issuer"]
        assert (await link.send("0800", {}, timeout=WAIT))[1][39] == "00"


def test_stan_counter_wraps_and_skips_stans_in_flight() -> None:
    counter = _StanCounter()
    assert counter.next({}) == "000001"
    counter._last = 999_997
    busy = {"999999": _Waiter("0200"), "000001": _Waiter("0200")}
    assert [counter.next(busy), counter.next(busy)] == ["999998", "000002"]


async def test_in_memory_link_uses_the_mock_rules_and_the_codec() -> None:
    mock = mock_from_demo(demo_issuers()["ICBC"])
    link = InMemoryIssuerLink("ICBC", mock)
    fields = consume(RICH, 250)
    mti, reply = await link.send("0200", fields, timeout=1)
    assert (mti, reply[39], reply[11]) == ("0210", "00", fields[11])
    assert reply[4] == "000000000250"  # went through the codec: zero-filled n12
    assert link.sent[0][1][11] == fields[11] and 7 in link.sent[0][1]
    assert mock.balance_of(RICH) == 100_000_000 - 250
    link.up = False
    assert not link.is_up
    with pytest.raises(IssuerUnavailable):
        await link.send("0200", consume(RICH, 1), timeout=1)
    silent = InMemoryIssuerLink("SLOW", mock_from_demo(demo_issuers()["SLOW"]))
    with pytest.raises(IssuerTimeout):
        await silent.send("0800", {}, timeout=1)


def test_a_repeat_is_answered_like_its_first_transmission() -> None:
    """specs/issuer.md: 0401 → 0410, 0221 → 0230 (the link must accept those as the replies)."""
    from switch.adapters.issuer_link import response_mti

    assert [response_mti(m) for m in ("0100", "0200", "0220", "0221", "0400", "0401", "0800")] == [
        "0110", "0210", "0230", "0230", "0410", "0410", "0810"]


def test_link_framer_splits_chunks_into_frames_whatever_the_cut() -> None:
    from switch.adapters.issuer_link import FrameTooLarge, LinkFramer, frame

    bodies = [b"\x02\x10" + bytes([i]) * (i * 7 % 50) for i in range(20)]
    stream = b"".join(frame(b) for b in bodies)
    for cut in (1, 2, 3, 7, 64, len(stream)):  # one byte at a time up to all at once
        framer = LinkFramer(4096)
        got: list[bytes] = []
        for i in range(0, len(stream), cut):
            got += framer.feed(stream[i : i + cut])
        assert got == bodies
    with pytest.raises(FrameTooLarge):
        LinkFramer(100).feed(frame(bytes(101)))
