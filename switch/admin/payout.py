"""The daily merchant payout run (protocol §13): per merchant and business day, the net of the
day (approved amounts − fees − refunds) is added to the balance carried from its previous payout;
a balance of at least 500.00 CNY is paid to the merchant's settlement account, anything less (or
negative) is carried forward.

Owns: the ``payouts`` rows (one per merchant and business date, all of one run written in one
transaction) and the bank file ``settlement-YYYYMMDD.csv`` (one line per paid merchant).
A run for a date that is already recorded pays nothing again: it returns the recorded rows and
rewrites the same file.

Must not: write a clear settlement account anywhere (file, log, exception: the account is shown
masked, first 6 + last 4), use floats for money, change journal rows, or run for a business day
that is not over yet (later transactions of that day would never be paid).
The counting rules come from ``switch.admin.reports``; this module does not restate them.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from switch.adapters.sqlite_store import SqliteStore
from switch.admin.reports import SHANGHAI, display_date, parse_business_date, totals_of
from switch.domain.cards import mask_pan
from switch.domain.money import yuan

log = logging.getLogger("switch.payout")

PAYOUT_THRESHOLD_FEN = 500_00  # §13: paid once the accumulated balance is at least 500.00 CNY
CSV_HEADER = ("mid", "shop_name", "bank_name", "account_masked", "amount_yuan", "business_date")


class PayoutError(RuntimeError):
    """The run was refused (day not over, or a later day already paid out); nothing was recorded."""


@dataclass(frozen=True)
class PayoutLine:
    """One merchant's payout row of one business day (amounts in fen)."""

    mid: str
    shop_name: str
    bank_name: str
    account_masked: str  # '' when the merchant has no settlement account on file
    approved_fen: int  # sales of the day minus the day's voids
    fees_fen: int
    refunds_fen: int
    net_fen: int  # approved − fees − refunds
    balance_before_fen: int  # carried from the merchant's previous payout
    paid_fen: int
    carried_fen: int

    @property
    def paid(self) -> bool:
        return self.paid_fen > 0


@dataclass(frozen=True)
class PayoutResult:
    business_date: str  # YYYYMMDD
    lines: list[PayoutLine]  # every merchant, by MID
    csv_path: Path
    already_recorded: bool  # True: this date was paid out before; nothing new was recorded

    @property
    def paid_lines(self) -> list[PayoutLine]:
        return [ln for ln in self.lines if ln.paid]

    @property
    def total_paid_fen(self) -> int:
        return sum(ln.paid_fen for ln in self.lines)

    @property
    def total_carried_fen(self) -> int:
        return sum(ln.carried_fen for ln in self.lines)


def csv_name(business_date: str) -> str:
    return f"settlement-{business_date}.csv"


def run_payout(
    store: SqliteStore,
    business_date: date | str,
    *,
    out_dir: Path,
    today: date | None = None,
) -> PayoutResult:
    """Pay out ``business_date`` (YYYYMMDD, YYYY-MM-DD or a date) and write the bank file in
    ``out_dir``. ``today`` (default: the Asia/Shanghai date now) guards against paying out a day
    that is not over. Uses the store's write connection: do not call it while this same store
    object's journal writer is running (another process — a running switch — is fine: SQLite
    serialises the transactions)."""
    day = parse_business_date(business_date)
    today = today or datetime.now(SHANGHAI).date()
    if day >= today.strftime("%Y%m%d"):
        raise PayoutError(f"business day {display_date(day)} is not over yet (today is {today.isoformat()})")
    db = store.db
    db.execute("BEGIN IMMEDIATE")
    try:
        merchants = _merchants(store)
        recorded = _recorded(store, day)
        lines: list[PayoutLine] = []
        missing = [mid for mid in sorted(merchants) if mid not in recorded]
        if missing:
            by_mid: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for row in _rows(store, "SELECT * FROM journal WHERE business_date = ? AND dup_key IS NOT NULL"
                             " ORDER BY id", (day,)):
                by_mid[str(row["mid"])].append(row)
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            for mid in missing:
                later = db.execute(
                    "SELECT business_date FROM payouts WHERE mid = ? AND business_date > ?"
                    " ORDER BY business_date LIMIT 1", (mid, day),
                ).fetchone()
                if later is not None:
                    raise PayoutError(
                        f"merchant {mid} was already paid out for the later day {display_date(later[0])};"
                        f" run the days in order"
                    )
                prev = db.execute(
                    "SELECT carried_fen FROM payouts WHERE mid = ? AND business_date < ?"
                    " ORDER BY business_date DESC LIMIT 1", (mid, day),
                ).fetchone()
                line = _compute(merchants[mid], by_mid.get(mid, []), int(prev[0]) if prev else 0)
                db.execute(
                    "INSERT INTO payouts (mid, business_date, approved_fen, fees_fen, refunds_fen, net_fen,"
                    " balance_before_fen, paid_fen, carried_fen, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (mid, day, line.approved_fen, line.fees_fen, line.refunds_fen, line.net_fen,
                     line.balance_before_fen, line.paid_fen, line.carried_fen, now),
                )
                recorded[mid] = line
        lines = [recorded[mid] for mid in sorted(recorded)]
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    path = _write_csv(Path(out_dir), day, lines)
    result = PayoutResult(day, lines, path, already_recorded=not missing)
    log.info(
        "payout %s: %d merchant(s) paid %s CNY, %s CNY carried%s",
        day, len(result.paid_lines), yuan(result.total_paid_fen), yuan(result.total_carried_fen),
        " (already recorded)" if result.already_recorded else "",
    )
    return result


