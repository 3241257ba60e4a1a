"""The terminal end-of-day report on a real SQLite store: which rows are listed (primary rows of
that terminal and day, no management messages, no retransmissions), successful vs failed, the
counting rules (a voided sale stays a debit and its void is a credit, reversed rows never count,
fees only for sales still approved, refunds keep the fee), JSON and text, and ``switch report``."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from switch.adapters.sqlite_store import JournalEntry, SqliteStore
from switch.admin.reports import ReportError, parse_business_date, terminal_day
from switch.app import seed_demo
from switch.cli import main as switch_main
from switch.crypto.keystore import MasterKey

KEY_HEX = "22" * 32
DAY = "20240301"
MID1, MID2 = "898310048990001", "898310058120002"
T1, T1B, T2 = "10000001", "10000002", "20000001"
MID_OF = {T1: MID1, T1B: MID1, T2: MID2}
CARD = "622202******3445"

_stan = itertools.count(1)


def entry(tid: str, txn: str, amount_fen: int | None, state: str, rc: str = "00", *, fee_fen: int | None = None,
          day: str = DAY, primary: bool = True, created_at: str = "2024-03-01T02:15:30.000000+00:00",
          rrn: str | None = None, auth_code: str | None = None, stan: str | None = None) -> JournalEntry:
    n = next(_stan)
    stan = stan or f"{n:06d}"
    mti = {"refund": "0220", "completion_advice": "0220", "reversal": "0400", "sign_on": "0800"}.get(txn, "0200")
    return JournalEntry(
        created_at=created_at, business_date=day, tid=tid, mid=MID_OF[tid], mti=mti, txn=txn,
        response_code=rc, stan=stan, batch="000001", rrn=rrn or f"{n:012d}",
        auth_code=auth_code or (f"{n:06d}" if rc == "00" else None), amount_fen=amount_fen, fee_fen=fee_fen,
        pan_masked=CARD if amount_fen is not None else None,
        dup_key=f"{tid}|000001|{stan}|{mti}" if primary else None,
        state=state if primary else "duplicate",
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "switch.db", MasterKey.from_hex(KEY_HEX))
    s.open()
    seed_demo(s)
    try:
        yield s
    finally:
        s.close()


def insert(store: SqliteStore, *entries: JournalEntry) -> None:
    """Straight into the table (the writer's own insert op, applied in one transaction)."""
    store.db.execute("BEGIN IMMEDIATE")
    for e in entries:
        store.op_journal(e)(store.db)
    store.db.execute("COMMIT")


def a_day(store: SqliteStore) -> None:
    """Terminal T1 on DAY: 1000.00 approved (fee 6.00), 200.00 voided (fee 1.20) and its void,
    300.00 reversed (fee 1.80) and its reversal, a 50.00 refund, a decline, a retransmission, a
    sign-on; noise on other terminals and days."""
    insert(
        store,
        entry(T1, "sign_on", None, "", created_at="2024-03-01T01:00:00+00:00"),
        entry(T1, "consume", 100000, "approved", fee_fen=600, rrn="000000000101", auth_code="A1B2C3"),
        entry(T1, "consume", 20000, "voided", fee_fen=120),
        entry(T1, "consume_void", 20000, "approved"),
        entry(T1, "consume", 30000, "reversed", fee_fen=180),
        entry(T1, "reversal", 30000, "approved"),
        entry(T1, "refund", 5000, "approved"),
        entry(T1, "consume", 999, "declined", rc="51"),
        entry(T1, "consume", 100000, "approved", fee_fen=600, primary=False),  # a retransmission
        entry(T1, "consume", 100000, "duplicate", fee_fen=600),  # one that kept its dup_key
        entry(T1B, "scan_to_pay", 8000, "approved", fee_fen=48),  # another terminal of the merchant
        entry(T2, "consume", 1000, "approved", fee_fen=6),
        entry(T1, "consume", 7000, "approved", fee_fen=42, day="20240302"),  # another day
    )


def test_lists_the_day_of_one_terminal_split_by_response(store: SqliteStore) -> None:
    a_day(store)
    r = terminal_day(store, T1, "2024-03-01")
    assert (r.tid, r.mid, r.shop_name, r.business_date) == (T1, MID1, "老王便利店", DAY)
    assert [(ln.txn, ln.amount_fen, ln.state) for ln in r.successful] == [
        ("consume", 100000, "approved"), ("consume", 20000, "voided"), ("consume_void", 20000, "approved"),
        ("consume", 30000, "reversed"), ("reversal", 30000, "approved"), ("refund", 5000, "approved"),
    ]
    assert [(ln.txn, ln.amount_fen, ln.response_code, ln.meaning) for ln in r.failed] == [
        ("consume", 999, "51", "insufficient funds"),
    ]
    first = r.successful[0]
    assert (first.time, first.card, first.amount, first.rrn, first.auth_code, first.batch) == (
        "10:15:30", CARD, "1000.00", "000000000101", "A1B2C3", "000001")


def test_totals_count_voids_as_credits_and_cancel_fees_of_voided_and_reversed_sales(store: SqliteStore) -> None:
    a_day(store)
    t = terminal_day(store, T1, DAY).totals
    assert (t.sales.count, t.sales.amount_fen) == (2, 120000)  # approved + voided; reversed never
    assert (t.voids.count, t.voids.amount_fen) == (1, 20000)
    assert (t.refunds.count, t.refunds.amount_fen) == (1, 5000)
    assert t.fees_fen == 600  # 1.20 (voided) and 1.80 (reversed) cancelled; the refund keeps it
    assert t.net_fen == 120000 - 20000 - 5000 - 600


def test_a_reversed_void_does_not_count_and_a_completion_family_counts(store: SqliteStore) -> None:
    insert(
        store,
        entry(T1, "completion", 11500, "voided", fee_fen=69),
        entry(T1, "completion_void", 11500, "approved"),
        entry(T1, "completion_advice", 4000, "approved", fee_fen=24),
        entry(T1, "consume", 6000, "approved", fee_fen=36),
        entry(T1, "consume_void", 6000, "reversed"),  # the void was reversed: the sale stands
        entry(T1, "pre_auth", 50000, "completed"),
        entry(T1, "balance_inquiry", None, "approved"),
        entry(T1, "refund", 700, "declined", rc="25"),
    )
    t = terminal_day(store, T1, DAY).totals
    assert (t.sales.count, t.sales.amount_fen) == (3, 11500 + 4000 + 6000)
    assert (t.voids.count, t.voids.amount_fen) == (1, 11500)
    assert (t.refunds.count, t.refunds.amount_fen) == (0, 0)
    assert t.fees_fen == 24 + 36
    assert t.net_fen == 4000 + 6000 - 60


def test_json_carries_lines_and_totals_in_fen_and_yuan(store: SqliteStore) -> None:
    a_day(store)
    d = json.loads(terminal_day(store, T1, DAY).to_json())
    assert d["tid"] == T1 and d["business_date"] == DAY and d["shop_name"] == "老王便利店"
    assert len(d["successful"]) == 6 and len(d["failed"]) == 1
    assert d["failed"][0]["amount"] == "9.99" and d["failed"][0]["response_code"] == "51"
    assert d["totals"]["sales"] == {"count": 2, "amount_fen": 120000, "amount": "1200.00"}
    assert d["totals"]["fees"] == "6.00" and d["totals"]["net"] == "944.00"
    assert d["totals"]["net_fen"] == 94400


def test_text_is_a_readable_end_of_day_list(store: SqliteStore) -> None:
    a_day(store)
    text = terminal_day(store, T1, DAY).to_text()
    assert "老王便利店" in text and "2024-03-01" in text and T1 in text
    assert "SUCCESSFUL (6)" in text and "FAILED (1)" in text
    assert "51 insufficient funds" in text
    assert "[VOIDED]" in text and "[REVERSED]" in text
    net_line = next(line for line in text.splitlines() if "NET" in line)
    assert net_line.split()[-1] == "944.00"
    assert "sign_on" not in text


def test_an_empty_day_and_an_unknown_terminal(store: SqliteStore) -> None:
    r = terminal_day(store, T2, "20240301")
    assert r.successful == [] and r.failed == [] and r.totals.net_fen == 0
    assert "(none)" in r.to_text()
    with pytest.raises(ReportError):
        terminal_day(store, "99999999", DAY)


@pytest.mark.parametrize("bad", ["2024-02-30", "2024/03/01", "240301", "２０２４0301", ""])
def test_business_date_is_strict(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_business_date(bad)


@pytest.mark.anyio
async def test_rows_written_through_the_group_committing_writer(store: SqliteStore) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(store.run_writer)
        await store.write(store.op_journal(entry(T1, "consume", 12345, "approved", fee_fen=74)),
                          store.op_journal(entry(T1, "refund", 345, "approved")))
        r = terminal_day(store, T1, DAY)
        tg.cancel_scope.cancel()
    assert r.totals.net_fen == 12345 - 74 - 345


# ---- switch report ---------------------------------------------------------------------------
@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SWITCH_MASTER_KEY", KEY_HEX)
    d = tmp_path / "data"
    s = SqliteStore(d / "switch.db", MasterKey.from_hex(KEY_HEX))
    s.open()
    try:
        seed_demo(s)
        a_day(s)
    finally:
        s.close()
    return d


def test_cli_prints_json(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = switch_main(["report", "terminal", T1, "--date", "2024-03-01", "--json", "--data-dir", str(data_dir)])
    d: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert d["totals"]["net_fen"] == 94400 and len(d["failed"]) == 1


def test_cli_prints_text(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = switch_main(["report", "terminal", T1, "--date", "2024-03-01", "--data-dir", str(data_dir)])
    out = capsys.readouterr().out
    assert rc == 0 and "TERMINAL END-OF-DAY REPORT" in out and "944.00" in out


def test_cli_errors(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert switch_main(["report", "terminal", "99999999", "--date", "2024-03-01",
                        "--data-dir", str(data_dir)]) == 1
    assert "unknown terminal" in capsys.readouterr().err
    assert switch_main(["report", "terminal", T1, "--date", "2024-13-01", "--data-dir", str(data_dir)]) == 2
    assert switch_main(["report", "terminal", T1, "--data-dir", str(data_dir)]) == 2
    assert switch_main(["report", "terminal", T1, "--date", "2024-03-01",
                        "--data-dir", str(tmp_path / "nowhere")]) == 1
    assert not (tmp_path / "nowhere").exists()
