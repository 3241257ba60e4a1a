"""Monthly limit (§13), fee, batch settlement (§9.4), batch upload (§9.5) and the business-day
rule (§9.6), through TransactionManager.handle with in-memory issuer links."""

from __future__ import annotations

from datetime import datetime, timezone, tzinfo

import anyio
import pytest

from typing import TYPE_CHECKING

from switch.pipeline.limits import MonthlyLimits
from switch.pos.client import TerminalClient

if TYPE_CHECKING:  # fixtures come from conftest.py; its classes are imported for typing only
    from conftest import Decoded, Harness

pytestmark = pytest.mark.anyio

CARD = "6222029375642931684"  # ICBC, 1,000,000.00
M1 = "898310048990001"


def consume_fields(client: TerminalClient, amount: int) -> dict:
    return client.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=amount,
                              pin="123456", expiry="3012")


async def consume(h: Harness, client: TerminalClient, amount: int) -> Decoded:
    return await h.send(client, "0200", consume_fields(client, amount), mac=True)


async def void(h: Harness, client: TerminalClient, original: Decoded, amount: int) -> Decoded:
    f = client.card_fields(processing_code="200000", type_code="23", card=CARD, amount_fen=amount,
                           pin="123456", expiry="3012")
    f[37] = original.fields[37]
    f[61] = str(original.fields[60])[2:8] + str(original.fields[11])
    return await h.send(client, "0200", f, mac=True)


async def refund(h: Harness, client: TerminalClient, original: Decoded, amount: int) -> Decoded:
    f = client.card_fields(processing_code="200000", type_code="25", card=CARD, amount_fen=amount,
                           expiry="3012")
    f[37] = original.fields[37]
    f[61] = "000000000000" + str(original.fields[13])
    return await h.send(client, "0220", f, mac=True)


def settlement_fields(client: TerminalClient, debit: int, dn: int, credit: int, cn: int,
                      batch: str | None = None) -> dict:
    f48 = f"{debit:012d}{dn:03d}{credit:012d}{cn:03d}0" + "0" * 31
    return {11: client.take_stan(), 41: client.tid, 42: client.mid, 48: f48, 49: "156",
            60: f"00{batch or client.batch}201"}


# ---- monthly limit -------------------------------------------------------------------------
async def test_limit_refuses_the_request_that_would_exceed_it_and_voids_give_headroom_back(harness: Harness) -> None:
    harness.state.merchants[M1].monthly_limit_fen = 10_000
    t = await harness.ready()
    first = await consume(harness, t, 6_000)
    assert first.code == "00"
    assert (await consume(harness, t, 5_000)).code == "61"
    assert (await consume(harness, t, 4_000)).code == "00"  # exactly up to the limit
    assert (await consume(harness, t, 1)).code == "61"
    assert (await void(harness, t, first, 6_000)).code == "00"
    assert (await consume(harness, t, 5_000)).code == "00"
    rows = [r for r in harness.journal() if r["txn"] == "consume"]
    assert [r["response_code"] for r in rows] == ["00", "61", "00", "61", "00"]


