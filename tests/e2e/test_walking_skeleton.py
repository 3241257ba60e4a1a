"""The walking skeleton over TCP: sign-on in each key mode, consume and balance with PIN,
every decline of this slice, MAC failures, malformed frames, journal and metrics
(protocol §6-§12, §14, §15)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from switch.core.codec import Codec, load_dialect
from switch.core.framing import encode_frame
from switch.crypto.des import des_ecb_encrypt
from switch.crypto.mac import verify_mac
from switch.pos.client import TerminalClient, TerminalConnectionError

from .conftest import DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CARD = "6222029375642931684"  # ICBC, 1,000,000.00
CARD_POOR = "6222028992986377539"  # ICBC, 100.00
CARD_EXPIRED = "6222021007789355041"
CARD_LOST = "6222029410528228689"
CARD_STOLEN = "6222023650908004509"
CARD_CMB = "6214834474520070"  # PIN 888888
CARD_SLOW = "6228489187204683748"
CARD_BOC = "6216611771534246833"
CARD_NO_ROUTE = "4111237450925694"
CODEC = Codec(load_dialect("terminal"))


def journal(demo: DemoSwitch, where: str = "1=1", params: tuple = ()) -> list[dict]:
    db = sqlite3.connect(f"file:{demo.data_dir / 'switch.db'}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(f"SELECT * FROM journal WHERE {where} ORDER BY id", params)]
    finally:
        db.close()


def sample(demo: DemoSwitch, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(demo.metrics_text()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# ---- sign-on -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode, pik_len, has_tdk", [("001", 8, False), ("003", 16, False), ("004", 16, True)])
async def test_sign_on_each_key_mode(demo: DemoSwitch, mode: str, pik_len: int, has_tdk: bool) -> None:
    term = demo.terminal("10000002")
    async with term.connect():
        r = await term.sign_on(mode)
    assert r.mti == "0810" and r.code == "00"
    assert term.keys is not None and len(term.keys.pik) == pik_len and (term.keys.tdk is not None) == has_tdk
    assert len(r.fields[62]) == {"001": 24, "003": 40, "004": 60}[mode]
    assert str(r.fields[60])[8:11] == mode and str(r.fields[60])[2:8] == term.batch
    for k in (11, 12, 13, 32, 37, 39, 41, 42, 60, 62):
        assert k in r.fields, k
    assert r.fields[32] == "48521000"
    assert 64 not in r.fields


async def test_header_digit6_follows_parameter_download(demo: DemoSwitch) -> None:
    term = demo.terminal("20000001")
    async with term.connect():
        assert (await term.sign_on("003")).header_digit6 == 1  # never downloaded parameters
        p = await term.parameter_download()
        assert p.code == "00" and p.header_digit6 == 0
        assert term.parameters["01"] == "星河超市" and term.parameters["04"] == "MAIN"
        assert term.parameters["06"] == "0.60" and term.parameters["08"] == "156"
        assert (await term.echo_test()).header_digit6 == 0
        off = await term.sign_off()
        assert off.mti == "0830" and off.code == "00" and off.header_digit6 == 3


async def test_every_sign_on_issues_fresh_keys(demo: DemoSwitch) -> None:
    old = demo.terminal()
    async with old.connect():
        await old.sign_on("003")
    new = demo.terminal()
    async with new.connect():
        await new.sign_on("003")
        new.next_stan = 500
        async with old.connect():
            old.next_stan = 501
            r = await old.consume(CARD, 100, pin="123456", expiry="3012")
        assert r.code == "A0"  # the old MAK stopped working
        assert (await new.consume(CARD, 100, pin="123456", expiry="3012")).code == "00"


# ---- consume and balance -------------------------------------------------------------------
async def test_approved_consume_with_pin_moves_the_balance(demo: DemoSwitch) -> None:
    term = demo.terminal()
    async with term.connect():
        await term.sign_on("003")
        before = await term.balance(CARD, pin="123456", expiry="3012")
        assert before.code == "00" and before.mac_ok
        bal = str(before.fields[54])
        assert bal[:8] == "1002156C"
        r = await term.consume(CARD, 12345, pin="123456", expiry="3012")
        after = await term.balance(CARD, pin="123456", expiry="3012")
    assert r.code == "00" and r.mti == "0210"
    assert r.mac_ok is True
    assert len(str(r.fields[38])) == 6 and " " not in str(r.fields[38])
    assert r.fields[2] == CARD  # swipe: the PAN from track 2
    assert r.fields[44] == "ICBC       48521000   "
    assert r.fields[63] == "CUP" and r.fields[32] == "48521000"
    assert r.fields[4] == "000000012345" and r.fields[3] == "000000" and r.fields[25] == "00"
    for k in (11, 12, 13, 15, 37, 41, 42, 49, 60):
        assert k in r.fields
    assert int(str(before.fields[54])[8:]) - int(str(after.fields[54])[8:]) == 12345
    rows = journal(demo, "rrn = ?", (r.fields[37],))
    assert len(rows) == 1
    row = rows[0]
    assert row["response_code"] == "00" and row["amount_fen"] == 12345 and row["fee_fen"] == 74
    assert row["pan_masked"] == "622202*********1684" and row["issuer"] == "ICBC"
    assert row["auth_code"] == r.fields[38] and row["txn"] == "consume"


async def test_manual_entry_consume_at_second_issuer(demo: DemoSwitch) -> None:
    term = demo.terminal("10000002")
    async with term.connect():
        await term.sign_on("003")
        r = await term.consume(CARD_CMB, 5000, pin="888888", entry="manual", expiry="2912")
    assert r.code == "00" and r.fields[44].startswith("CMB ")  # type: ignore[union-attr]
    assert r.fields[2] == CARD_CMB


async def test_single_des_terminal_and_encrypted_track(demo: DemoSwitch) -> None:
    t1 = demo.terminal("10000002")
    async with t1.connect():
        await t1.sign_on("001")
        assert (await t1.consume(CARD, 100, pin="123456", expiry="3012")).code == "00"
        await t1.sign_on("004")
        r = await t1.consume(CARD, 100, pin="123456", expiry="3012", encrypt_track=True)
        assert r.code == "00" and r.fields[2] == CARD


async def test_several_requests_in_flight_on_one_connection_and_one_shot(demo: DemoSwitch) -> None:
    term = demo.terminal()
    results: dict[int, str] = {}
    async with term.connect():
        await term.sign_on("003")

        async def one(i: int) -> None:
            r = await term.consume(CARD, 100 + i, pin="123456", expiry="3012")
            results[i] = f"{r.code}:{r.fields[4]}"

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
        one_shot = await term.balance(CARD, pin="123456", expiry="3012", oneshot=True)
    assert results == {i: f"00:{100 + i:012d}" for i in range(8)}
    assert one_shot.code == "00"


# ---- declines ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "card, amount, pin, expected",
    [
        (CARD_POOR, 20000, "123456", "51"),
        (CARD_EXPIRED, 100, "123456", "54"),
        (CARD, 100, "654321", "55"),
        (CARD_LOST, 100, "123456", "41"),
        (CARD_STOLEN, 100, "123456", "43"),
        (CARD[:-1] + str((int(CARD[-1]) + 1) % 10), 100, "123456", "14"),
        (CARD_NO_ROUTE, 100, None, "15"),
        (CARD_BOC, 100, "123456", "91"),
        (CARD_SLOW, 100, "123456", "98"),
    ],
)
async def test_card_declines(demo: DemoSwitch, card: str, amount: int, pin: str | None, expected: str) -> None:
    term = demo.terminal()
    async with term.connect():
        await term.sign_on("003")
        expiry = "2001" if card == CARD_EXPIRED else "3012"
        r = await term.consume(card, amount, pin=pin, expiry=expiry, timeout=10)
    assert r.code == expected
    assert 38 not in r.fields and 64 not in r.fields
    assert r.fields[63] == "CUP" and 37 in r.fields and 44 in r.fields
    issuer = str(r.fields[44])[:11].strip()
    assert issuer == {"15": "", "14": "", "91": "BOC", "98": "SLOW"}.get(expected, "ICBC")
    rows = journal(demo, "rrn = ?", (r.fields[37],))
    assert [row["response_code"] for row in rows] == [expected]
    if expected == "98":
        assert rows[0]["needs_reversal"] == 1


async def test_unknown_inactive_and_wrong_merchant(demo: DemoSwitch) -> None:
    unknown = TerminalClient("127.0.0.1", demo.port, "99999999", "898310048990001", bytes(16))
    async with unknown.connect():
        r = await unknown.sign_on("003")
        assert r.code == "97" and r.header_digit6 == 0
    awaiting = TerminalClient("127.0.0.1", demo.port, "20000002", "898310058120002", bytes(16))
    async with awaiting.connect():
        assert (await awaiting.echo_test()).code == "97"
    wrong_mid = demo.terminal("10000001")
    wrong_mid.mid = "898310058120002"
    async with wrong_mid.connect():
        assert (await wrong_mid.sign_on("003")).code == "03"


async def test_not_signed_on_and_signed_off_get_77(demo: DemoSwitch) -> None:
    term = demo.terminal("20000001")
    async with term.connect():
        await term.sign_on("003")
        keys = term.keys
        await term.sign_off()
        term.keys = keys  # a terminal that keeps using its revoked keys
        r = await term.consume(CARD, 100, pin="123456", expiry="3012")
    assert r.code == "77" and r.header_digit6 == 3 and 64 not in r.fields


async def test_wrong_batch_gets_77(demo: DemoSwitch) -> None:
    term = demo.terminal()
    async with term.connect():
        await term.sign_on("003")
        term.batch = "000099"
        assert (await term.consume(CARD, 100, pin="123456", expiry="3012")).code == "77"


async def test_unsupported_transaction_key_gets_40(demo: DemoSwitch) -> None:
    term = demo.terminal()
    async with term.connect():
        await term.sign_on("003")
        fields = term.card_fields(processing_code="990000", type_code="22", card=CARD, amount_fen=100,
                                  expiry="3012")
        assert (await term.send_fields("0200", fields)).code == "40"
        mgmt = {11: term.take_stan(), 41: term.tid, 42: term.mid, 60: "00000001999"}
        r = await term.send_fields("0800", mgmt, mac=False)
        assert r.mti == "0810" and r.code == "40"


async def test_missing_amount_gets_13_and_missing_field_30(demo: DemoSwitch) -> None:
    term = demo.terminal()
    async with term.connect():
        await term.sign_on("003")
        f = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=0, expiry="3012")
        assert (await term.send_fields("0200", f)).code == "13"
        f = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=100, expiry="3012")
        del f[49]
        assert (await term.send_fields("0200", f)).code == "30"


# ---- security ------------------------------------------------------------------------------
async def test_bad_mac_gets_a0_and_five_revoke_the_keys(demo: DemoSwitch) -> None:
    term = demo.terminal("10000002")
    async with term.connect():
        await term.sign_on("003")
        for i in range(5):
            f = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=100,
                                 pin="123456", expiry="3012")
            f[64] = b"DEADBEEF"
            r = await term.send_fields("0200", f, mac=False)
            assert r.code == "A0" and 64 not in r.fields
        assert r.header_digit6 == 3  # the fifth failure revoked the working keys
        assert (await term.consume(CARD, 100, pin="123456", expiry="3012")).code == "77"
        await term.sign_on("003")
        assert (await term.consume(CARD, 100, pin="123456", expiry="3012")).code == "00"
    assert sample(demo, "switch_mac_failures_total") >= 5


async def test_bad_pin_block_gets_99(demo: DemoSwitch) -> None:
    term = demo.terminal()
    async with term.connect():
        await term.sign_on("003")
        assert term.keys is not None
        f = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=100,
                             pin="123456", expiry="3012")
        f[52] = des_ecb_encrypt(term.keys.pik, bytes.fromhex("0F1234FFFFFFFFFF"))  # length 15
        assert (await term.send_fields("0200", f)).code == "99"
        f = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=100,
                             pin="123456", expiry="3012")
        f[53] = "20" + "0" * 14  # says single DES after a double-length sign-on
        assert (await term.send_fields("0200", f)).code == "99"


async def test_response_mac_verifies_under_the_mak(demo: DemoSwitch) -> None:
    term = demo.terminal()
    async with term.connect():
        await term.sign_on("003")
        r = await term.consume(CARD, 100, pin="123456", expiry="3012")
    assert term.keys is not None and isinstance(r.fields[64], bytes)
    assert verify_mac(term.keys.mak, r.body[:-8], r.fields[64])


# ---- malformed input -----------------------------------------------------------------------
async def test_malformed_frames(demo: DemoSwitch) -> None:
    term = demo.terminal()
    tpdu, header = bytes.fromhex("6000030000"), bytes.fromhex("603100000000")
    before = sample(demo, "switch_malformed_frames_total")
    async with term.connect():
        await term.sign_on("003")
        good = CODEC.encode("0200", {3: "000000", 11: "000777", 41: "10000001", 42: "898310048990001"})
        # truncated after F41 decoded: answered 30 with F11/F41
        r = await term.send_raw(encode_frame(tpdu, header, good[:-4]))
        assert r is not None and r.code == "30" and r.fields[11] == "000777" and r.fields[41] == "10000001"
        assert r.mti == "0210"
    # bit 1 set: closed without an answer
    async with term.connect():
        body = bytearray(good)
        body[2] |= 0x80
        assert await term.send_raw(encode_frame(tpdu, header, bytes(body)), timeout=5) is None
    # an MTI outside the request classes: closed
    async with term.connect():
        bad_mti = CODEC.encode("0900", {11: "000001", 41: "10000001"})
        assert await term.send_raw(encode_frame(tpdu, header, bad_mti), timeout=5) is None
    # LEN above max_frame: closed at once without reading the body
    with pytest.raises((TerminalConnectionError, anyio.EndOfStream, anyio.BrokenResourceError)):
        async with await anyio.connect_tcp("127.0.0.1", demo.port) as s:
            await s.send((4000).to_bytes(2, "big") + b"\x60")
            with anyio.fail_after(5):
                await s.receive()
    # the server still serves
    async with term.connect():
        assert (await term.echo_test()).code == "00"
    assert sample(demo, "switch_malformed_frames_total") >= before + 3


# ---- observability and records -------------------------------------------------------------
async def test_metrics_count_requests_by_transaction_and_code(demo: DemoSwitch) -> None:
    term = demo.terminal()
    async with term.connect():
        await term.sign_on("003")
        before = sample(demo, "switch_requests_total", transaction="consume", response_code="00")
        await term.consume(CARD, 100, pin="123456", expiry="3012")
    assert sample(demo, "switch_requests_total", transaction="consume", response_code="00") == before + 1
    assert sample(demo, "switch_request_duration_seconds_count", transaction="consume") >= 1
    assert sample(demo, "switch_issuer_link_up", issuer="ICBC") == 1
    assert sample(demo, "switch_issuer_link_up", issuer="BOC") == 0


async def test_no_secret_in_journal_or_logs(demo: DemoSwitch) -> None:
    term = demo.terminal()
    async with term.connect():
        await term.sign_on("004")
        await term.consume(CARD, 100, pin="123456", expiry="3012")
        await term.consume(CARD_CMB, 100, pin="888888", entry="manual", expiry="2912")
    assert term.keys is not None
    blobs = b""
    for name in os.listdir(demo.data_dir):
        if name.startswith("switch.db"):
            blobs += (demo.data_dir / name).read_bytes()
    logs = demo.log_text().encode()
    secrets = [CARD, CARD_CMB, "123456=", "30122011", term.keys.mak.hex().upper(), term.keys.pik.hex().upper()]
    from switch.demo_fixture import TERMINALS

    from switch.issuers.cards import demo_issuers

    secrets += [t.tmk_hex for t in TERMINALS if t.tmk_hex]
    # every demo card number of §14 (whatever tests ran in this module before), and the issuers' ZPKs
    secrets += [c.pan for d in demo_issuers().values() for c in d.cards]
    secrets += [d.zpk.hex().upper() for d in demo_issuers().values()]
    for s in secrets:
        assert s.encode() not in blobs, s[:4]
        assert s.encode() not in logs, s[:4]
    for key in (term.keys.mak, term.keys.pik):
        assert key not in blobs
