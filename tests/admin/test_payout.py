"""The daily merchant payout on a real SQLite store: net = approved − fees − refunds (voids cancel
their sale and its fee, reversed rows never count), the 500.00 CNY threshold with carried
balances across days, negative balances carried, reruns that pay nothing twice (same rows, same
file bytes), days in order only and only finished days, a bank file with the masked account only,
and ``switch payout``."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import anyio
import pytest

from switch.adapters.sqlite_store import JournalEntry, SqliteStore
from switch.admin.payout import PayoutError, run_payout
from switch.app import seed_demo
from switch.cli import main as switch_main
from switch.crypto.keystore import MasterKey

KEY_HEX = "22" * 32
MID1, MID2 = "898310048990001", "898310058120002"
T1, T1B, T2 = "10000001", "10000002", "20000001"
MID_OF = {T1: MID1, T1B: MID1, T2: MID2}
ACCOUNT = "6222020200112233445"
DAY1 = "20240301"
TODAY = date(2024, 4, 1)  # every business day below is over

_stan = itertools.count(1)


def entry(tid: str, txn: str, amount_fen: int, state: str, rc: str = "00", *, fee_fen: int | None = None,
          day: str = "20240301", primary: bool = True) -> JournalEntry:
    stan = f"{next(_stan):06d}"
    mti = "0220" if txn == "refund" else "0200"
    return JournalEntry(
        created_at="2024-03-01T02:00:00+00:00", business_date=day, tid=tid, mid=MID_OF[tid], mti=mti,
        txn=txn, response_code=rc, stan=stan, batch="000001", rrn=f"0000{stan}00", amount_fen=amount_fen,
        fee_fen=fee_fen, pan_masked="622202******3445",
        dup_key=f"{tid}|000001|{stan}|{mti}" if primary else None, state=state if primary else "duplicate",
    )


def insert(store: SqliteStore, *entries: JournalEntry) -> None:
    store.db.execute("BEGIN IMMEDIATE")
    for e in entries:
        store.op_journal(e)(store.db)
    store.db.execute("COMMIT")


def set_account(store: SqliteStore, mid: str, account: str = ACCOUNT, bank: str = "中国工商银行") -> None:
    store.db.execute(
        "UPDATE merchants SET bank_account_enc = ?, bank_name = ? WHERE mid = ?",
        (store.master_key.wrap(account.encode(), f"account:{mid}"), bank, mid),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "switch.db", MasterKey.from_hex(KEY_HEX))
    s.open()
    seed_demo(s)
    set_account(s, MID1)
    try:
        yield s
    finally:
        s.close()


def payouts(store: SqliteStore) -> list[dict[str, Any]]:
    cur = store.db.execute("SELECT * FROM payouts ORDER BY business_date, mid")
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def test_net_of_a_day_with_sales_void_refund_reversal_and_declines(store: SqliteStore, tmp_path: Path) -> None:
    insert(
        store,
        entry(T1, "consume", 100000, "approved", fee_fen=600),
        entry(T1, "consume", 20000, "voided", fee_fen=120),
        entry(T1, "consume_void", 20000, "approved"),
        entry(T1, "consume", 30000, "reversed", fee_fen=180),
        entry(T1, "reversal", 30000, "approved"),
        entry(T1, "refund", 5000, "approved"),
        entry(T1, "consume", 999, "declined", rc="51"),
        entry(T1, "consume", 100000, "approved", fee_fen=600, primary=False),  # retransmission
        entry(T1B, "scan_to_pay", 8000, "approved", fee_fen=48),
        entry(T2, "consume", 1000, "approved", fee_fen=6),
        entry(T1, "consume", 7000, "approved", fee_fen=42, day="20240302"),
    )
    result = run_payout(store, "2024-03-01", out_dir=tmp_path / "out", today=TODAY)
    by_mid = {ln.mid: ln for ln in result.lines}
    m1 = by_mid[MID1]
    assert m1.approved_fen == 100000 + 20000 + 8000 - 20000  # the void cancels its sale
    assert m1.fees_fen == 600 + 48  # voided and reversed sales' fees cancelled
    assert m1.refunds_fen == 5000
    assert m1.net_fen == 108000 - 648 - 5000
    assert (m1.balance_before_fen, m1.paid_fen, m1.carried_fen) == (0, 102352, 0)
    m2 = by_mid[MID2]
    assert (m2.net_fen, m2.paid_fen, m2.carried_fen) == (994, 0, 994)
    assert result.total_paid_fen == 102352 and not result.already_recorded
    assert [(r["mid"], r["net_fen"], r["paid_fen"], r["carried_fen"]) for r in payouts(store)] == [
        (MID1, 102352, 102352, 0), (MID2, 994, 0, 994)]
    assert csv_rows(result.csv_path) == [
        ["mid", "shop_name", "bank_name", "account_masked", "amount_yuan", "business_date"],
        [MID1, "老王便利店", "中国工商银行", "622202*********3445", "1023.52", "20240301"],
    ]
    assert result.csv_path == tmp_path / "out" / "settlement-20240301.csv"


def test_threshold_carries_300_then_pays_550_then_nothing(store: SqliteStore, tmp_path: Path) -> None:
    insert(
        store,
        entry(T1, "consume", 30181, "approved", fee_fen=181, day="20240301"),  # net 300.00
        entry(T1, "consume", 25151, "approved", fee_fen=151, day="20240302"),  # net 250.00
    )
    out = tmp_path / "out"
    d1 = {ln.mid: ln for ln in run_payout(store, "20240301", out_dir=out, today=TODAY).lines}[MID1]
    assert (d1.net_fen, d1.balance_before_fen, d1.paid_fen, d1.carried_fen) == (30000, 0, 0, 30000)
    assert csv_rows(out / "settlement-20240301.csv")[1:] == []

    r2 = run_payout(store, "20240302", out_dir=out, today=TODAY)
    d2 = {ln.mid: ln for ln in r2.lines}[MID1]
    assert (d2.net_fen, d2.balance_before_fen, d2.paid_fen, d2.carried_fen) == (25000, 30000, 55000, 0)
    assert [row[4] for row in csv_rows(r2.csv_path)[1:]] == ["550.00"]

    r3 = run_payout(store, "20240303", out_dir=out, today=TODAY)
    d3 = {ln.mid: ln for ln in r3.lines}[MID1]
    assert (d3.net_fen, d3.balance_before_fen, d3.paid_fen, d3.carried_fen) == (0, 0, 0, 0)
    assert r3.total_paid_fen == 0 and csv_rows(r3.csv_path)[1:] == []
    assert sum(r["paid_fen"] for r in payouts(store)) == 55000


def test_exactly_500_is_paid_and_a_fen_less_is_carried(store: SqliteStore, tmp_path: Path) -> None:
    insert(store, entry(T1, "consume", 50000, "approved", fee_fen=0, day="20240301"),
           entry(T2, "consume", 49999, "approved", fee_fen=0, day="20240301"))
    by_mid = {ln.mid: ln for ln in run_payout(store, DAY1, out_dir=tmp_path, today=TODAY).lines}
    assert (by_mid[MID1].paid_fen, by_mid[MID1].carried_fen) == (50000, 0)
    assert (by_mid[MID2].paid_fen, by_mid[MID2].carried_fen) == (0, 49999)


def test_a_negative_balance_is_carried_and_offsets_the_next_day(store: SqliteStore, tmp_path: Path) -> None:
    insert(
        store,
        entry(T1, "refund", 20000, "approved", day="20240301"),  # refund of an older sale only
        entry(T1, "consume", 80000, "approved", fee_fen=480, day="20240302"),
    )
    d1 = {ln.mid: ln for ln in run_payout(store, "20240301", out_dir=tmp_path, today=TODAY).lines}[MID1]
    assert (d1.net_fen, d1.paid_fen, d1.carried_fen) == (-20000, 0, -20000)
    d2 = {ln.mid: ln for ln in run_payout(store, "20240302", out_dir=tmp_path, today=TODAY).lines}[MID1]
    assert (d2.balance_before_fen, d2.net_fen, d2.paid_fen, d2.carried_fen) == (-20000, 79520, 59520, 0)


def test_a_rerun_pays_nothing_twice(store: SqliteStore, tmp_path: Path) -> None:
    insert(store, entry(T1, "consume", 60000, "approved", fee_fen=360))
    out = tmp_path / "out"
    first = run_payout(store, DAY1, out_dir=out, today=TODAY)
    rows, data = payouts(store), first.csv_path.read_bytes()
    # a late row for that day (e.g. written by mistake) does not change a recorded payout
    insert(store, entry(T1, "consume", 90000, "approved", fee_fen=540))
    first.csv_path.unlink()
    again = run_payout(store, DAY1, out_dir=out, today=TODAY)
    assert again.already_recorded and not first.already_recorded
    assert again.lines == first.lines and again.total_paid_fen == 59640
    assert payouts(store) == rows
    assert again.csv_path.read_bytes() == data
    # and the next day carries on from what was recorded
    nxt = {ln.mid: ln for ln in run_payout(store, "20240302", out_dir=out, today=TODAY).lines}[MID1]
    assert (nxt.balance_before_fen, nxt.paid_fen) == (0, 0)


def test_the_bank_file_holds_the_masked_account_only(store: SqliteStore, tmp_path: Path) -> None:
    set_account(store, MID2, "6217000010001234567", "中国建设银行")
    insert(store, entry(T1, "consume", 70000, "approved", fee_fen=420),
           entry(T2, "consume", 90000, "approved", fee_fen=540))
    result = run_payout(store, DAY1, out_dir=tmp_path, today=TODAY)
    raw = result.csv_path.read_bytes()
    assert ACCOUNT.encode() not in raw and b"6217000010001234567" not in raw
    text = raw.decode("utf-8")
    assert "622202*********3445" in text and "621700*********4567" in text
    assert [r[0] for r in csv_rows(result.csv_path)[1:]] == [MID1, MID2]


def test_days_must_be_over_and_run_in_order(store: SqliteStore, tmp_path: Path) -> None:
    with pytest.raises(PayoutError, match="not over"):
        run_payout(store, "2024-04-01", out_dir=tmp_path, today=TODAY)
    run_payout(store, "20240305", out_dir=tmp_path, today=TODAY)
    with pytest.raises(PayoutError, match="in order"):
        run_payout(store, "20240304", out_dir=tmp_path, today=TODAY)
    assert [r["business_date"] for r in payouts(store)] == ["20240305", "20240305"]  # nothing half-written
    assert not (tmp_path / "settlement-20240304.csv").exists()


@pytest.mark.anyio
async def test_rows_from_the_group_committing_writer(store: SqliteStore, tmp_path: Path) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(store.run_writer)
        await store.write(store.op_journal(entry(T1, "consume", 60000, "approved", fee_fen=360)),
                          store.op_journal(entry(T1, "consume_void", 60000, "reversed")))
        tg.cancel_scope.cancel()
    result = run_payout(store, DAY1, out_dir=tmp_path, today=TODAY)
    assert {ln.mid: ln.paid_fen for ln in result.lines}[MID1] == 59640


# ---- switch payout ---------------------------------------------------------------------------
@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SWITCH_MASTER_KEY", KEY_HEX)
    d = tmp_path / "data"
    s = SqliteStore(d / "switch.db", MasterKey.from_hex(KEY_HEX))
    s.open()
    try:
        seed_demo(s)
        set_account(s, MID1)
        insert(s, entry(T1, "consume", 60000, "approved", fee_fen=360))
    finally:
        s.close()
    return d


def test_cli_pays_and_prints_a_summary(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bank"
    argv = ["payout", "--date", "2024-03-01", "--out", str(out), "--data-dir", str(data_dir)]
    assert switch_main(argv) == 0
    text = capsys.readouterr().out
    assert "596.40" in text and str(out / "settlement-20240301.csv") in text and ACCOUNT not in text
    assert csv_rows(out / "settlement-20240301.csv")[1][4] == "596.40"
    assert switch_main(argv) == 0
    assert "already recorded" in capsys.readouterr().out


def test_cli_default_out_dir_and_errors(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert switch_main(["payout", "--date", "2024-03-01", "--data-dir", str(data_dir)]) == 0
    assert (data_dir / "payouts" / "settlement-20240301.csv").exists()
    assert switch_main(["payout", "--date", "2999-01-01", "--data-dir", str(data_dir)]) == 1
    assert "not over" in capsys.readouterr().err
    assert switch_main(["payout", "--date", "01/03/2024", "--data-dir", str(data_dir)]) == 2
    assert switch_main(["payout", "--data-dir", str(data_dir)]) == 2
