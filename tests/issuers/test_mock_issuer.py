"""Mock issuers and wallets over real TCP on 127.0.0.1 (specs/issuer.md, protocol §14)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from switch.adapters.issuer_link import frame, issuer_codec, receive_frame
from switch.core.codec import Fields
from switch.crypto.des import des_ecb_encrypt
from switch.crypto.pin import encrypt_pin_block
from switch.issuers.cards import demo_issuers
from switch.issuers.mock import MockIssuer, MockWallet, mock_from_demo
from switch.issuers.run import run_demo_issuers, serve_issuer

pytestmark = pytest.mark.anyio

CODEC = issuer_codec()
RICH = "6222029375642931684"  # ICBC, 1,000,000.00
POOR = "6222028992986377539"  # ICBC, 100.00
EXPIRED = "6222021007789355041"
LOST = "6222029410528228689"
STOLEN = "6222023650908004509"
CMB_REFUSES_CREDIT = "6214832139821214"
AUTH_CODE = re.compile(r"^[A-Z0-9]{6}$")


class Client:
    """A raw issuer-dialect client: one request, one reply, in order."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)
        self.stan = 0

    async def request(self, mti: str, fields: Fields) -> tuple[str, Fields]:
        if 11 not in fields:
            self.stan += 1
            fields[11] = f"{self.stan:06d}"
        fields.setdefault(7, "1126120000")
        await self.stream.send(frame(CODEC.encode(mti, fields)))
        return CODEC.decode(await receive_frame(self.reader, 4096))


@asynccontextmanager
async def serving(mock: MockIssuer) -> AsyncIterator[Client]:
    async with anyio.create_task_group() as tg:
        port = await tg.start(mock.serve, "127.0.0.1", 0)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            yield Client(stream)
        tg.cancel_scope.cancel()


def icbc() -> MockIssuer:
    return mock_from_demo(demo_issuers()["ICBC"])


def consume(pan: str, amount_fen: int, **extra: str | bytes) -> Fields:
    fields: Fields = {2: pan, 3: "000000", 4: f"{amount_fen:012d}", 22: "012", 32: "48521000",
                      37: "633012000001", 41: "10000001", 42: "898310048990001", 49: "156"}
    fields.update({int(k[1:]): v for k, v in extra.items()})
    return fields


async def test_consume_approved_debits_and_echoes() -> None:
    mock = icbc()
    async with serving(mock) as client:
        mti, reply = await client.request("0200", consume(RICH, 12345))
    assert mti == "0210"
    assert reply[39] == "00"
    assert AUTH_CODE.match(str(reply[38]))
    assert (reply[11], reply[37], reply[41]) == ("000001", "633012000001", "10000001")
    assert reply[4] == "000000012345"
    assert mock.balance_of(RICH) == 100_000_000 - 12345


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        (consume("6222020000000000000", 100), "14"),
        (consume(LOST, 100), "41"),
        (consume(STOLEN, 100), "43"),
        (consume(EXPIRED, 100), "54"),
        (consume(RICH, 100, f14="2001"), "54"),
        (consume(POOR, 10_001), "51"),
        (consume(RICH, 0), "13"),
    ],
    ids=["unknown", "lost", "stolen", "expired-on-file", "expired-f14", "insufficient", "zero-amount"],
)
async def test_card_declines(fields: Fields, code: str) -> None:
    mock = icbc()
    pan = str(fields[2])
    before = mock.balance_of(pan) if pan in (RICH, POOR, EXPIRED, LOST, STOLEN) else None
    async with serving(mock) as client:
        mti, reply = await client.request("0200", fields)
    assert (mti, reply[39]) == ("0210", code)
    assert 38 not in reply
    if before is not None:
        assert mock.balance_of(pan) == before


async def test_expiry_from_track2_and_pan_from_track() -> None:
    mock = icbc()
    async with serving(mock) as client:
        swipe = consume(RICH, 100)
        del swipe[2]
        swipe[35] = f"{RICH}=20011010000000000"  # track says 2001: expired, though on file 3012
        _, expired = await client.request("0200", swipe)
        swipe = dict(swipe)
        del swipe[11]
        swipe[35] = f"{RICH}=30121010000000000"
        _, approved = await client.request("0200", swipe)
    assert expired[39] == "54"
    assert approved[39] == "00"
    assert mock.balance_of(RICH) == 100_000_000 - 100


async def test_expiry_is_compared_with_the_current_month() -> None:
    mock = MockIssuer("T", demo_issuers()["ICBC"].cards, bytes(16),
                      clock=lambda: datetime(2030, 12, 31, 23, 0))
    assert mock.handle("0200", consume(RICH, 1, f11="000001", f7="1231150000"))[1][39] == "00"  # type: ignore[index]
    mock = MockIssuer("T", demo_issuers()["ICBC"].cards, bytes(16),
                      clock=lambda: datetime(2031, 1, 1, 0, 0))
    assert mock.handle("0200", consume(RICH, 1, f11="000001", f7="1231160000"))[1][39] == "54"  # type: ignore[index]


