"""Conformance review (E) of the switch against protocol.md §7, §9.2-§9.6, §11, §13, §14 and §15,
over TCP, covering what reviews A-C, the transaction-set and settlement tests leave out.

Each test asserts what the CONTRACT says, through the real ``switch demo`` subprocess (the
module's ``demo`` fixture, or a fresh ``DemoSwitch`` when a clean state is needed). Tests the
switch fails are marked ``xfail(strict=True)`` with the § and what the switch does instead.

Must not: sleep as an assertion, print a PIN or a full PAN, or edit anything but this file.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio
import pytest

from switch.core.codec import Fields
from switch.pos.client import Response, TerminalClient

from .conftest import DemoSwitch
from .helpers import (
    CMB_CARD,
    CMB_DEST,
    CMB_REFUSES_CREDIT,
    ICBC_CARD,
    ICBC_POOR,
    PIN,
    available,
    card_request,
    do,
    metric,
    pre_auth_extra,
    reversal_of,
    reverse,
    scan_request,
    send,
    signed_on,
    void_extra,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ACQ = "48521000".ljust(11)
WECHAT = "101234567890123456"
ALIPAY = "261234567890123456"
EXPIRED = "6222021007789355041"
LOST = "6222029410528228689"
STOLEN = "6222023650908004509"
SHANGHAI = timezone(timedelta(hours=8))


def settle_fields(term: TerminalClient, f48: str, batch: str | None = None) -> Fields:
    return {11: term.take_stan(), 41: term.tid, 42: term.mid, 48: f48, 49: "156",
            60: f"00{batch or term.batch}201"}


def totals(debit: int, dn: int, credit: int, cn: int, result: str = "0") -> str:
    return f"{debit:012d}{dn:03d}{credit:012d}{cn:03d}{result}" + "0" * 30 + ("1" if result != "0" else "0")


def refund_extra(orig: Response) -> dict[int, str]:
    return {37: str(orig.fields[37]), 61: "000000000000" + str(orig.fields[13])}


def auth_ok(r: Response) -> bool:
    a = r.fields.get(38)
    return isinstance(a, str) and len(a) == 6 and " " not in a


# ======================================================================================
# §14 fixture: every card's balance (F54) on a fresh fixture, and the issuers' behaviour
# ======================================================================================
async def test_fixture_balances_and_statuses_by_balance_inquiry(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        async with signed_on(sw.terminal("10000001")) as t:
            expected = {ICBC_CARD: 100_000_000, ICBC_POOR: 10_000, CMB_CARD: 2_000_000, CMB_DEST: 0,
                        CMB_REFUSES_CREDIT: 0}
            for card, fen in expected.items():
                r = await do(t, "balance", card, None)
                assert r.code == "00", (card[-4:], r.code)
                assert r.fields[54] == f"1002156C{fen:012d}", card[-4:]
                assert r.fields[44] == ("ICBC" if card.startswith("622202") else "CMB").ljust(11) + ACQ
            for card, expiry, code in ((EXPIRED, "2001", "54"), (LOST, "3012", "41"), (STOLEN, "3012", "43")):
                mti, f = card_request(t, "balance", card, None, pin="123456", expiry=expiry)
                r = await send(t, (mti, f))
                assert r.code == code and 54 not in r.fields
            # a wrong PIN: 55, and no balance on a decline (§6.1: approved balance inquiries add 54)
            mti, f = card_request(t, "balance", CMB_CARD, None, pin="123457")
            r = await send(t, (mti, f))
            assert r.code == "55" and 54 not in r.fields and 38 not in r.fields and 64 not in r.fields


# ======================================================================================
# §4 F38: every approved 0110 / 0210 except a balance inquiry carries 6 characters, no spaces
# ======================================================================================
async def test_every_approved_0110_0210_carries_an_auth_code(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal("20000001")) as t:
        scan = await send(t, scan_request(t, "consume", ALIPAY, 1_234))
        assert scan.code == "00" and scan.mti == "0210" and auth_ok(scan)
        assert scan.fields[44] == "ALIPAY".ljust(11) + ACQ
        sv = await send(t, scan_request(t, "void", ALIPAY, 1_234, extra=void_extra(scan)))
        assert sv.code == "00" and auth_ok(sv) and sv.fields[44] == "ALIPAY".ljust(11) + ACQ
        sale = await do(t, "consume", CMB_CARD, 321)
        v = await do(t, "void", CMB_CARD, 321, extra=void_extra(sale))
        assert v.code == "00" and auth_ok(v) and v.fields[44] == "CMB".ljust(11) + ACQ
        pa = await do(t, "pre_auth", CMB_CARD, 1_000)
        assert pa.mti == "0110" and auth_ok(pa)
        comp = await do(t, "completion", CMB_CARD, 900, extra=pre_auth_extra(pa))
        assert comp.code == "00" and auth_ok(comp)
        cv = await do(t, "completion_void", CMB_CARD, 900, extra=void_extra(comp))
        assert cv.code == "00" and auth_ok(cv)
        pv = await do(t, "pre_auth_void", CMB_CARD, 1_000, extra=pre_auth_extra(pa))
        assert pv.code == "00" and auth_ok(pv)
        tr = await do(t, "transfer", CMB_CARD, 100, extra={48: CMB_DEST})
        assert tr.code == "00" and auth_ok(tr) and tr.fields[44] == "CMB".ljust(11) + ACQ
        assert 48 not in tr.fields  # F48 is not in the echo list


# ======================================================================================
# §6.1 "For a swiped card the response carries F2 = the PAN from track 2"
# ======================================================================================
async def test_swipe_response_f2_is_the_track_pan_not_a_stray_f2(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        mti, f = card_request(t, "consume", ICBC_CARD, 101, pin=PIN[ICBC_CARD])
        f[2] = CMB_CARD  # not a swipe's field: ignored (§6.1), never echoed
        r = await send(t, (mti, f))
        assert r.code == "00", r
        assert r.fields[2] == ICBC_CARD
        assert r.fields[44] == "ICBC".ljust(11) + ACQ


# ======================================================================================
# §11 duplicates of requests that were declined in the checks (13, 25, 15)
# ======================================================================================
async def test_duplicates_of_declined_requests(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        for kind, amount, extra in (("consume", 0, {}),
                                    ("void", 100, {37: "000000000000", 61: "000001999999"}),
                                    ("refund", 100, {37: "000000000000", 61: "0000000000000101"})):
            mti, f = card_request(t, kind, ICBC_CARD, amount, extra=extra)
            frame, _ = t.build_frame(mti, f, mac=True)
            first = await t.send_raw(frame)
            again = await t.send_raw(frame)
            assert first is not None and again is not None and first.code in ("13", "25")
            assert again.body == first.body, kind
            changed = dict(f)
            changed[4] = f"{amount + 7:012d}"
            frame2, _ = t.build_frame(mti, changed, mac=True)
            third = await t.send_raw(frame2)
            assert third is not None and third.code == "94", (kind, third.code)


# ======================================================================================
# §11 reversal of a completion void: the completion stands again, the hold is gone
# ======================================================================================
async def test_reversal_of_a_completion_void(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        before = await available(t, ICBC_CARD)
        pa = await do(t, "pre_auth", ICBC_CARD, 5_000)
        comp = await do(t, "completion", ICBC_CARD, 4_000, extra=pre_auth_extra(pa))
        cv = await do(t, "completion_void", ICBC_CARD, 4_000, extra=void_extra(comp))
        assert cv.code == "00"
        assert await available(t, ICBC_CARD) == before - 5_000
        r = await reverse(t, cv)
        assert r.code == "00" and r.fields[44] == "ICBC".ljust(11) + ACQ
        assert await available(t, ICBC_CARD) == before - 4_000  # captured again, hold released
        # the pre-auth is completed again: a void or a second completion is the wrong state
        assert (await do(t, "pre_auth_void", ICBC_CARD, 5_000, extra=pre_auth_extra(pa))).code == "12"
        assert (await do(t, "completion", ICBC_CARD, 100, extra=pre_auth_extra(pa))).code == "12"
        # and the completion can be voided again
        assert (await do(t, "completion_void", ICBC_CARD, 4_000, extra=void_extra(comp))).code == "00"
        assert await available(t, ICBC_CARD) == before - 5_000


async def test_reversal_of_a_pre_auth_releases_the_hold(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        before = await available(t, ICBC_CARD)
        pa = await do(t, "pre_auth", ICBC_CARD, 7_000)
        assert await available(t, ICBC_CARD) == before - 7_000
        r = await reverse(t, pa)
        assert r.code == "00" and r.mti == "0410"
        assert await available(t, ICBC_CARD) == before
        assert (await do(t, "completion", ICBC_CARD, 7_000, extra=pre_auth_extra(pa))).code in ("12", "25")


# ======================================================================================
# §7 / §11 scan-to-pay reversal, refund routing (F44 of 0230 / 0410)
# ======================================================================================
async def test_scan_to_pay_reversal_and_refund_name_the_wallet(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal("20000001")) as t:
        scan = await send(t, scan_request(t, "consume", WECHAT, 2_000))
        assert scan.code == "00"
        rev = await t.send_fields("0400", reversal_of(t, scan.request_fields))
        assert rev.code == "00" and rev.fields[44] == "WECHAT".ljust(11) + ACQ and rev.mac_ok
        assert (await send(t, scan_request(t, "void", WECHAT, 2_000, extra=void_extra(scan)))).code == "25"
        assert (await send(t, scan_request(t, "refund", WECHAT, 100, extra=refund_extra(scan)))).code == "12"
        scan2 = await send(t, scan_request(t, "consume", WECHAT, 3_000))
        rf = await send(t, scan_request(t, "refund", WECHAT, 3_000, extra=refund_extra(scan2)))
        assert rf.code == "00" and rf.mti == "0230" and rf.fields[44] == "WECHAT".ljust(11) + ACQ
        assert rf.fields[63] == "CUP" and rf.mac_ok


async def test_reversal_0410_names_the_original_issuer(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal("20000001")) as t:
        sale = await do(t, "consume", CMB_CARD, 555)
        r = await reverse(t, sale)
        assert r.code == "00" and r.fields[44] == "CMB".ljust(11) + ACQ
        assert r.fields[63] == "CUP" and r.fields[32] == "48521000"
        missing = reversal_of(t, sale.request_fields)
        missing[11] = t.take_stan()
        nf = await t.send_fields("0400", missing)
        assert nf.code == "25" and 64 not in nf.fields and nf.fields[63] == "CUP" and 44 in nf.fields


# ======================================================================================
# §9.4 settlement totals: what counts, per terminal (fresh switch: clean batches)
# ======================================================================================
async def test_settlement_counts_per_terminal(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        async with signed_on(sw.terminal("10000001")) as t1, signed_on(sw.terminal("10000002")) as t2:
            sale = await do(t1, "consume", ICBC_CARD, 10_000)
            scan = await send(t1, scan_request(t1, "consume", WECHAT, 2_000))
            assert (await send(t1, scan_request(t1, "void", WECHAT, 2_000, extra=void_extra(scan)))).code == "00"
            pa = await do(t1, "pre_auth", ICBC_CARD, 3_000)
            adv = await do(t1, "completion_advice", ICBC_CARD, 3_300, extra=pre_auth_extra(pa))
            assert adv.code == "00"
            pa2 = await do(t1, "pre_auth", ICBC_CARD, 1_000)
            comp = await do(t1, "completion", ICBC_CARD, 1_000, extra=pre_auth_extra(pa2))
            assert (await do(t1, "completion_void", ICBC_CARD, 1_000, extra=void_extra(comp))).code == "00"
            # a void that is itself reversed: neither counts as a credit, the sale stays a debit
            s2 = await do(t1, "consume", ICBC_CARD, 700)
            v2 = await do(t1, "void", ICBC_CARD, 700, extra=void_extra(s2))
            assert (await reverse(t1, v2)).code == "00"
            # a declined void does not count
            assert (await do(t1, "void", ICBC_CARD, 701, extra=void_extra(s2))).code == "64"
            # the refund is the sibling's credit, not t1's
            assert (await do(t2, "refund", ICBC_CARD, 4_000, extra=refund_extra(sale))).code == "00"
            b1 = t1.batch
            ours1 = totals(10_000 + 2_000 + 3_300 + 1_000 + 700, 5, 2_000 + 1_000, 2, "1")
            ok1 = await t1.send_fields("0500", settle_fields(t1, totals(16_999, 5, 3_000, 2)), mac=False)
            assert ok1.code == "00" and ok1.fields[48] == totals(17_000, 5, 3_000, 2, "2")
            ok2 = await t2.send_fields("0500", settle_fields(t2, totals(0, 0, 4_000, 1)), mac=False)
            assert ok2.code == "00" and ok2.fields[48] == totals(0, 0, 4_000, 1, "1")
            assert ours1 == totals(17_000, 5, 3_000, 2, "1")
            assert (await t1.sign_on("003")).batch == f"{int(b1) + 1:06d}"
            # after settlement: the original's batch is closed, a refund still works (any terminal)
            assert (await do(t1, "refund", ICBC_CARD, 1_000, extra=refund_extra(sale))).code == "00"
            # §9.6: the closed batch is no longer open for financial requests
            mti, f = card_request(t1, "consume", ICBC_CARD, 100, pin=PIN[ICBC_CARD])
            f[60] = "22" + b1 + "000"
            assert (await t1.send_fields(mti, f)).code == "77"


# ======================================================================================
# §7 refund / pre-auth age windows (30 days), by moving the original's business date in the store
# ======================================================================================
def _shift_original(sw: DemoSwitch, rrn: str, days: int) -> str:
    """Move the journal row with this RRN ``days`` back; returns the new MMDD (its 61.3)."""
    then = (datetime.now(SHANGHAI) - timedelta(days=days)).strftime("%Y%m%d")
    db = sqlite3.connect(sw.data_dir / "switch.db", timeout=10)
    try:
        with db:
            n = db.execute("UPDATE journal SET business_date = ? WHERE rrn = ?", (then, rrn)).rowcount
    finally:
        db.close()
    assert n == 1
    return then[4:]


async def test_refund_age_window_is_30_days(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        async with signed_on(sw.terminal("10000001")) as t:
            old = await do(t, "consume", ICBC_CARD, 1_000)
            edge = await do(t, "consume", ICBC_CARD, 1_001)
            mm_old = _shift_original(sw, str(old.fields[37]), 31)
            mm_edge = _shift_original(sw, str(edge.fields[37]), 30)
            r_old = await do(t, "refund", ICBC_CARD, 100, extra={37: old.fields[37], 61: "0" * 12 + mm_old})
            assert r_old.code == "25"
            r_edge = await do(t, "refund", ICBC_CARD, 100, extra={37: edge.fields[37], 61: "0" * 12 + mm_edge})
            assert r_edge.code == "00"
            # a pre-auth older than 30 days: 25 for its void, completion and advice
            pa = await do(t, "pre_auth", ICBC_CARD, 2_000)
            extra = pre_auth_extra(pa)
            mm = _shift_original(sw, str(pa.fields[37]), 31)
            extra[61] = str(extra[61])[:12] + mm
            for kind, amount in (("pre_auth_void", 2_000), ("completion", 2_000), ("completion_advice", 2_000)):
                assert (await do(t, kind, ICBC_CARD, amount, extra=extra)).code == "25", kind
            pa2 = await do(t, "pre_auth", ICBC_CARD, 2_100)
            extra2 = pre_auth_extra(pa2)
            mm2 = _shift_original(sw, str(pa2.fields[37]), 30)
            extra2[61] = str(extra2[61])[:12] + mm2
            assert (await do(t, "completion", ICBC_CARD, 2_100, extra=extra2)).code == "00"


# ======================================================================================
# §9.6 business day: a batch from an earlier day must be settled (77); settle, sign on, go on
# ======================================================================================
async def test_batch_from_an_earlier_business_day(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as first:
        t = first.terminal("10000001")
        async with signed_on(t):
            sale = await do(t, "consume", ICBC_CARD, 1_500)
            assert sale.code == "00"
        assert first.stop() == 0
    yesterday = (datetime.now(SHANGHAI) - timedelta(days=1)).strftime("%Y%m%d")
    db = sqlite3.connect(tmp_path / "switch.db", timeout=10)
    try:
        with db:
            db.execute("UPDATE terminals SET batch_date = ? WHERE tid = '10000001'", (yesterday,))
            db.execute("UPDATE journal SET business_date = ? WHERE tid = '10000001'", (yesterday,))
    finally:
        db.close()
    with DemoSwitch(tmp_path) as sw:
        t.port = sw.port
        async with t.connect():
            assert (await do(t, "consume", ICBC_CARD, 100)).code == "77"
            assert (await do(t, "balance", ICBC_CARD, None)).code == "77"
            # signing on alone does not open a new batch
            assert (await t.sign_on("003")).code == "00"
            assert (await do(t, "consume", ICBC_CARD, 100)).code == "77"
            # the old batch settles (with yesterday's sale), then the terminal goes on
            st = await t.send_fields("0500", settle_fields(t, totals(1_500, 1, 0, 0)), mac=False)
            assert st.code == "00" and st.fields[48] == totals(1_500, 1, 0, 0, "1")
            assert (await t.sign_on("003")).code == "00"
            assert (await do(t, "consume", ICBC_CARD, 100)).code == "00"


# ======================================================================================
# §13 the enterprise limit (M2: 5,000,000.00), shared by its terminals; refunds give no headroom
# ======================================================================================
async def test_enterprise_limit_is_exactly_five_million(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        async with signed_on(sw.terminal("20000001")) as t:
            for _ in range(5):
                sale = await do(t, "consume", ICBC_CARD, 100_000_000)
                assert sale.code == "00"
                assert (await do(t, "refund", ICBC_CARD, 100_000_000, extra=refund_extra(sale))).code == "00"
            assert (await do(t, "consume", ICBC_CARD, 1)).code == "61"
            assert (await send(t, scan_request(t, "consume", WECHAT, 1))).code == "61"
            assert (await do(t, "balance", ICBC_CARD, None)).code == "00"
        async with signed_on(sw.terminal("10000001")) as t1:  # M1 is not affected
            assert (await do(t1, "consume", ICBC_CARD, 1)).code == "00"


# ======================================================================================
# §2 / §9.3 header digit 6 = 1 again once the merchant's parameters changed
# ======================================================================================
async def test_digit6_after_a_parameter_change(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    with DemoSwitch(tmp_path) as sw:
        t1 = sw.terminal("10000001")
        t2 = sw.terminal("10000002")
        for t in (t1, t2):
            async with t.connect():
                assert (await t.sign_on("003")).header_digit6 == 1
                assert (await t.parameter_download()).header_digit6 == 0
                assert (await t.echo_test()).header_digit6 == 0
        env = dict(os.environ)
        env.pop("SWITCH_MASTER_KEY", None)
        out = subprocess.run([sys.executable, "-m", "switch.cli", "merchant", "upgrade", "898310048990001",
                              "--licence", "91310000MA1FL0000X", "--data-dir", str(tmp_path)],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        async with t1.connect():
            seen = None
            for _ in range(100):  # bounded: the running switch picks the change up within a poll
                seen = (await t1.echo_test()).header_digit6
                if seen == 1:
                    break
                await anyio.sleep(0.1)
            assert seen == 1
            sale = await do(t1, "consume", ICBC_CARD, 100)
            assert sale.code == "00" and sale.header_digit6 == 1
            pd = await t1.parameter_download()
            assert pd.header_digit6 == 0 and b"07009500000000" in bytes(pd.fields[62])  # type: ignore[arg-type]
        async with t2.connect():
            assert (await t2.echo_test()).header_digit6 == 1  # the secondary too: same merchant


# ======================================================================================
# §9.1 / §9.2 / §9.3 the fixture's secondary 20000002: activation, keys, parameters, business
# ======================================================================================
async def test_secondary_20000002_from_activation_to_settlement(tmp_path: Path) -> None:
    from switch.crypto.activation import generate_terminal_key, public_key_der, unwrap_tmk

    with DemoSwitch(tmp_path) as sw:
        key = generate_terminal_key()
        boot = TerminalClient("127.0.0.1", sw.port, " " * 8, " " * 15, bytes(16))
        async with boot.connect():
            act = await boot.send_fields("0800", {11: "000001", 41: " " * 8, 42: " " * 15, 60: "00000000351",
                                                  62: b"48213579" + public_key_der(key)}, mac=False)
        assert act.code == "00" and act.fields[41] == "20000002" and act.header_digit6 == 3
        blob = act.fields[62]
        assert isinstance(blob, bytes) and len(blob) == 260
        tmk = unwrap_tmk(key, blob)
        t = TerminalClient("127.0.0.1", sw.port, "20000002", "898310058120002", tmk)
        t.next_stan = 10
        async with t.connect():
            s = await t.sign_on("003")
            assert s.code == "00" and s.header_digit6 == 1 and s.batch == "000001"
            pd = await t.parameter_download()
            assert pd.code == "00" and pd.header_digit6 == 0
            assert t.parameters["04"] == "SECONDARY" and t.parameters["05"] == "20000001"
            assert t.parameters["01"] == "星河超市" and t.parameters["07"] == str(500_000_000)
            sale = await do(t, "consume", CMB_CARD, 2_500)
            assert sale.code == "00" and sale.header_digit6 == 0
            # the main's batch knows nothing of it; the secondary's does
            async with signed_on(sw.terminal("20000001")) as main:
                # a void from the main of the secondary's sale: another terminal -> 25
                assert (await do(main, "void", CMB_CARD, 2_500, extra=void_extra(sale))).code == "25"
                # a refund from the main: same merchant -> 00, the main's credit
                assert (await do(main, "refund", CMB_CARD, 500, extra=refund_extra(sale))).code == "00"
                r = await main.send_fields("0500", settle_fields(main, totals(0, 0, 500, 1)), mac=False)
                assert r.fields[48] == totals(0, 0, 500, 1, "1")
            st = await t.send_fields("0500", settle_fields(t, totals(2_500, 1, 0, 0)), mac=False)
            assert st.code == "00" and st.fields[48] == totals(2_500, 1, 0, 0, "1")


# ======================================================================================
# §9.5 batch upload: up to 8 records per message, then the closing 202
# ======================================================================================
async def test_batch_upload_eight_records_after_an_unbalanced_settlement(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        async with signed_on(sw.terminal("10000001")) as t:
            sales = [await do(t, "consume", ICBC_CARD, 100 + i) for i in range(9)]
            assert all(s.code == "00" for s in sales)
            batch = t.batch
            st = await t.send_fields("0500", settle_fields(t, totals(1, 1, 0, 0)), mac=False)
            assert st.code == "00" and st.fields[48] == totals(sum(100 + i for i in range(9)), 9, 0, 0, "2")
            recs = ["00" + str(s.stan) + ICBC_CARD.rjust(20, "0") + f"{100 + i:012d}" for i, s in enumerate(sales)]
            up1 = await t.send_fields("0320", {11: t.take_stan(), 41: t.tid, 42: t.mid, 48: "08" + "".join(recs[:8]),
                                               60: f"00{batch}201"}, mac=False)
            assert up1.mti == "0330" and up1.code == "00"
            up2 = await t.send_fields("0320", {11: t.take_stan(), 41: t.tid, 42: t.mid, 48: "01" + recs[8],
                                               60: f"00{batch}201"}, mac=False)
            assert up2.code == "00"
            end = await t.send_fields("0320", {11: t.take_stan(), 41: t.tid, 42: t.mid, 48: "0009",
                                               60: f"00{batch}202"}, mac=False)
            assert end.code == "00" and end.mti == "0330"
            assert set(end.fields) == {11, 39, 41, 42, 60}


# ======================================================================================
# §7 transfer: source declines leave the destination alone
# ======================================================================================
async def test_transfer_source_decline_and_down_source(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal("20000001")) as t:
        dest = await available(t, CMB_DEST)
        r = await do(t, "transfer", ICBC_POOR, 10_000_000, extra={48: CMB_DEST})
        assert r.code == "51" and 38 not in r.fields and r.fields[44] == "ICBC".ljust(11) + ACQ
        mti, f = card_request(t, "transfer", "6216611771534246833", 100, pin="123456", extra={48: CMB_DEST})
        r2 = await send(t, (mti, f))
        assert r2.code == "91" and r2.fields[44] == "BOC".ljust(11) + ACQ
        mti, f = card_request(t, "transfer", CMB_CARD, 100, pin="000000", extra={48: CMB_DEST})
        assert (await send(t, (mti, f))).code == "55"
        assert await available(t, CMB_DEST) == dest


# ======================================================================================
# §15 switch_requests_total counts every answer by its F39
# ======================================================================================
async def test_requests_total_counts_each_answer_code(demo: DemoSwitch) -> None:
    def code_total(code: str) -> float:
        return metric(demo.metrics_text(), "switch_requests_total", response_code=code)

    before = {c: code_total(c) for c in ("A0", "94", "77", "40", "30", "25", "61", "12")}
    async with signed_on(demo.terminal()) as t:
        mti, f = card_request(t, "consume", ICBC_CARD, 100)
        bad = dict(f)
        bad[64] = b"\x00" * 8
        assert (await t.send_fields(mti, bad, mac=False)).code == "A0"
        mti, f = card_request(t, "consume", ICBC_CARD, 101)
        frame, _ = t.build_frame(mti, f, mac=True)
        await t.send_raw(frame)
        frame2, _ = t.build_frame(mti, {**f, 4: f"{102:012d}"}, mac=True)
        r94 = await t.send_raw(frame2)
        assert r94 is not None and r94.code == "94"
        mti, f = card_request(t, "consume", ICBC_CARD, 100)
        f[60] = "22999999000"
        assert (await t.send_fields(mti, f)).code == "77"
        mti, f = card_request(t, "consume", ICBC_CARD, 100)
        f[3] = "990000"
        assert (await t.send_fields(mti, f)).code == "40"
        mti, f = card_request(t, "consume", ICBC_CARD, 100)
        del f[49]
        assert (await t.send_fields(mti, f)).code == "30"
        sale = await do(t, "consume", ICBC_CARD, 103)
        assert (await do(t, "void", ICBC_CARD, 103, extra={**void_extra(sale), 37: "000000000000"})).code == "25"
        assert (await do(t, "void", ICBC_CARD, 103, extra=void_extra(sale))).code == "00"
        assert (await do(t, "void", ICBC_CARD, 103, extra=void_extra(sale))).code == "12"
    after = {c: code_total(c) for c in before}
    for c in ("A0", "94", "77", "40", "30", "25", "12"):
        assert after[c] == before[c] + 1, (c, before[c], after[c])


# ======================================================================================
# §7 / §13 races on one original and on the last headroom (several requests in flight, §1)
# ======================================================================================
async def _all(*coros):  # type: ignore[no-untyped-def]
    out: list[Response] = [None] * len(coros)  # type: ignore[list-item]

    async def run(i: int, c) -> None:  # type: ignore[no-untyped-def]
        out[i] = await c

    async with anyio.create_task_group() as tg:
        for i, c in enumerate(coros):
            tg.start_soon(run, i, c)
    return out


async def test_concurrent_follow_ups_on_one_original(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal()) as t:
        sale = await do(t, "consume", ICBC_CARD, 1_000)
        refunds = await _all(*(do(t, "refund", ICBC_CARD, 400, extra=refund_extra(sale)) for _ in range(4)))
        assert sorted(r.code for r in refunds) == ["00", "00", "64", "64"]
        pa = await do(t, "pre_auth", ICBC_CARD, 2_000)
        comps = await _all(*(do(t, "completion", ICBC_CARD, 2_000, extra=pre_auth_extra(pa)) for _ in range(3)))
        assert sorted(r.code for r in comps) == ["00", "12", "12"]
        sale2 = await do(t, "consume", ICBC_CARD, 1_500)
        voids = await _all(*(do(t, "void", ICBC_CARD, 1_500, extra=void_extra(sale2)) for _ in range(3)))
        assert sorted(r.code for r in voids) == ["00", "12", "12"]


async def test_two_terminals_race_for_the_last_headroom(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        async with signed_on(sw.terminal("10000001")) as t1, signed_on(sw.terminal("10000002")) as t2:
            assert (await do(t1, "consume", ICBC_CARD, 29_990_000)).code == "00"
            rs = await _all(do(t1, "consume", ICBC_CARD, 6_000), do(t2, "consume", ICBC_CARD, 6_000),
                            send(t2, scan_request(t2, "consume", WECHAT, 6_000)))
            assert sorted(r.code for r in rs) == ["00", "61", "61"]



# ======================================================================================
# §9.4 counts above 999 cannot be expressed: the switch answers 30
# ======================================================================================
async def test_settlement_of_a_batch_with_1000_debits_is_30(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        async with signed_on(sw.terminal("10000001")) as t:
            codes: list[str] = []

            async def one() -> None:
                codes.append((await send(t, scan_request(t, "consume", WECHAT, 1))).code)

            for _ in range(10):
                async with anyio.create_task_group() as tg:
                    for _ in range(100):
                        tg.start_soon(one)
            assert codes.count("00") == 1000
            r = await t.send_fields("0500", settle_fields(t, totals(1000, 999, 0, 0)), mac=False)
            assert r.mti == "0510" and r.code == "30"
            # the batch stays open
            assert (await send(t, scan_request(t, "consume", WECHAT, 1))).code == "00"


# ======================================================================================
# §15 logs: no full card number reaches them, on any path (transfer legs, upload, reversal, SAF)
# ======================================================================================
async def test_no_full_card_number_in_logs_on_every_path(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        async with signed_on(sw.terminal("10000001")) as t:
            tr = await do(t, "transfer", CMB_CARD, 100, extra={48: CMB_DEST})
            assert tr.code == "00"
            assert (await reverse(t, tr)).code == "00"
            assert (await do(t, "transfer", CMB_CARD, 100, extra={48: CMB_REFUSES_CREDIT})).code == "05"
            assert (await do(t, "transfer", CMB_CARD, 100, extra={48: "6216611771534246833"})).code == "91"
            assert (await do(t, "transfer", CMB_CARD, 100, extra={48: "6228489187204683748"})).code == "98"
            sale = await do(t, "consume", CMB_CARD, 200)
            assert (await do(t, "refund", CMB_CARD, 100, extra=refund_extra(sale))).code == "00"
            assert (await do(t, "void", CMB_CARD, 200, extra=void_extra(sale))).code == "12"  # refunded
            other = await do(t, "consume", CMB_CARD, 200)
            assert (await do(t, "void", CMB_CARD, 200, extra=void_extra(other))).code == "00"
            rec = "00" + str(sale.stan) + CMB_CARD.rjust(20, "0") + f"{200:012d}"
            assert (await t.send_fields("0320", {11: t.take_stan(), 41: t.tid, 42: t.mid, 48: "01" + rec,
                                                 60: f"00{t.batch}201"}, mac=False)).code == "00"
        assert sw.wait_log(str(sale.fields[37]))
        text = sw.log_text()
        for pan in (CMB_CARD, CMB_DEST, CMB_REFUSES_CREDIT, "6216611771534246833", "6228489187204683748"):
            assert pan not in text, pan[:6] + "..." + pan[-4:]
