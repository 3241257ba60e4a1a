"""Conformance review (B) of the switch against protocol.md §7, §9, §11, §13 and §14, over TCP.

Each test asserts what the contract says, through the real ``switch demo`` subprocess (the
module's ``demo`` fixture, or a fresh ``DemoSwitch`` when a clean state is needed, e.g. to settle
a batch). Tests the switch fails are marked ``xfail(strict=True)`` with the § and what the switch
does instead; the others guard the rule.

Must not: sleep as an assertion, print a PIN or a full PAN, or edit anything but this file.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from switch.core.codec import Fields
from switch.pos.client import Response, TerminalClient

from .conftest import DemoSwitch
from .helpers import (
    CMB_CARD,
    CMB_DEST,
    ICBC_CARD,
    ICBC_POOR,
    NO_ROUTE_CARD,
    PIN,
    available,
    card_request,
    do,
    pre_auth_extra,
    reversal_of,
    reverse,
    scan_request,
    send,
    signed_on,
    void_extra,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SLOW_CARD = "6228489187204683748"  # accepts, never answers
BOC_CARD = "6216611771534246833"  # route configured, nothing listens
F44_TAIL = "48521000".ljust(11)
WECHAT = "101234567890123456"


def journal_row(sw: DemoSwitch, response: Response) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{sw.data_dir / 'switch.db'}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM journal WHERE rrn = ?", (response.fields[37],))]
    finally:
        db.close()
    assert len(rows) == 1, rows
    return rows[0]


def other_mmdd(mmdd: str) -> str:
    return "0102" if mmdd == "0101" else "0101"


def settle_fields(term: TerminalClient, f48: str, batch: str | None = None) -> Fields:
    return {11: term.take_stan(), 41: term.tid, 42: term.mid, 48: f48, 49: "156",
            60: f"00{batch or term.batch}201"}


def totals(debit: int, dn: int, credit: int, cn: int, result: str = "0") -> str:
    return f"{debit:012d}{dn:03d}{credit:012d}{cn:03d}{result}" + "0" * 30 + result


FOREIGN_OK = "0" * 30 + "1"


# ======================================================================================
# §7 consume void
# ======================================================================================
async def test_void_from_a_sibling_terminal_is_25(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal("10000001")) as t1:
        sale = await do(t1, "consume", ICBC_CARD, 1_111)
        assert sale.code == "00"
        async with signed_on(demo.terminal("10000002")) as t2:
            r = await do(t2, "void", ICBC_CARD, 1_111, extra=void_extra(sale))
        assert r.code == "25", r


async def test_void_with_another_rrn_is_25(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        sale = await do(t, "consume", ICBC_CARD, 1_112)
        other = await do(t, "consume", ICBC_CARD, 1_113)
        extra = void_extra(sale)
        extra[37] = other.fields[37]
        assert (await do(t, "void", ICBC_CARD, 1_112, extra=extra)).code == "25"


async def test_void_of_a_reversed_consume_is_25(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        sale = await do(t, "consume", ICBC_CARD, 1_114)
        assert (await reverse(t, sale)).code == "00"
        assert (await do(t, "void", ICBC_CARD, 1_114, extra=void_extra(sale))).code == "25"


async def test_void_twice_is_12_and_other_card_or_amount_64(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        sale = await do(t, "consume", ICBC_CARD, 1_115)
        assert (await do(t, "void", ICBC_CARD, 1_116, extra=void_extra(sale))).code == "64"
        assert (await do(t, "void", ICBC_POOR, 1_115, extra=void_extra(sale))).code == "64"
        v = await do(t, "void", ICBC_CARD, 1_115, extra=void_extra(sale))
        assert v.code == "00" and v.fields[37] != sale.fields[37]  # a new RRN (§6.1)
        assert (await do(t, "void", ICBC_CARD, 1_115, extra=void_extra(sale))).code == "12"


# ======================================================================================
# §7 refund
# ======================================================================================
async def test_refund_of_a_reversed_consume_is_12(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        sale = await do(t, "consume", ICBC_CARD, 2_101)
        assert (await reverse(t, sale)).code == "00"
        extra = {37: sale.fields[37], 61: "000000000000" + str(sale.fields[13])}
        assert (await do(t, "refund", ICBC_CARD, 100, extra=extra)).code == "12"


async def test_refund_naming_a_pre_auth_or_a_transfer_is_25(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        pa = await do(t, "pre_auth", ICBC_CARD, 2_102)
        tr = await do(t, "transfer", ICBC_CARD, 2_103, extra={48: CMB_DEST})
        assert pa.code == "00" and tr.code == "00"
        for orig in (pa, tr):
            extra = {37: orig.fields[37], 61: "000000000000" + str(orig.fields[13])}
            assert (await do(t, "refund", ICBC_CARD, 100, extra=extra)).code == "25"


async def test_refund_of_a_completion_is_approved_and_bounded(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        pa = await do(t, "pre_auth", ICBC_CARD, 2_000)
        comp = await do(t, "completion", ICBC_CARD, 2_100, extra=pre_auth_extra(pa))
        assert comp.code == "00"
        extra = {37: comp.fields[37], 61: "000000000000" + str(comp.fields[13])}
        assert (await do(t, "refund", ICBC_CARD, 2_100, extra=extra)).code == "00"
        assert (await do(t, "refund", ICBC_CARD, 1, extra=extra)).code == "64"


# ======================================================================================
# §7 pre-auth family
# ======================================================================================
async def test_completion_cap_is_exactly_115_percent(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        before = await available(t, ICBC_CARD)
        pa = await do(t, "pre_auth", ICBC_CARD, 10_000)
        assert pa.code == "00"
        assert await available(t, ICBC_CARD) == before - 10_000
        assert (await do(t, "completion", ICBC_CARD, 11_501, extra=pre_auth_extra(pa))).code == "64"
        assert (await do(t, "completion_advice", ICBC_CARD, 11_501, extra=pre_auth_extra(pa))).code == "64"
        assert (await do(t, "completion", ICBC_CARD, 11_500, extra=pre_auth_extra(pa))).code == "00"
        assert await available(t, ICBC_CARD) == before - 11_500  # captured; the rest of the hold released
        assert (await do(t, "completion", ICBC_CARD, 100, extra=pre_auth_extra(pa))).code == "12"
        assert (await do(t, "completion_advice", ICBC_CARD, 100, extra=pre_auth_extra(pa))).code == "12"
        assert (await do(t, "pre_auth_void", ICBC_CARD, 10_000, extra=pre_auth_extra(pa))).code == "12"


async def test_completion_void_reopens_the_pre_auth_which_can_then_be_voided(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        before = await available(t, ICBC_CARD)
        pa = await do(t, "pre_auth", ICBC_CARD, 5_000)
        comp = await do(t, "completion", ICBC_CARD, 4_000, extra=pre_auth_extra(pa))
        assert comp.code == "00"
        assert await available(t, ICBC_CARD) == before - 4_000
        cv = await do(t, "completion_void", ICBC_CARD, 4_000, extra=void_extra(comp))
        assert cv.code == "00"
        assert await available(t, ICBC_CARD) == before - 5_000  # the hold is back
        assert (await do(t, "completion_void", ICBC_CARD, 4_000, extra=void_extra(comp))).code == "12"
        pv = await do(t, "pre_auth_void", ICBC_CARD, 5_000, extra=pre_auth_extra(pa))
        assert pv.code == "00"
        assert await available(t, ICBC_CARD) == before
        assert (await do(t, "completion", ICBC_CARD, 1_000, extra=pre_auth_extra(pa))).code == "12"


async def test_pre_auth_follow_ups_with_wrong_auth_code_or_date_are_25(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        pa = await do(t, "pre_auth", ICBC_CARD, 3_000)
        extra = pre_auth_extra(pa)
        bad_auth = dict(extra)
        bad_auth[38] = "ZZZZZ9" if extra[38] != "ZZZZZ9" else "ZZZZZ8"
        bad_date = dict(extra)
        bad_date[61] = str(extra[61])[:12] + other_mmdd(str(extra[61])[12:])
        for kind, amount in (("pre_auth_void", 3_000), ("completion", 3_000), ("completion_advice", 3_000)):
            assert (await do(t, kind, ICBC_CARD, amount, extra=bad_auth)).code == "25", kind
            assert (await do(t, kind, ICBC_CARD, amount, extra=bad_date)).code == "25", kind


async def test_pre_auth_void_then_completion_is_12_and_void_carries_auth_code(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        pa = await do(t, "pre_auth", ICBC_CARD, 3_100)
        pv = await do(t, "pre_auth_void", ICBC_CARD, 3_100, extra=pre_auth_extra(pa))
        assert pv.code == "00" and pv.mti == "0110"
        assert isinstance(pv.fields.get(38), str) and len(str(pv.fields[38])) == 6  # §4
        assert (await do(t, "completion", ICBC_CARD, 3_100, extra=pre_auth_extra(pa))).code == "12"
        assert (await do(t, "pre_auth_void", ICBC_CARD, 3_100, extra=pre_auth_extra(pa))).code == "12"


async def test_pre_auth_void_with_another_card_is_64(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        pa = await do(t, "pre_auth", ICBC_CARD, 3_200)
        assert (await do(t, "pre_auth_void", ICBC_POOR, 3_200, extra=pre_auth_extra(pa))).code == "64"


# ======================================================================================
# §7 transfer failure paths
# ======================================================================================
async def test_transfer_to_a_down_issuer_is_91_and_the_debit_undone(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        src = await available(t, ICBC_CARD)
        r = await do(t, "transfer", ICBC_CARD, 4_100, extra={48: BOC_CARD})
        assert r.code == "91", r
        assert 38 not in r.fields
        assert await available(t, ICBC_CARD) == src


async def test_transfer_to_a_silent_issuer_is_98_and_the_debit_undone(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        src = await available(t, ICBC_CARD)
        r = await do(t, "transfer", ICBC_CARD, 4_200, extra={48: SLOW_CARD})
        assert r.code == "98", r
        assert await available(t, ICBC_CARD) == src  # reversed before the answer (§7)


async def test_transfer_source_checks_and_no_merchant_limit(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        r = await do(t, "transfer", ICBC_CARD[:-1] + str((int(ICBC_CARD[-1]) + 1) % 10), 100,
                     pin=False, extra={48: CMB_DEST})
        assert r.code == "14"
        mti, f = card_request(t, "transfer", NO_ROUTE_CARD, 100, extra={48: CMB_DEST})
        assert (await send(t, (mti, f))).code == "15"


# ======================================================================================
# §7 scan-to-pay and routing
# ======================================================================================
@pytest.mark.parametrize(
    "code, expected, wallet",
    [
        ("151234567890123456", "00", "WECHAT"),
        ("301234567890123456", "00", "ALIPAY"),
        ("161234567890123456", "15", ""),
        ("241234567890123456", "15", ""),
        ("311234567890123456", "15", ""),
        ("091234567890123456", "15", ""),
        ("1012345678901234567", "30", None),
        ("99123456789012345", "30", None),
    ],
    ids=["15-wechat", "30-alipay", "16", "24", "31", "09", "19-digits", "17-digits-unknown-prefix"],
)
async def test_scan_to_pay_prefixes_and_length(demo: DemoSwitch, code: str, expected: str, wallet: str | None) -> None:
    async with signed_on(demo.terminal()) as t:
        r = await send(t, scan_request(t, "consume", code, 1_000))
    assert r.code == expected, r
    if wallet is not None:
        assert r.fields.get(44) == wallet.ljust(11) + F44_TAIL


async def test_card_number_luhn_in_track_and_in_f2_is_14(demo: DemoSwitch) -> None:
    bad = ICBC_CARD[:-1] + str((int(ICBC_CARD[-1]) + 1) % 10)
    async with signed_on(demo.terminal()) as t:
        assert (await t.consume(bad, 100, expiry="3012")).code == "14"  # swiped: PAN in track 2
        assert (await t.consume(bad, 100, entry="manual", expiry="3012")).code == "14"


async def test_routing_91_98_15_and_f44_issuer(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        boc = await t.consume(BOC_CARD, 100, pin="123456", expiry="3012")
        assert boc.code == "91" and boc.fields.get(44) == "BOC".ljust(11) + F44_TAIL
        slow = await t.consume(SLOW_CARD, 100, pin="123456", expiry="3012")
        assert slow.code == "98" and slow.fields.get(44) == "SLOW".ljust(11) + F44_TAIL
        none = await t.consume(NO_ROUTE_CARD, 100, expiry="3012")
        assert none.code == "15" and none.fields.get(44) == " " * 11 + F44_TAIL
        bal = await t.balance(SLOW_CARD, pin="123456", expiry="3012")
        assert bal.code == "98"
        # a reversal of an original the switch reversed after a timeout: 00, nothing more (§11)
        assert (await t.reverse(slow)).code == "00"


async def test_reversal_of_an_original_still_at_the_issuer_is_00(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        mti, fields = card_request(t, "consume", SLOW_CARD, 321, pin="123456")
        results: dict[str, Response] = {}

        async def original() -> None:
            results["orig"] = await t.send_fields(mti, fields)

        async with anyio.create_task_group() as tg:
            tg.start_soon(original)
            await anyio.sleep(0)  # let the original go out first (ordering only, asserts nothing)
            await anyio.sleep(0.2)
            results["rev"] = await t.send_fields("0400", reversal_of(t, fields))
        assert results["orig"].code == "98"
        assert results["rev"].code == "00", results["rev"]


# ======================================================================================
# §9.1 activation
# ======================================================================================
async def _activate(port: int, code: str, stan: str) -> Response:
    from switch.crypto.activation import generate_terminal_key, public_key_der

    key = generate_terminal_key()
    client = TerminalClient("127.0.0.1", port, " " * 8, " " * 15, bytes(16))
    fields: Fields = {11: stan, 41: " " * 8, 42: " " * 15, 60: "00000000351",
                      62: code.encode() + public_key_der(key)}
    async with client.connect():
        return await client.send_fields("0800", fields, mac=False)


async def test_four_wrong_codes_do_not_lock_and_the_fifth_attempt_activates(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        for i in range(4):
            r = await _activate(sw.port, f"{22222220 + i}", f"{i + 1:06d}")
            assert r.code == "97" and r.mti == "0810"
            assert 62 not in r.fields
        ok = await _activate(sw.port, "48213579", "000005")
        assert ok.code == "00", ok
        assert ok.fields[41] == "20000002" and ok.fields[42] == "898310058120002"
        assert ok.fields[63] == "星河超市" and ok.fields[11] == "000005" and ok.fields[60] == "00000000351"
        assert ok.header_digit6 == 3
        # used code: 97 (this is the fifth wrong code, not yet a lockout)
        assert (await _activate(sw.port, "48213579", "000006")).code == "97"
        # sixth attempt after five wrong codes: 75
        assert (await _activate(sw.port, "48213579", "000007")).code == "75"


# ======================================================================================
# §9.3 parameter download: exact TLV bytes
# ======================================================================================
def tlv(tag: str, value: bytes) -> bytes:
    return tag.encode() + f"{len(value):03d}".encode() + value


@pytest.mark.parametrize(
    "tid, shop, mid, role, main, limit",
    [
        ("10000001", "老王便利店", "898310048990001", "MAIN", "10000001", 30_000_000),
        ("10000002", "老王便利店", "898310048990001", "SECONDARY", "10000001", 30_000_000),
        ("20000001", "星河超市", "898310058120002", "MAIN", "20000001", 500_000_000),
    ],
)
async def test_parameter_download_exact_tlv(
    demo: DemoSwitch, tid: str, shop: str, mid: str, role: str, main: str, limit: int
) -> None:
    t = demo.terminal(tid)
    async with t.connect():
        r = await t.sign_on("003")
        assert r.code == "00"
        r = await t.parameter_download()
        assert r.code == "00" and r.mti == "0810"
        expected = b"".join([
            tlv("01", shop.encode("gbk")), tlv("02", tid.encode()), tlv("03", mid.encode()),
            tlv("04", role.encode()), tlv("05", main.encode()), tlv("06", b"0.60"),
            tlv("07", str(limit).encode()), tlv("08", b"156"),
        ])
        assert r.fields[62] == expected
        assert r.header_digit6 == 0
        assert (await t.echo_test()).header_digit6 == 0


# ======================================================================================
# §9.4 settlement, §9.5 upload, §9.6 business day (fresh switch: clean batches)
# ======================================================================================
async def test_settlement_layouts_and_rules(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        t = sw.terminal("10000001")
        async with signed_on(t):
            batch0 = t.batch
            # the current batch exists even when empty: zeros balance
            r = await t.send_fields("0500", settle_fields(t, totals(0, 0, 0, 0)), mac=False)
            assert r.mti == "0510" and r.code == "00", r
            assert r.fields[48] == totals(0, 0, 0, 0, "1")
            for k in (11, 12, 13, 15, 32, 37, 39, 41, 42, 48, 49, 60):
                assert k in r.fields, k
            assert r.fields[32] == "48521000"
            s = await t.sign_on("003")
            assert s.batch == f"{int(batch0) + 1:06d}"

            # a batch with every kind of transaction
            sale = await do(t, "consume", ICBC_CARD, 1_000)
            voided = await do(t, "consume", ICBC_CARD, 2_000)
            assert (await do(t, "void", ICBC_CARD, 2_000, extra=void_extra(voided))).code == "00"
            scan = await send(t, scan_request(t, "consume", WECHAT, 500))
            refund_extra = {37: sale.fields[37], 61: "000000000000" + str(sale.fields[13])}
            assert (await do(t, "refund", ICBC_CARD, 300, extra=refund_extra)).code == "00"
            pa = await do(t, "pre_auth", ICBC_CARD, 700)
            comp = await do(t, "completion", ICBC_CARD, 800, extra=pre_auth_extra(pa))
            pa2 = await do(t, "pre_auth", ICBC_CARD, 900)
            assert (await do(t, "pre_auth_void", ICBC_CARD, 900, extra=pre_auth_extra(pa2))).code == "00"
            assert (await do(t, "transfer", ICBC_CARD, 100, extra={48: CMB_DEST})).code == "00"
            assert (await available(t, ICBC_CARD)) > 0
            rev = await do(t, "consume", ICBC_CARD, 400)
            assert (await reverse(t, rev)).code == "00"
            assert (await do(t, "consume", ICBC_POOR, 1_000_000)).code == "51"
            later = await do(t, "consume", ICBC_CARD, 600)
            assert all(x.code == "00" for x in (sale, scan, pa, comp, later))
            ours = totals(1_000 + 2_000 + 500 + 800 + 600, 5, 2_000 + 300, 2, "2")
            ours = ours[:31] + FOREIGN_OK

            batch1 = t.batch
            wrong = await t.send_fields("0500", settle_fields(t, totals(1, 1, 0, 0)), mac=False)
            assert wrong.code == "00" and wrong.fields[48] == ours
            # settling the closed batch again: the same answer
            again = await t.send_fields("0500", settle_fields(t, totals(4_900, 5, 2_300, 2), batch1), mac=False)
            assert again.code == "00" and again.fields[48] == ours
            # the void and refund of a closed batch's original: 25 / refund still 00
            s = await t.sign_on("003")
            assert s.batch == f"{int(batch1) + 1:06d}"
            assert (await do(t, "void", ICBC_CARD, 1_000, extra=void_extra(sale))).code == "25"
            # a reversal of the settled batch's consume on the same business day: 00 (§9.6, §11)
            before = await available(t, ICBC_CARD)
            assert (await reverse(t, later)).code == "00"
            assert await available(t, ICBC_CARD) == before + 600
            # any other batch: 25
            far = await t.send_fields("0500", settle_fields(t, totals(0, 0, 0, 0), f"{int(t.batch) + 5:06d}"), mac=False)
            assert far.code == "25"
            # a financial request naming another batch than the open one: 77
            mti, f = card_request(t, "consume", ICBC_CARD, 100, pin=PIN[ICBC_CARD])
            f[60] = "22" + batch1 + str(f[60])[8:]
            assert (await t.send_fields(mti, f)).code == "77"
            # balanced settlement of the current batch echoes the request with result 1
            one = await do(t, "consume", ICBC_CARD, 123)
            assert one.code == "00"
            ok = await t.send_fields("0500", settle_fields(t, totals(123, 1, 0, 0)), mac=False)
            assert ok.code == "00" and ok.fields[48] == totals(123, 1, 0, 0, "1")


async def test_batch_upload_answers_00_with_its_fields(demo: DemoSwitch) -> None:
    t = demo.terminal("20000001")
    async with signed_on(t):
        rec = "00" + "000123" + ICBC_CARD.rjust(20, "0") + f"{1_000:012d}"
        r = await t.send_fields("0320", {11: t.take_stan(), 41: t.tid, 42: t.mid, 48: "01" + rec,
                                         60: f"00{t.batch}201"}, mac=False)
        assert r.mti == "0330" and r.code == "00"
        assert {11, 39, 41, 42, 60} <= set(r.fields)
        end = await t.send_fields("0320", {11: t.take_stan(), 41: t.tid, 42: t.mid, 48: "0001",
                                           60: f"00{t.batch}202"}, mac=False)
        assert end.code == "00"


# ======================================================================================
# §11 duplicates, for every MTI
# ======================================================================================
async def _same_and_different(t: TerminalClient, mti: str, fields: Fields, changed: Fields, *, mac: bool) -> None:
    frame, _ = t.build_frame(mti, fields, mac=mac)
    first = await t.send_raw(frame)
    second = await t.send_raw(frame)
    assert first is not None and second is not None
    assert second.body == first.body, (first, second)
    frame2, _ = t.build_frame(mti, changed, mac=mac)
    third = await t.send_raw(frame2)
    assert third is not None and third.code == "94", third


async def test_duplicates_of_financial_mtis(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        mti, f = card_request(t, "consume", ICBC_CARD, 5_001, pin=PIN[ICBC_CARD])
        await _same_and_different(t, mti, f, {**f, 4: f"{5_002:012d}"}, mac=True)
        mti, f = card_request(t, "pre_auth", ICBC_CARD, 5_003, pin=PIN[ICBC_CARD])
        await _same_and_different(t, mti, f, {**f, 4: f"{5_004:012d}"}, mac=True)
        sale = await do(t, "consume", ICBC_CARD, 5_005)
        refund_extra = {37: sale.fields[37], 61: "000000000000" + str(sale.fields[13])}
        mti, f = card_request(t, "refund", ICBC_CARD, 10, extra=refund_extra)
        await _same_and_different(t, mti, f, {**f, 4: f"{11:012d}"}, mac=True)
        rev = reversal_of(t, sale.request_fields)
        await _same_and_different(t, "0400", rev, {**rev, 39: "96"}, mac=True)


async def test_duplicates_of_management_mtis(demo: DemoSwitch) -> None:
    t = demo.terminal("10000002")
    async with t.connect():
        assert (await t.sign_on("003")).code == "00"
        echo = {11: t.take_stan(), 41: t.tid, 42: t.mid, 60: f"00{t.batch}301"}
        await _same_and_different(t, "0820", echo, {**echo, 60: f"00{t.batch}30100"}, mac=False)
        pd = {11: t.take_stan(), 41: t.tid, 42: t.mid, 60: f"00{t.batch}360"}
        await _same_and_different(t, "0800", pd, {**pd, 60: f"00{t.batch}36000"}, mac=False)
        so = {11: t.take_stan(), 41: t.tid, 42: t.mid, 60: f"00{t.batch}003", 63: "01 "}
        await _same_and_different(t, "0800", so, {**so, 63: "001"}, mac=False)


async def test_duplicates_of_settlement_and_upload(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        t = sw.terminal("20000001")
        async with signed_on(t):
            up = {11: t.take_stan(), 41: t.tid, 42: t.mid, 48: "0001", 60: f"00{t.batch}207"}
            await _same_and_different(t, "0320", up, {**up, 48: "0002"}, mac=False)
            st = settle_fields(t, totals(0, 0, 0, 0))
            await _same_and_different(t, "0500", st, {**st, 48: totals(1, 1, 0, 0)}, mac=False)


# ======================================================================================
# §13 limits and fees (fresh switch: a clean month)
# ======================================================================================
async def test_monthly_limit_refunds_voids_transfers_and_pre_auths(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        async with signed_on(sw.terminal("10000001")) as t1, signed_on(sw.terminal("10000002")) as t2:
            big = await do(t1, "consume", ICBC_CARD, 29_999_000)
            small = await do(t1, "consume", ICBC_CARD, 1_000)
            assert big.code == "00" and small.code == "00"  # exactly the limit: allowed
            assert (await do(t2, "consume", ICBC_CARD, 1)).code == "61"  # shared by the merchant
            assert (await send(t2, scan_request(t2, "consume", WECHAT, 1))).code == "61"
            # not counted: pre-auth, pre-auth void, transfer
            pa = await do(t1, "pre_auth", ICBC_CARD, 1_000)
            assert pa.code == "00"
            assert (await do(t1, "completion", ICBC_CARD, 1_000, extra=pre_auth_extra(pa))).code == "61"
            assert (await do(t1, "pre_auth_void", ICBC_CARD, 1_000, extra=pre_auth_extra(pa))).code == "00"
            assert (await do(t1, "transfer", ICBC_CARD, 1_000, extra={48: CMB_DEST})).code == "00"
            # refunds do not restore headroom
            extra = {37: small.fields[37], 61: "000000000000" + str(small.fields[13])}
            assert (await do(t2, "refund", ICBC_CARD, 1_000, extra=extra)).code == "00"
            assert (await do(t1, "consume", ICBC_CARD, 1)).code == "61"
            # voids and reversals do
            assert (await do(t1, "void", ICBC_CARD, 29_999_000, extra=void_extra(big))).code == "00"
            again = await do(t1, "consume", ICBC_CARD, 29_999_000)
            assert again.code == "00"
            assert (await do(t1, "consume", ICBC_CARD, 1)).code == "61"
            assert (await reverse(t1, again)).code == "00"
            assert (await do(t1, "consume", ICBC_CARD, 1)).code == "00"
        # M2 is separate
        async with signed_on(sw.terminal("20000001")) as t3:
            assert (await do(t3, "consume", CMB_CARD, 100)).code == "00"


@pytest.mark.parametrize("amount, fee", [(1_250, 8), (1_249, 7), (1_083, 6), (83, 0), (84, 1)])
async def test_fee_rounds_half_up(demo: DemoSwitch, amount: int, fee: int) -> None:
    async with signed_on(demo.terminal()) as t:
        r = await do(t, "consume", ICBC_CARD, amount)
        assert r.code == "00"
    assert journal_row(demo, r)["fee_fen"] == fee


async def test_activation_decline_carries_only_11_39_60(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        r = await _activate(sw.port, "11111111", "000001")
        assert r.code == "97" and sorted(r.fields) == [11, 39, 60]  # §6.1: 41/42 only when 00


async def test_a_copy_in_flight_waits_and_gets_the_same_response(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        mti, f = card_request(t, "consume", SLOW_CARD, 777, pin="123456")
        frame, _ = t.build_frame(mti, f, mac=True)
        got: list[Response | None] = []

        async def one() -> None:
            got.append(await t.send_raw(frame))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
        # both answers have the same F11, so the client may hand either frame to either caller;
        # both must be the one response (§11)
        assert len(got) == 2 and all(g is not None for g in got)
        a, b = got
        assert a is not None and b is not None
        assert a.code == "98" and a.body == b.body


async def test_reversal_of_a_pre_auth_void_and_of_a_completion_reopen_the_pre_auth(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        before = await available(t, ICBC_CARD)
        pa = await do(t, "pre_auth", ICBC_CARD, 6_000)
        pv = await do(t, "pre_auth_void", ICBC_CARD, 6_000, extra=pre_auth_extra(pa))
        assert pv.code == "00"
        assert (await reverse(t, pv)).code == "00"
        assert await available(t, ICBC_CARD) == before - 6_000  # held again
        comp = await do(t, "completion", ICBC_CARD, 5_000, extra=pre_auth_extra(pa))
        assert comp.code == "00"
        assert (await reverse(t, comp)).code == "00"
        assert await available(t, ICBC_CARD) == before - 6_000
        assert (await do(t, "pre_auth_void", ICBC_CARD, 6_000, extra=pre_auth_extra(pa))).code == "00"
        assert await available(t, ICBC_CARD) == before


async def test_reversal_of_non_reversible_types_is_12(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        bal = await do(t, "balance", ICBC_CARD, None)
        assert (await reverse(t, bal)).code == "12"
        pa = await do(t, "pre_auth", ICBC_CARD, 1_500)
        adv = await do(t, "completion_advice", ICBC_CARD, 1_500, extra=pre_auth_extra(pa))
        assert adv.code == "00"
        assert (await reverse(t, adv)).code == "12"


def _cli(data_dir: Path, *args: str) -> str:
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("SWITCH_MASTER_KEY", None)
    out = subprocess.run([sys.executable, "-m", "switch.cli", *args, "--data-dir", str(data_dir)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def _echo_code_becomes(t: TerminalClient, code: str) -> bool:
    for _ in range(100):  # bounded: about 20 s
        async with t.connect():
            if (await t.echo_test()).code == code:
                return True
        await anyio.sleep(0.2)
    return False


async def test_main_and_secondary_rules(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        _cli(tmp_path, "terminal", "disable", "20000001")
        assert await _echo_code_becomes(sw.terminal("20000001"), "97")
        r = await _activate(sw.port, "48213579", "000001")
        assert r.code == "97", r  # §9.2: the main is not active
        _cli(tmp_path, "terminal", "disable", "10000001")
        assert await _echo_code_becomes(sw.terminal("10000001"), "97")
        t2 = sw.terminal("10000002")
        async with t2.connect():
            assert (await t2.echo_test()).code == "97"  # disabling the main disables its secondaries


# ======================================================================================
# §12.1 step 10 (with §7 routing and refunds): the PIN block is checked before the issuer
# ======================================================================================
def _wrong_key_length(fields: Fields) -> Fields:
    """F53 digit 2 = 0 (single DES) after a 003 sign-on: §4 says 99."""
    f53 = str(fields[53])
    return {**fields, 53: f53[0] + "0" + f53[2:]}


async def test_pin_block_error_on_a_card_of_a_working_issuer_is_99(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        mti, f = card_request(t, "consume", ICBC_CARD, 100, pin=PIN[ICBC_CARD])
        assert (await t.send_fields(mti, _wrong_key_length(f))).code == "99"


async def test_pin_block_error_on_a_card_of_a_down_issuer_is_99(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        mti, f = card_request(t, "consume", BOC_CARD, 100, pin="123456")
        assert (await t.send_fields(mti, _wrong_key_length(f))).code == "99"


async def test_refund_with_a_bad_pin_block_is_99(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        sale = await do(t, "consume", ICBC_CARD, 2_222)
        extra = {37: sale.fields[37], 61: "000000000000" + str(sale.fields[13])}
        mti, f = card_request(t, "refund", ICBC_CARD, 100, pin=PIN[ICBC_CARD], extra=extra)
        assert (await t.send_fields(mti, _wrong_key_length(f))).code == "99"


async def test_transfer_carries_no_fee(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        r = await do(t, "transfer", ICBC_CARD, 10_000, extra={48: CMB_DEST})
        assert r.code == "00"
    assert not journal_row(demo, r)["fee_fen"]


# ======================================================================================
# §14 fixture behaviour
# ======================================================================================
@pytest.mark.parametrize(
    "card, amount, pin, expiry, expected",
    [
        ("6222021007789355041", 100, "123456", "2001", "54"),
        ("6222029410528228689", 100, "123456", "3012", "41"),
        ("6222023650908004509", 100, "123456", "3012", "43"),
        (ICBC_CARD, 100, "654321", "3012", "55"),
        (ICBC_POOR, 10_001, "123456", "3012", "51"),
        (ICBC_POOR, 10_000, "123456", "3012", "00"),
        (CMB_CARD, 100, "888888", "2912", "00"),
    ],
    ids=["expired", "lost", "stolen", "wrong-pin", "poor-51", "poor-exact", "cmb"],
)
async def test_fixture_cards(demo: DemoSwitch, card: str, amount: int, pin: str, expiry: str, expected: str) -> None:
    async with signed_on(demo.terminal("20000001")) as t:
        r = await t.consume(card, amount, pin=pin, expiry=expiry)
        assert r.code == expected, r
        if expected == "00":
            assert (await t.void(r)).code == "00"  # leave the balance as it was


@pytest.mark.parametrize("code", ["121234567890123456", "271234567890123456"])
async def test_wallet_limit_is_inclusive(demo: DemoSwitch, code: str) -> None:
    async with signed_on(demo.terminal("20000001")) as t:
        assert (await send(t, scan_request(t, "consume", code, 500_000))).code == "00"
        assert (await send(t, scan_request(t, "consume", code, 500_001))).code == "51"