async def test_pin_right_wrong_and_undecodable() -> None:
    mock = icbc()
    zpk = mock.zpk
    async with serving(mock) as client:
        _, right = await client.request("0200", consume(RICH, 100, f52=encrypt_pin_block(zpk, "123456", RICH)))
        _, wrong = await client.request("0200", consume(RICH, 100, f52=encrypt_pin_block(zpk, "654321", RICH)))
        garbage = des_ecb_encrypt(zpk, bytes.fromhex("FFFFFFFFFFFFFFFF"))  # control nibble F: not format 0
        _, bad = await client.request("0200", consume(RICH, 100, f52=garbage))
        other_key = encrypt_pin_block(bytes(range(16)), "123456", RICH)
        _, wrong_key = await client.request("0200", consume(RICH, 100, f52=other_key))
    assert [right[39], wrong[39], bad[39]] == ["00", "55", "55"]
    assert wrong_key[39] == "55"
    assert mock.balance_of(RICH) == 100_000_000 - 100


async def test_balance_inquiry_carries_f54() -> None:
    mock = icbc()
    async with serving(mock) as client:
        mti, reply = await client.request(
            "0100", {2: POOR, 3: "310000", 22: "011", 41: "10000001", 49: "156",
                     52: encrypt_pin_block(mock.zpk, "123456", POOR)})
    assert (mti, reply[39]) == ("0110", "00")
    assert reply[54] == "1002156C000000010000"
    assert 38 not in reply


async def test_reversal_restores_once_and_unknown_original_is_25() -> None:
    mock = icbc()
    async with serving(mock) as client:
        original = consume(RICH, 5000, f11="000777", f7="1126121212", f37="633012000777")
        _, approved = await client.request("0200", original)
        assert approved[39] == "00"
        assert mock.balance_of(RICH) == 100_000_000 - 5000
        f90 = "0200" + "000777" + "1126121212" + "00048521000" + "0" * 11
        reversal: Fields = {2: RICH, 3: "000000", 4: "000000005000", 32: "48521000", 90: f90}
        mti, first = await client.request("0400", dict(reversal))
        _, again = await client.request("0400", dict(reversal))
        unknown = {**reversal, 90: "0200" + "000778" + "1126121212" + "0" * 22}
        _, missing = await client.request("0400", unknown)
    assert (mti, first[39], again[39], missing[39]) == ("0410", "00", "00", "25")
    assert mock.balance_of(RICH) == 100_000_000


async def test_reversal_by_rrn_and_of_a_declined_original() -> None:
    mock = icbc()
    async with serving(mock) as client:
        _, approved = await client.request("0200", consume(POOR, 3000, f37="000000000101"))
        _, declined = await client.request("0200", consume(POOR, 9000, f37="000000000102"))
        _, rev_approved = await client.request("0400", {2: POOR, 4: "000000003000", 37: "000000000101"})
        _, rev_declined = await client.request("0400", {2: POOR, 4: "000000009000", 37: "000000000102"})
    assert (approved[39], declined[39]) == ("00", "51")
    assert (rev_approved[39], rev_declined[39]) == ("00", "00")
    assert mock.balance_of(POOR) == 10_000


async def test_retransmission_gets_the_same_answer_and_debits_once() -> None:
    mock = icbc()
    async with serving(mock) as client:
        request = consume(RICH, 700, f11="000900", f7="1126101010")
        _, first = await client.request("0200", dict(request))
        _, second = await client.request("0200", dict(request))
    assert first == second and first[39] == "00"
    assert mock.balance_of(RICH) == 100_000_000 - 700


async def test_refund_without_original_credits_void_without_original_is_25() -> None:
    cmb = mock_from_demo(demo_issuers()["CMB"])
    async with serving(cmb) as client:
        _, refused = await client.request("0220", {**consume(CMB_REFUSES_CREDIT, 100), 3: "200000"})
        _, refund = await client.request("0220", {**consume("6214834474520070", 100), 3: "200000"})
        _, void = await client.request("0200", {**consume("6214834474520070", 50), 3: "200000"})
    assert (refused[39], refund[39], void[39]) == ("05", "00", "25")
    assert cmb.balance_of(CMB_REFUSES_CREDIT) == 0
    assert cmb.balance_of("6214834474520070") == 2_000_000 + 100


async def test_pre_auth_holds_and_completion_captures() -> None:
    mock = icbc()
    async with serving(mock) as client:
        _, pre = await client.request("0100", {**consume(POOR, 6000), 3: "030000"})
        assert pre[39] == "00"
        assert (mock.balance_of(POOR), mock.available_of(POOR)) == (10_000, 4000)
        _, completion = await client.request("0200", consume(POOR, 6900, f38=str(pre[38])))
        _, again = await client.request("0200", consume(POOR, 100, f38=str(pre[38])))
    assert completion[39] == "00" and completion[38] == pre[38]
    assert again[39] == "25"
    assert mock.balance_of(POOR) == mock.available_of(POOR) == 10_000 - 6900


