"""Mock issuers over real TCP on 127.0.0.1: the full transaction set (specs/issuer.md).

Repeats 0401/0221 with new F11/F7, voids that find their original by F90 or F37, completion voids
that re-open the hold, reversals of voids, completions, pre-auths and pre-auth voids, transfer
legs, wallets, available funds in F54, the ``blackhole`` and ``silent`` behaviours flipped while
serving, and the ``effects`` record."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from switch.adapters.issuer_link import frame, issuer_codec, receive_frame
from switch.core.codec import Fields
from switch.issuers.cards import demo_issuers
from switch.issuers.mock import Effect, MockIssuer, MockWallet, mock_from_demo

pytestmark = pytest.mark.anyio

CODEC = issuer_codec()
RICH = "6222029375642931684"  # ICBC, 1,000,000.00
POOR = "6222028992986377539"  # ICBC, 100.00
CMB_SOURCE = "6214834474520070"  # 20,000.00
CMB_DEST = "6214831675710245"  # 0.00
CMB_REFUSES_CREDIT = "6214832139821214"
F7 = "1126120000"


class Client:
    """A raw issuer-dialect client. ``request`` stamps F11 (its own counter) and F7 into the
    caller's dict, so a test can name that request in a later F90."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)
        self.stan = 0

    async def send(self, mti: str, fields: Fields) -> None:
        if 11 not in fields:
            self.stan += 1
            fields[11] = f"{self.stan:06d}"
        fields.setdefault(7, F7)
        await self.stream.send(frame(CODEC.encode(mti, fields)))

    async def read(self) -> tuple[str, Fields]:
        return CODEC.decode(await receive_frame(self.reader, 4096))

    async def request(self, mti: str, fields: Fields) -> tuple[str, Fields]:
        await self.send(mti, fields)
        return await self.read()