@dataclass(frozen=True)
class _Merchant:
    mid: str
    shop_name: str
    bank_name: str
    account_masked: str


def _rows(store: SqliteStore, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    cur = store.db.execute(sql, params)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def _merchants(store: SqliteStore) -> dict[str, _Merchant]:
    out = {}
    for r in _rows(store, "SELECT mid, shop_name, bank_name, bank_account_enc FROM merchants", ()):
        mid = str(r["mid"])
        blob = r["bank_account_enc"]
        masked = mask_pan(store.master_key.unwrap(bytes(blob), f"account:{mid}").decode("ascii")) if blob else ""
        out[mid] = _Merchant(mid, str(r["shop_name"] or ""), str(r["bank_name"] or ""), masked)
    return out


def _recorded(store: SqliteStore, day: str) -> dict[str, PayoutLine]:
    """The payout rows already recorded for ``day`` (merchant data as it is now)."""
    out = {}
    for r in _rows(
        store,
        "SELECT p.*, m.shop_name, m.bank_name, m.bank_account_enc FROM payouts p"
        " LEFT JOIN merchants m ON m.mid = p.mid WHERE p.business_date = ?",
        (day,),
    ):
        mid = str(r["mid"])
        blob = r["bank_account_enc"]
        masked = mask_pan(store.master_key.unwrap(bytes(blob), f"account:{mid}").decode("ascii")) if blob else ""
        out[mid] = PayoutLine(
            mid, str(r["shop_name"] or ""), str(r["bank_name"] or ""), masked,
            int(r["approved_fen"]), int(r["fees_fen"]), int(r["refunds_fen"]), int(r["net_fen"]),
            int(r["balance_before_fen"]), int(r["paid_fen"]), int(r["carried_fen"]),
        )
    return out


def _compute(m: _Merchant, rows: Sequence[Mapping[str, Any]], carried_before_fen: int) -> PayoutLine:
    t = totals_of(rows)
    balance = carried_before_fen + t.net_fen
    paid = balance if balance >= PAYOUT_THRESHOLD_FEN else 0
    return PayoutLine(
        m.mid, m.shop_name, m.bank_name, m.account_masked,
        approved_fen=t.approved_fen, fees_fen=t.fees_fen, refunds_fen=t.refunds.amount_fen,
        net_fen=t.net_fen, balance_before_fen=carried_before_fen, paid_fen=paid, carried_fen=balance - paid,
    )


def _write_csv(out_dir: Path, day: str, lines: list[PayoutLine]) -> Path:
    """The bank file, replaced atomically; the same rows give the same bytes."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_HEADER)
    for ln in lines:
        if ln.paid:
            w.writerow((ln.mid, ln.shop_name, ln.bank_name, ln.account_masked, yuan(ln.paid_fen), day))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / csv_name(day)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