async def test_echo_and_unsupported_processing_code() -> None:
    async with serving(icbc()) as client:
        echo = await client.request("0800", {})
        unsupported = await client.request("0200", consume(RICH, 1, f3="990000"))
    assert echo[0] == "0810" and echo[1][39] == "00" and echo[1][11] == "000001"
    assert unsupported[0] == "0210" and unsupported[1][39] == "40"


async def test_undecodable_request_with_stan_gets_30() -> None:
    async with serving(icbc()) as client:
        body = CODEC.encode("0200", consume(RICH, 1, f11="000005", f7="1126120000"))
        await client.stream.send(frame(body[:-5]))  # F49 cut short
        mti, reply = CODEC.decode(await receive_frame(client.reader, 4096))
    assert (mti, reply[11], reply[39]) == ("0210", "000005", "30")


@pytest.mark.parametrize("wallet_id", ["WECHAT", "ALIPAY"])
async def test_wallet_limit_and_code_length(wallet_id: str) -> None:
    wallet = mock_from_demo(demo_issuers()[wallet_id])
    assert isinstance(wallet, MockWallet)
    code = "134567890123456789" if wallet_id == "WECHAT" else "284567890123456789"
    scan = {3: "000000", 22: "032", 41: "10000001", 49: "156"}
    async with serving(wallet) as client:
        _, limit = await client.request("0200", {**scan, 2: code, 4: "000000500000"})
        _, above = await client.request("0200", {**scan, 2: code, 4: "000000500001"})
        _, short = await client.request("0200", {**scan, 2: code[:17], 4: "000000000100"})
        _, inquiry = await client.request("0100", {2: code, 3: "310000", 41: "10000001"})
    assert limit[39] == "00" and AUTH_CODE.match(str(limit[38]))
    assert (above[39], short[39], inquiry[39]) == ("51", "14", "40")
    assert wallet.captured_fen == 500_000


async def test_silent_issuer_reads_and_never_answers() -> None:
    slow = mock_from_demo(demo_issuers()["SLOW"])
    assert slow.behaviour == "silent"
    async with serving(slow) as client:
        await client.stream.send(frame(CODEC.encode("0800", {7: "1126120000", 11: "000001"})))
        await client.stream.send(frame(CODEC.encode("0200", consume("6228489187204683748", 1, f11="000002"))))
        await client.stream.send_eof()
        received = b""
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            for _ in range(10):  # bounded: the server closes after our EOF
                received += await client.stream.receive()
    assert received == b""
    assert slow.frames_received == 2


async def test_run_demo_issuers_reports_every_listening_issuer() -> None:
    async with anyio.create_task_group() as tg:
        ports = await tg.start(run_demo_issuers, "127.0.0.1", None)
        assert set(ports) == {"ICBC", "CMB", "SLOW", "WECHAT", "ALIPAY"}
        assert len(set(ports.values())) == 5
        for name in ("ICBC", "CMB", "WECHAT", "ALIPAY"):
            async with await anyio.connect_tcp("127.0.0.1", ports[name]) as stream:
                mti, reply = await Client(stream).request("0800", {})
                assert (mti, reply[39]) == ("0810", "00"), name
        tg.cancel_scope.cancel()


async def test_serve_issuer_by_name() -> None:
    with pytest.raises(ValueError):
        await serve_issuer("BOC", "127.0.0.1", 0)
    with pytest.raises(ValueError):
        await serve_issuer("NOPE", "127.0.0.1", 0)
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_issuer, "CMB", "127.0.0.1", 0)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            _, reply = await Client(stream).request("0200", consume("6214834474520070", 100))
        assert reply[39] == "00"
        tg.cancel_scope.cancel()


def test_card_repr_masks_pan_and_hides_pin() -> None:
    card = demo_issuers()["ICBC"].cards[0]
    assert RICH not in repr(card) and "123456" not in repr(card)
    assert "622202...1684" in repr(card)


def test_demo_fixture_matches_section_14() -> None:
    fixture = demo_issuers()
    assert {i: len(d.cards) for i, d in fixture.items()} == {
        "ICBC": 5, "CMB": 3, "SLOW": 1, "BOC": 1, "WECHAT": 0, "ALIPAY": 0}
    assert [d.issuer_id for d in fixture.values() if not d.listens] == ["BOC"]
    assert fixture["WECHAT"].prefixes == ("10", "11", "12", "13", "14", "15")
    assert fixture["ALIPAY"].prefixes == ("25", "26", "27", "28", "29", "30")
    assert all(len(d.zpk) == 16 for d in fixture.values())
    fixture["ICBC"].cards[0].balance_fen = 0
    assert demo_issuers()["ICBC"].cards[0].balance_fen == 100_000_000  # fresh copy each call