@asynccontextmanager
async def serving(mock: MockIssuer) -> AsyncIterator[Client]:
    async with anyio.create_task_group() as tg:
        port = await tg.start(mock.serve, "127.0.0.1", 0)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            yield Client(stream)
        tg.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for the server to have processed what was sent; the caller asserts."""
    for _ in range(2000):
        if condition():
            return
        await anyio.sleep(0.005)


def issuer(name: str) -> MockIssuer:
    return mock_from_demo(demo_issuers()[name])


def wallet(name: str) -> MockWallet:
    mock = mock_from_demo(demo_issuers()[name])
    assert isinstance(mock, MockWallet)
    return mock


def req(pan: str, f3: str, amount_fen: int | None, rrn: str, **extra: str | bytes) -> Fields:
    fields: Fields = {2: pan, 3: f3, 22: "012", 32: "48521000", 37: rrn, 41: "10000001",
                      42: "898310048990001", 49: "156"}
    if amount_fen is not None:
        fields[4] = f"{amount_fen:012d}"
    fields.update({int(k[1:]): v for k, v in extra.items()})
    return fields


def f90(mti: str, original: Fields) -> str:
    """Original data elements naming ``original`` as sent: MTI + F11 + F7 + acquirer + zeros."""
    return mti + str(original[11]) + str(original[7]) + "00048521000" + "0" * 11


def available_in_f54(reply: Fields) -> int:
    value = str(reply[54])
    assert value[:7] == "1002156"
    return (1 if value[7] == "C" else -1) * int(value[8:])


async def balance_inquiry(client: Client, pan: str) -> int:
    mti, reply = await client.request("0100", req(pan, "310000", None, "000000000000"))
    assert (mti, reply[39]) == ("0110", "00")
    return available_in_f54(reply)


# ---- behaviours ------------------------------------------------------------------------------
async def test_blackhole_debits_without_reply_then_0401_by_f90_restores_once() -> None:
    mock = issuer("ICBC")
    mock.behaviour = "blackhole"
    async with serving(mock) as client:
        lost = req(RICH, "000000", 5000, "633012000501")
        await client.send("0200", lost)
        await until(lambda: bool(mock.applied("consume")))
        assert mock.balance_of(RICH) == 100_000_000 - 5000  # debited, no reply sent
        mock.behaviour = "normal"
        echo_mti, echo = await client.request("0800", {11: "000099"})
        # the first frame back answers the echo: the consume's reply was never sent
        assert (echo_mti, echo[11], echo[39]) == ("0810", "000099", "00")
        first: Fields = {2: RICH, 3: "000000", 4: "000000005000", 11: "000100", 7: "1126120105",
                         32: "48521000", 37: "633012000501", 39: "98", 90: f90("0200", lost)}
        mti1, rev1 = await client.request("0401", first)
        assert mock.balance_of(RICH) == 100_000_000
        second = {**first, 11: "000101", 7: "1126120205"}  # a new repeat, new F11 and F7
        mti2, rev2 = await client.request("0401", second)
    assert (mti1, rev1[39], rev1[11]) == ("0410", "00", "000100")
    assert (mti2, rev2[39], rev2[11]) == ("0410", "00", "000101")
    assert mock.balance_of(RICH) == 100_000_000
    assert mock.applied("consume") == [Effect("consume", "622202*********1684", 5000)]
    assert mock.applied("reversal") == [Effect("reversal", "622202*********1684", 5000, "consume")]


async def test_silent_applies_nothing_and_answers_again_once_normal() -> None:
    mock = issuer("ICBC")
    mock.behaviour = "silent"
    async with serving(mock) as client:
        await client.send("0200", req(RICH, "000000", 700, "633012000601"))
        await until(lambda: mock.frames_received == 1)
        assert mock.frames_received == 1
        mock.behaviour = "normal"
        mti, reply = await client.request("0200", req(RICH, "000000", 800, "633012000602"))
    assert (mti, reply[39]) == ("0210", "00")
    assert mock.balance_of(RICH) == 100_000_000 - 800
    assert [e.amount_fen for e in mock.effects] == [800]


def test_blackhole_handle_returns_nothing_but_applies() -> None:
    mock = issuer("ICBC")
    mock.behaviour = "blackhole"
    request = req(POOR, "000000", 1000, "633012000701", f11="000001", f7=F7)
    assert mock.handle("0200", request) is None
    assert mock.balance_of(POOR) == 9000
    mock.behaviour = "normal"
    again = mock.handle("0200", dict(request))  # retransmission: the recorded answer, no new debit
    assert again is not None and again[0] == "0210" and again[1][39] == "00"
    assert mock.balance_of(POOR) == 9000


# ---- repeats ---------------------------------------------------------------------------------
async def test_reversal_repeat_0401_by_rrn_with_new_stans() -> None:
    mock = issuer("ICBC")
    async with serving(mock) as client:
        _, approved = await client.request("0200", req(POOR, "000000", 3000, "633012000801"))
        base: Fields = {2: POOR, 3: "000000", 4: "000000003000", 37: "633012000801", 39: "98"}
        replies = [await client.request("0401", dict(base)) for _ in range(3)]
        _, unknown = await client.request("0401", {**base, 37: "633012000899"})
    assert approved[39] == "00"
    assert [(m, r[39]) for m, r in replies] == [("0410", "00")] * 3
    assert unknown[39] == "25"
    assert mock.balance_of(POOR) == 10_000
    assert len(mock.applied("reversal")) == 1


async def test_advice_repeat_0221_after_a_lost_answer_applies_once() -> None:
    mock = issuer("ICBC")
    async with serving(mock) as client:
        _, pre = await client.request("0100", req(POOR, "030000", 6000, "633012000901"))
        mock.behaviour = "blackhole"
        advice = req(POOR, "000000", 6500, "633012000902", f38=str(pre[38]))
        await client.send("0220", advice)
        await until(lambda: bool(mock.applied("completion_advice")))
        mock.behaviour = "normal"
        without_rrn = {k: v for k, v in advice.items() if k != 37}  # F90 alone names the first
        by_f90 = {**without_rrn, 11: "000201", 7: "1126121000", 90: f90("0220", advice)}
        mti1, first = await client.request("0221", by_f90)
        by_rrn = {**advice, 11: "000202", 7: "1126121100"}  # no F90: same F37, F3, F4 and card
        mti2, second = await client.request("0221", by_rrn)
    assert (mti1, first[39], first[11], first[38]) == ("0230", "00", "000201", pre[38])
    assert (mti2, second[39], second[11]) == ("0230", "00", "000202")
    assert mock.balance_of(POOR) == mock.available_of(POOR) == 10_000 - 6500
    assert len(mock.applied("completion_advice")) == 1


async def test_advice_repeat_0221_never_seen_is_processed_as_new() -> None:
    mock = issuer("CMB")
    async with serving(mock) as client:
        refund = req(CMB_SOURCE, "200000", 1200, "633012001001")
        mti, reply = await client.request("0221", refund)
    assert (mti, reply[39]) == ("0230", "00")
    assert mock.balance_of(CMB_SOURCE) == 2_000_000 + 1200


# ---- voids -----------------------------------------------------------------------------------
async def test_consume_void_by_f90_credits_once_second_void_is_12() -> None:
    mock = issuer("ICBC")
    async with serving(mock) as client:
        original = req(POOR, "000000", 4000, "633012001101")
        _, sale = await client.request("0200", original)
        void = req(POOR, "200000", 4000, "633012001101", f90=f90("0200", original))
        mti, voided = await client.request("0200", void)
        _, twice = await client.request("0200", {**void, 11: "000050"})
    assert sale[39] == "00"
    assert (mti, voided[39], twice[39]) == ("0210", "00", "12")
    assert mock.balance_of(POOR) == 10_000
    assert mock.applied("void") == [Effect("void", "622202*********7539", 4000)]


async def test_consume_void_by_rrn_unknown_declined_and_other_card() -> None:
    mock = issuer("ICBC")
    async with serving(mock) as client:
        await client.request("0200", req(POOR, "000000", 2500, "633012001201"))
        await client.request("0200", req(POOR, "000000", 99_999, "633012001202"))  # declined 51
        _, by_rrn = await client.request("0200", req(POOR, "200000", 2500, "633012001201"))
        _, unknown = await client.request("0200", req(POOR, "200000", 2500, "633012001299"))
        _, of_declined = await client.request("0200", req(POOR, "200000", 99_999, "633012001202"))
        await client.request("0200", req(RICH, "000000", 100, "633012001203"))
        _, other_card = await client.request("0200", req(POOR, "200000", 100, "633012001203"))
    assert (by_rrn[39], unknown[39], of_declined[39], other_card[39]) == ("00", "25", "25", "64")
    assert mock.balance_of(POOR) == 10_000
    assert mock.balance_of(RICH) == 100_000_000 - 100


async def test_completion_void_reopens_the_hold_and_the_pre_auth_completes_again() -> None:
    mock = issuer("ICBC")
    async with serving(mock) as client:
        _, pre = await client.request("0100", req(POOR, "030000", 6000, "633012001301"))
        auth = str(pre[38])
        completion = req(POOR, "000000", 5000, "633012001302", f38=auth)
        _, done = await client.request("0200", completion)
        assert (mock.balance_of(POOR), mock.available_of(POOR)) == (5000, 5000)
        void = req(POOR, "200000", 5000, "633012001302", f38=auth, f90=f90("0200", completion))
        _, voided = await client.request("0200", void)
        assert (mock.balance_of(POOR), mock.available_of(POOR)) == (10_000, 4000)
        seen_after_void = await balance_inquiry(client, POOR)
        _, again = await client.request("0200", req(POOR, "000000", 3000, "633012001303", f38=auth))
        _, old_void_again = await client.request("0200", {**void, 11: "000060"})
    assert (done[39], voided[39], again[39], old_void_again[39]) == ("00", "00", "00", "12")
    assert seen_after_void == 4000
    assert (mock.balance_of(POOR), mock.available_of(POOR)) == (7000, 7000)
    assert [e.kind for e in mock.effects] == ["pre_auth", "completion", "completion_void", "completion"]


async def test_completion_void_then_pre_auth_void_releases() -> None:
    mock = issuer("ICBC")
    async with serving(mock) as client:
        _, pre = await client.request("0100", req(POOR, "030000", 6000, "633012001401"))
        auth = str(pre[38])
        completion = req(POOR, "000000", 6000, "633012001402", f38=auth)
        await client.request("0200", completion)
        _, before = await client.request("0100", req(POOR, "200000", 6000, "633012001401", f38=auth))
        await client.request("0200", req(POOR, "200000", 6000, "633012001402", f38=auth))  # by F37
        _, after = await client.request("0100", req(POOR, "200000", 6000, "633012001401", f38=auth))
    assert (before[39], after[39]) == ("25", "00")  # the hold was closed, then open again
    assert mock.balance_of(POOR) == mock.available_of(POOR) == 10_000


# ---- reversals -------------------------------------------------------------------------------
def reversal_of(mti: str, original: Fields, stan: str) -> Fields:
    return {k: original[k] for k in (2, 3, 4, 37) if k in original} | {
        11: stan, 7: "1126130000", 32: "48521000", 39: "98", 90: f90(mti, original)}


async def test_reversal_of_a_void_debits_again_and_the_sale_can_be_voided_again() -> None:
    mock = issuer("ICBC")
    async with serving(mock) as client:
        sale = req(POOR, "000000", 4000, "633012001501")
        await client.request("0200", sale)
        void = req(POOR, "200000", 4000, "633012001501", f90=f90("0200", sale))
        await client.request("0200", void)
        assert mock.balance_of(POOR) == 10_000
        mti, undone = await client.request("0400", reversal_of("0200", void, "000070"))
        _, repeat = await client.request("0401", reversal_of("0200", void, "000071"))
        assert mock.balance_of(POOR) == 6000
        _, new_void = await client.request("0200", {**void, 11: "000072"})
    assert (mti, undone[39], repeat[39], new_void[39]) == ("0410", "00", "00", "00")
    assert mock.balance_of(POOR) == 10_000
    assert mock.applied("reversal") == [Effect("reversal", "622202*********7539", 4000, "void")]


async def test_reversal_of_a_completion_void_recaptures_and_closes_the_hold() -> None:
    mock = issuer("ICBC")
    async with serving(mock) as client:
        _, pre = await client.request("0100", req(POOR, "030000", 6000, "633012001601"))
        completion = req(POOR, "000000", 5000, "633012001602", f38=str(pre[38]))
        await client.request("0200", completion)
        void = req(POOR, "200000", 5000, "633012001602", f38=str(pre[38]), f90=f90("0200", completion))
        await client.request("0200", void)
        _, undone = await client.request("0400", reversal_of("0200", void, "000080"))
        _, completes_again = await client.request("0200", req(POOR, "000000", 1, "633012001603", f38=str(pre[38])))
    assert (undone[39], completes_again[39]) == ("00", "25")
    assert (mock.balance_of(POOR), mock.available_of(POOR)) == (5000, 5000)


async def test_reversal_of_a_completion_restores_the_hold() -> None:
    mock = issuer("ICBC")
    async with serving(mock) as client:
        _, pre = await client.request("0100", req(POOR, "030000", 6000, "633012001701"))
        completion = req(POOR, "000000", 6500, "633012001702", f38=str(pre[38]))
        await client.request("0200", completion)
        assert (mock.balance_of(POOR), mock.available_of(POOR)) == (3500, 3500)
        _, undone = await client.request("0400", reversal_of("0200", completion, "000090"))
        assert (mock.balance_of(POOR), mock.available_of(POOR)) == (10_000, 4000)
        _, again = await client.request("0200", req(POOR, "000000", 2000, "633012001703", f38=str(pre[38])))
    assert (undone[39], again[39]) == ("00", "00")
    assert mock.balance_of(POOR) == mock.available_of(POOR) == 8000


async def test_reversal_of_a_pre_auth_releases_and_of_a_pre_auth_void_restores() -> None:
    mock = issuer("ICBC")
    async with serving(mock) as client:
        first = req(POOR, "030000", 3000, "633012001801")
        _, pre1 = await client.request("0100", first)
        _, released = await client.request("0400", reversal_of("0100", first, "000110"))
        assert mock.available_of(POOR) == 10_000
        _, pre2 = await client.request("0100", req(POOR, "030000", 2000, "633012001802"))
        pre_void = req(POOR, "200000", 2000, "633012001802", f38=str(pre2[38]))
        _, voided = await client.request("0100", pre_void)
        assert mock.available_of(POOR) == 10_000
        _, restored = await client.request("0400", reversal_of("0100", pre_void, "000111"))
        seen = await balance_inquiry(client, POOR)
        _, completes = await client.request("0200", req(POOR, "000000", 2000, "633012001803", f38=str(pre2[38])))
        _, first_completes = await client.request("0200", req(POOR, "000000", 10, "633012001804", f38=str(pre1[38])))
    assert (released[39], voided[39], restored[39], completes[39]) == ("00", "00", "00", "00")
    assert first_completes[39] == "25"
    assert seen == 8000
    assert mock.balance_of(POOR) == mock.available_of(POOR) == 8000


async def test_balance_inquiry_f54_shows_available_funds_after_a_pre_auth() -> None:
    mock = issuer("ICBC")
    async with serving(mock) as client:
        before = await balance_inquiry(client, POOR)
        _, pre = await client.request("0100", req(POOR, "030000", 6000, "633012001901"))
        after = await balance_inquiry(client, POOR)
        _, too_much = await client.request("0200", req(POOR, "000000", 4001, "633012001902"))
    assert (before, after) == (10_000, 4000)
    assert (pre[39], too_much[39]) == ("00", "51")  # the hold is not spendable
    assert mock.balance_of(POOR) == 10_000


# ---- transfers -------------------------------------------------------------------------------
async def test_transfer_legs_are_reversible_by_f90() -> None:
    mock = issuer("CMB")
    async with serving(mock) as client:
        debit = req(CMB_SOURCE, "400000", 30_000, "633012002001", f48=CMB_DEST)
        credit = req(CMB_DEST, "260000", 30_000, "633012002001", f48=CMB_SOURCE)
        _, debited = await client.request("0200", debit)
        _, credited = await client.request("0200", credit)
        assert (mock.balance_of(CMB_SOURCE), mock.balance_of(CMB_DEST)) == (1_970_000, 30_000)
        _, undo_credit = await client.request("0400", reversal_of("0200", credit, "000120"))
        _, undo_debit = await client.request("0401", reversal_of("0200", debit, "000121"))
        _, undo_debit_again = await client.request("0401", reversal_of("0200", debit, "000122"))
        _, refused = await client.request("0200", req(CMB_REFUSES_CREDIT, "260000", 100, "633012002002"))
    assert (debited[39], credited[39], undo_credit[39], undo_debit[39]) == ("00", "00", "00", "00")
    assert (undo_debit_again[39], refused[39]) == ("00", "05")
    assert (mock.balance_of(CMB_SOURCE), mock.balance_of(CMB_DEST)) == (2_000_000, 0)
    assert sorted(str(e.reverses) for e in mock.applied("reversal")) == ["transfer_credit", "transfer_debit"]


# ---- wallets ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("wallet_id", "code"), [("WECHAT", "134567890123456789"), ("ALIPAY", "284567890123456789")])
async def test_wallet_void_refund_and_reversal(wallet_id: str, code: str) -> None:
    mock = wallet(wallet_id)
    async with serving(mock) as client:
        first = req(code, "000000", 10_000, "633012002101", f22="032")
        second = req(code, "000000", 20_000, "633012002102", f22="032")
        await client.request("0200", first)
        await client.request("0200", second)
        assert mock.captured_fen == 30_000
        void = req(code, "200000", 10_000, "633012002101", f22="032", f90=f90("0200", first))
        _, voided = await client.request("0200", void)
        _, void_twice = await client.request("0200", {**void, 11: "000130"})
        assert mock.captured_fen == 20_000
        _, refund1 = await client.request("0220", req(code, "200000", 15_000, "633012002102"))
        _, refund2 = await client.request("0220", req(code, "200000", 5001, "633012002102"))
        _, refund3 = await client.request("0220", req(code, "200000", 5000, "633012002102"))
        assert mock.captured_fen == 0
        _, unmatched = await client.request("0220", req(code, "200000", 1, "633012002199"))
        _, unknown_void = await client.request("0200", req(code, "200000", 1, "633012002198"))
        _, undo_void = await client.request("0400", reversal_of("0200", void, "000131"))
        third = req(code, "000000", 700, "633012002103", f22="032")
        await client.request("0200", third)
        _, by_rrn = await client.request("0401", {2: code, 3: "000000", 4: "000000000700", 37: "633012002103"})
    assert (voided[39], void_twice[39]) == ("00", "12")
    assert (refund1[39], refund2[39], refund3[39]) == ("00", "64", "00")
    assert (unmatched[39], unknown_void[39], undo_void[39], by_rrn[39]) == ("64", "25", "00", "00")
    assert mock.captured_fen == 10_000  # the void's reversal took the first payment again
    assert [e.amount_fen for e in mock.applied("refund")] == [15_000, 5000]
    assert len(mock.applied("reversal")) == 2


async def test_wallet_refund_beyond_captured_total_without_original_is_64() -> None:
    mock = wallet("WECHAT")
    async with serving(mock) as client:
        await client.request("0200", req("104567890123456789", "000000", 800, "633012002201", f22="032"))
        _, too_much = await client.request("0220", req("104567890123456789", "200000", 801, "633012002299"))
        _, enough = await client.request("0220", req("104567890123456789", "200000", 800, "633012002298"))
    assert (too_much[39], enough[39]) == ("64", "00")
    assert mock.captured_fen == 0


async def test_blackhole_wallet_payment_reversed_by_f90() -> None:
    mock = wallet("ALIPAY")
    mock.behaviour = "blackhole"
    async with serving(mock) as client:
        payment = req("254567890123456789", "000000", 4321, "633012002301", f22="032")
        await client.send("0200", payment)
        await until(lambda: mock.captured_fen == 4321)
        assert mock.captured_fen == 4321
        mock.behaviour = "normal"
        mti, reply = await client.request("0401", reversal_of("0200", payment, "000140"))
    assert (mti, reply[39], reply[11]) == ("0410", "00", "000140")
    assert mock.captured_fen == 0
