"""The mock issuers' fault knobs (switch/issuers/faults.py) over real TCP on 127.0.0.1, seen from
a raw issuer-dialect client: what each fault puts on the wire, that the effect is applied before
the reply path (a dropped or delayed reply still moved the money), and that the knobs validate.

Every read is bounded by ``fail_after``; nothing asserts on elapsed time."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from switch.adapters.issuer_link import frame, issuer_codec, receive_frame
from switch.core.codec import CodecError, Fields
from switch.issuers.cards import demo_issuers
from switch.issuers.faults import IssuerFaults, Trigger
from switch.issuers.mock import MockIssuer, mock_from_demo

pytestmark = pytest.mark.anyio

CODEC = issuer_codec()
CARD = "6222029375642931684"  # ICBC, 1,000,000.00, PIN 123456, expiry 3012
F7 = "1126120000"
READ_LIMIT = 5.0  # seconds: a bound against a hang, never an assertion


class Client:
    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)
        self.stan = 0

    async def send(self, mti: str, fields: Fields) -> str:
        self.stan += 1
        fields[11] = f"{self.stan:06d}"
        fields.setdefault(7, F7)
        await self.stream.send(frame(CODEC.encode(mti, fields)))
        return str(fields[11])

    async def echo(self) -> str:
        return await self.send("0800", {})

    async def consume(self, amount_fen: int) -> str:
        return await self.send("0200", {
            2: CARD, 3: "000000", 4: f"{amount_fen:012d}", 14: "3012", 22: "021", 32: "48521000",
            37: f"{self.stan + 1:012d}", 41: "10000001", 42: "898310048990001", 49: "156",
        })

    async def body(self) -> bytes:
        with anyio.fail_after(READ_LIMIT):
            return await receive_frame(self.reader, 4096)

    async def reply(self) -> tuple[str, Fields]:
        return CODEC.decode(await self.body())


def icbc() -> MockIssuer:
    return mock_from_demo(demo_issuers()["ICBC"])


@asynccontextmanager
async def serving(mock: MockIssuer) -> AsyncIterator[Client]:
    async with anyio.create_task_group() as tg:
        port = await tg.start(mock.serve, "127.0.0.1", 0)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            yield Client(stream)
        tg.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> bool:
    with anyio.move_on_after(READ_LIMIT):
        while not condition():  # bounded by the scope
            await anyio.sleep(0.005)
    return bool(condition())


async def test_no_fault_by_default() -> None:
    mock = icbc()
    assert not mock.faults.active
    async with serving(mock) as client:
        stan = await client.echo()
        mti, fields = await client.reply()
        assert (mti, fields[11], fields[39]) == ("0810", stan, "00")
    assert mock.faults.replies == 1 and sum(mock.faults.counts.values()) == 0


async def test_drop_every_second_reply_keeps_the_effect() -> None:
    mock = icbc()
    before = mock.balance_of(CARD)
    mock.faults.set(drop=2)
    async with serving(mock) as client:
        stans = [await client.consume(100 + i) for i in range(4)]
        assert await until(lambda: len(mock.applied("consume")) == 4 and mock.faults.replies == 4)
        mock.faults.clear()
        last = await client.echo()
        got = [(await client.reply())[1][11] for _ in range(3)]
    assert got == [stans[0], stans[2], last]  # the 2nd and 4th replies were never sent
    assert mock.faults.counts["dropped"] == 2
    assert mock.balance_of(CARD) == before - (100 + 101 + 102 + 103)  # effects applied all the same


async def test_probability_one_always_fires_and_a_seeded_probability_is_repeatable() -> None:
    assert Trigger.of(1.0).fires(1, random.Random(1))
    assert not Trigger.of(0.0).active
    first, second = IssuerFaults(seed=7, drop=Trigger(0.5)), IssuerFaults(seed=7, drop=Trigger(0.5))
    pattern = [first._fires("drop", n) for n in range(1, 40)]
    assert pattern == [second._fires("drop", n) for n in range(1, 40)]
    assert any(pattern) and not all(pattern)


async def test_delay_sends_the_reply_after_the_effect() -> None:
    mock = icbc()
    before = mock.balance_of(CARD)
    mock.faults.set(delay=30.0)
    async with serving(mock) as client:
        await client.consume(500)
        # the effect is applied while the reply is still being held back
        assert await until(lambda: mock.faults.counts["delayed"] == 1)
        assert mock.balance_of(CARD) == before - 500
    mock.faults.set(delay=0.05)
    async with serving(mock) as client:
        stan = await client.consume(700)
        mti, fields = await client.reply()
    assert (mti, fields[11], fields[39]) == ("0210", stan, "00")
    assert mock.faults.counts["delayed"] == 2


async def test_disconnect_mid_message_writes_half_a_frame_then_closes() -> None:
    mock = icbc()
    mock.faults.set(disconnect_mid_message=True)
    async with serving(mock) as client:
        await client.consume(300)
        received = b""
        with anyio.fail_after(READ_LIMIT):
            while True:  # until the mock closes the connection
                try:
                    received += await client.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    assert mock.faults.counts["disconnected"] == 1
    announced = int.from_bytes(received[:2], "big")
    assert 0 < len(received) - 2 < announced  # a frame that never completes
    assert len(mock.applied("consume")) == 1


async def test_garbage_instead_framed_is_not_a_message() -> None:
    mock = icbc()
    mock.faults.set(garbage=True)
    async with serving(mock) as client:
        await client.echo()
        body = await client.body()
        with pytest.raises(CodecError):
            CODEC.decode(body)
        mock.faults.clear()
        stan = await client.echo()
        assert (await client.reply())[1][11] == stan  # framing intact: the next reply reads fine
    assert mock.faults.counts["garbage"] == 1


async def test_garbage_before_the_reply() -> None:
    mock = icbc()
    mock.faults.set(garbage=True, garbage_mode="before")
    async with serving(mock) as client:
        stan = await client.echo()
        with pytest.raises(CodecError):
            CODEC.decode(await client.body())
        mti, fields = await client.reply()
    assert (mti, fields[11]) == ("0810", stan)


async def test_raw_garbage_announces_more_than_max_frame() -> None:
    mock = icbc()
    mock.faults.set(garbage=True, garbage_framed=False)
    async with serving(mock) as client:
        await client.echo()
        with anyio.fail_after(READ_LIMIT):
            head = await client.reader.receive_exactly(2)
    assert int.from_bytes(head, "big") > 4096


async def test_duplicate_sends_the_reply_twice() -> None:
    mock = icbc()
    before = mock.balance_of(CARD)
    mock.faults.set(duplicate=True)
    async with serving(mock) as client:
        stan = await client.consume(250)
        first, second = await client.body(), await client.body()
    assert first == second and CODEC.decode(first)[1][11] == stan
    assert mock.balance_of(CARD) == before - 250 and mock.faults.counts["duplicated"] == 1


async def test_reorder_sends_a_batch_newest_first() -> None:
    mock = icbc()
    mock.faults.set(reorder=3, reorder_hold=10.0)
    async with serving(mock) as client:
        stans = [await client.echo() for _ in range(3)]
        got = [(await client.reply())[1][11] for _ in range(3)]
    assert got == stans[::-1]
    assert mock.faults.counts["reordered"] == 3


async def test_reorder_sends_a_batch_that_does_not_fill_after_the_hold() -> None:
    mock = icbc()
    mock.faults.set(reorder=5, reorder_hold=0.05)
    async with serving(mock) as client:
        stans = [await client.echo() for _ in range(2)]
        assert await until(lambda: mock.faults.replies == 2)
        got = [(await client.reply())[1][11] for _ in range(2)]
    assert sorted(got) == sorted(stans)  # nothing held for ever


async def test_knobs_validate_and_change_nothing_on_error() -> None:
    faults = IssuerFaults()
    with pytest.raises(ValueError):
        faults.set(drop=2, bogus=1)
    with pytest.raises(ValueError):
        faults.set(drop=1.5)
    with pytest.raises(ValueError):
        faults.set(drop=3, reorder=1000)
    with pytest.raises(ValueError):
        faults.set(garbage_mode="after")
    assert not faults.active
    faults.set(duplicate=0.25, reorder=4)
    assert faults.duplicate == Trigger(probability=0.25) and faults.reorder == 4 and faults.active
    faults.clear()
    assert not faults.active