async def test_the_limit_starts_again_at_the_shanghai_month_boundary(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§13: the limit covers a calendar month in Asia/Shanghai (UTC+8): 2026-01-31 15:59 UTC is
    still January there, 16:01 UTC is February and the headroom is whole again, once January's
    batch is settled (§9.6)."""
    import switch.pipeline.manager as manager

    clock = {"utc": datetime(2026, 1, 31, 15, 59, tzinfo=timezone.utc)}

    class Clock(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
            return clock["utc"].astimezone(tz) if tz is not None else clock["utc"].replace(tzinfo=None)

    monkeypatch.setattr(manager, "datetime", Clock)
    harness.state.merchants[M1].monthly_limit_fen = 10_000
    t = await harness.ready()
    january = await consume(harness, t, 10_000)
    assert (january.code, january.fields[13]) == ("00", "0131")
    assert (await consume(harness, t, 1)).code == "61"
    clock["utc"] = datetime(2026, 1, 31, 16, 1, tzinfo=timezone.utc)  # 2026-02-01 00:01 in Shanghai
    assert (await consume(harness, t, 1)).code == "77"  # January's batch must be settled first
    assert (await harness.send(t, "0500", settlement_fields(t, 10_000, 1, 0, 0), mac=False)).code == "00"
    await harness.sign_on(t)
    february = await consume(harness, t, 10_000)
    assert (february.code, february.fields[13]) == ("00", "0201")
    assert (await consume(harness, t, 1)).code == "61"


async def test_two_terminals_racing_for_the_last_headroom(harness: Harness) -> None:
    """Both requests are in flight at once (the issuer holds the first): one wins, one gets 61."""
    harness.state.merchants[M1].monthly_limit_fen = 10_000
    main, secondary = await harness.ready("10000001"), await harness.ready("10000002")
    gate = harness.mocks["ICBC"].hold(CARD)
    codes: dict[str, str] = {}

    async def go(name: str, client: TerminalClient) -> None:
        codes[name] = (await consume(harness, client, 6_000)).code

    async with anyio.create_task_group() as tg:
        tg.start_soon(go, "main", main)
        await anyio.sleep(0.05)  # the first is now waiting at the issuer with its headroom taken
        tg.start_soon(go, "secondary", secondary)
        await anyio.sleep(0.05)
        gate.set()
    assert sorted(codes.values()) == ["00", "61"]
    assert harness.mocks["ICBC"].balance_of(CARD) == 100_000_000 - 6_000


async def test_declined_and_timed_out_requests_free_their_headroom(harness: Harness) -> None:
    harness.state.merchants[M1].monthly_limit_fen = 10_000
    t = await harness.ready()
    f = t.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=9_000,
                      pin="000000", expiry="3012")
    assert (await harness.send(t, "0200", f, mac=True)).code == "55"
    assert (await consume(harness, t, 10_000)).code == "00"


async def test_reversal_gives_headroom_back_and_usage_is_rebuilt_from_the_journal(harness: Harness) -> None:
    harness.state.merchants[M1].monthly_limit_fen = 10_000
    t = await harness.ready()
    a = await consume(harness, t, 7_000)
    assert a.code == "00"
    rev = {k: v for k, v in consume_fields(t, 7_000).items()}
    rev[11] = a.fields[11]
    rev[39] = "98"
    for k in (26, 35, 52, 53):
        rev.pop(k, None)
    r = await harness.send(t, "0400", rev, mac=True)
    assert (r.mti, r.code) == ("0410", "00")
    assert (await consume(harness, t, 9_000)).code == "00"
    rebuilt = MonthlyLimits()
    rebuilt.load(harness.store)
    assert rebuilt.used == harness.state.limits.used
    assert sum(harness.state.limits.reserved.values()) == 0


async def test_fee_is_half_up_to_the_fen_and_only_on_approved_sales(harness: Harness) -> None:
    t = await harness.ready()
    for amount in (250, 12_345, 83):
        assert (await consume(harness, t, amount)).code == "00"
    fees = [r["fee_fen"] for r in harness.journal() if r["txn"] == "consume"]
    assert fees == [2, 74, 0]  # 1.5 → 2, 74.07 → 74, 0.498 → 0


# ---- settlement --------------------------------------------------------------------------
async def test_balanced_settlement_closes_the_batch(harness: Harness) -> None:
    t = await harness.ready()
    a = await consume(harness, t, 12_345)
    b = await consume(harness, t, 100)
    assert (await void(harness, t, b, 100)).code == "00"
    assert (await refund(harness, t, a, 50)).code == "00"
    # debits: both sales (a voided sale stays a debit); credits: the void and the refund
    r = await harness.send(t, "0500", settlement_fields(t, 12_445, 2, 150, 2), mac=False)
    assert (r.mti, r.code) == ("0510", "00")
    assert str(r.fields[48])[:31] == "000000012445002000000000150002" + "1"
    assert str(r.fields[48])[31:] == "0" * 30 + "1"
    assert {11, 12, 13, 15, 32, 37, 39, 41, 42, 48, 49, 60} == set(r.fields)
    # the batch is closed: the old batch number now gets 77, a new sign-on gives batch 000002
    assert (await consume(harness, t, 100)).code == "77"
    signed = await harness.sign_on(t)
    assert str(signed.fields[60])[2:8] == "000002"
    assert (await consume(harness, t, 100)).code == "00"
    # settling the closed batch again returns the recorded answer; an unknown batch is 25
    again = await harness.send(t, "0500", settlement_fields(t, 1, 1, 0, 0, batch="000001"), mac=False)
    assert again.code == "00" and again.fields[48] == r.fields[48]
    assert (await harness.send(t, "0500", settlement_fields(t, 0, 0, 0, 0, batch="000009"), mac=False)).code == "25"


async def test_unbalanced_settlement_answers_the_switch_totals(harness: Harness) -> None:
    t = await harness.ready()
    assert (await consume(harness, t, 500)).code == "00"
    r = await harness.send(t, "0500", settlement_fields(t, 999, 1, 0, 0), mac=False)
    assert r.code == "00"
    assert str(r.fields[48])[:31] == "000000000500001000000000000000" + "2"


async def test_empty_current_batch_settles_with_zeros(harness: Harness) -> None:
    t = await harness.ready("10000002")
    r = await harness.send(t, "0500", settlement_fields(t, 0, 0, 0, 0), mac=False)
    assert r.code == "00" and str(r.fields[48])[30] == "1"


async def test_settlement_needs_a_sign_on_and_its_fields(harness: Harness) -> None:
    t = harness.terminal("20000001")
    assert (await harness.send(t, "0500", settlement_fields(t, 0, 0, 0, 0), mac=False)).code == "77"
    t = await harness.ready("20000001")
    f = settlement_fields(t, 0, 0, 0, 0)
    f[48] = "0" * 61
    r = await harness.send(t, "0500", f, mac=False)
    # §6.1: a 30 carries 11, 39, 41 and the echo list, not the 0510 layout (no totals, no RRN)
    assert (r.mti, r.code) == ("0510", "30") and set(r.fields) == {11, 39, 41, 42, 49, 60}
    del f[49]
    f[11] = t.take_stan()  # a new request, not a changed copy of the last (§11)
    r = await harness.send(t, "0500", f, mac=False)
    assert (r.mti, r.code) == ("0510", "30") and set(r.fields) == {11, 39, 41, 42, 60}


async def test_batch_upload_records_differences(harness: Harness) -> None:
    t = await harness.ready()
    a = await consume(harness, t, 700)
    stan = str(a.fields[11])
    records = "02" + "00" + stan + CARD.zfill(20) + f"{800:012d}" + "00" + "999999" + CARD.zfill(20) + f"{1:012d}"
    up = {11: t.take_stan(), 41: t.tid, 42: t.mid, 48: records, 60: f"00{t.batch}201"}
    r = await harness.send(t, "0320", up, mac=False)
    assert (r.mti, r.code) == ("0330", "00") and set(r.fields) == {11, 39, 41, 42, 60}
    end = {11: t.take_stan(), 41: t.tid, 42: t.mid, 48: "0002", 60: f"00{t.batch}202"}
    assert (await harness.send(t, "0320", end, mac=False)).code == "00"
    rows = harness.store.query("SELECT nmc, records, differences FROM batch_uploads ORDER BY id")
    assert [r["nmc"] for r in rows] == ["201", "202"]
    assert "amount" in rows[0]["differences"] and "not in the switch" in rows[0]["differences"]
    assert CARD not in rows[0]["records"]


# ---- business day ------------------------------------------------------------------------
async def test_a_batch_from_an_earlier_day_must_be_settled_first(harness: Harness) -> None:
    t = await harness.ready()
    assert (await consume(harness, t, 100)).code == "00"
    harness.state.terminals[t.tid].batch_date = "20000101"  # the batch was opened on an earlier day
    assert (await consume(harness, t, 100)).code == "77"
    r = await harness.send(t, "0500", settlement_fields(t, 100, 1, 0, 0), mac=False)
    assert r.code == "00"
    await harness.sign_on(t)
    assert (await consume(harness, t, 100)).code == "00"


async def test_an_original_is_also_locked_through_the_row_locker(harness: Harness) -> None:
    """With several processes (PostgreSQL) originals are locked in the database too: the void takes
    the lock on its original's row and releases it after its journal commit."""
    events: list[tuple[str, int]] = []

    class Recorder:
        def acquire(self, row_id: int):  # type: ignore[no-untyped-def]
            events.append(("acquire", row_id))
            committed = len(harness.journal())
            return lambda: events.append(("release", len(harness.journal()) - committed))

    harness.state.row_locker = Recorder()  # type: ignore[assignment]
    t = await harness.ready()
    sale = await consume(harness, t, 300)
    assert (await void(harness, t, sale, 300)).code == "00"
    original_id = next(r["id"] for r in harness.journal() if r["rrn"] == sale.fields[37])
    assert events == [("acquire", original_id), ("release", 1)]  # released after the void's row committed
