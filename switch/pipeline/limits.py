"""The merchant's monthly limit (protocol §13): approved consume, scan-to-pay, completion and
completion advice amounts of all the merchant's terminals in the calendar month (Asia/Shanghai),
minus voids and reversals. A request that would exceed it gets ``61`` (step 9).

Headroom is reserved before the issuer is asked and settled after the journal commit: two
terminals racing for the last headroom can never both be approved past the limit. Usage is rebuilt
from the journal at start-up (rows whose state is ``approved``), so it is exactly what the journal
says after a crash. This ledger is per process; several processes on one database need the
database to arbitrate (the PostgreSQL store).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from switch.adapters.sqlite_store import SqliteStore

COUNTED = frozenset({"consume", "scan_to_pay", "completion", "completion_advice"})


def month_of(business_date: str) -> str:
    return business_date[:6]


def counts(row: dict[str, Any]) -> bool:
    """Does this journal row, in its current state, use headroom?"""
    return row.get("txn") in COUNTED and row.get("state") == "approved" and row.get("amount_fen") is not None


@dataclass
class MonthlyLimits:
    used: dict[tuple[str, str], int] = field(default_factory=dict)
    reserved: dict[tuple[str, str], int] = field(default_factory=dict)

    def load(self, store: SqliteStore) -> None:
        marks = ",".join("?" for _ in COUNTED)
        self.used.clear()
        for r in store.query(
            f"SELECT mid, substr(business_date, 1, 6) AS month, SUM(amount_fen) AS total FROM journal"
            f" WHERE txn IN ({marks}) AND state = 'approved' AND dup_key IS NOT NULL GROUP BY mid, month",
            sorted(COUNTED),
        ):
            self.used[(r["mid"], r["month"])] = int(r["total"] or 0)

    def headroom(self, mid: str, month: str, limit_fen: int) -> int:
        key = (mid, month)
        return limit_fen - self.used.get(key, 0) - self.reserved.get(key, 0)

    def reserve(self, mid: str, month: str, amount_fen: int, limit_fen: int) -> bool:
        """Take headroom for a request in flight; False when it would exceed the limit."""
        if amount_fen > self.headroom(mid, month, limit_fen):
            return False
        key = (mid, month)
        self.reserved[key] = self.reserved.get(key, 0) + amount_fen
        return True

    def settle(self, mid: str, month: str, amount_fen: int, approved: bool) -> None:
        """After the journal commit: an approved reservation becomes usage, a declined one is freed."""
        key = (mid, month)
        self.reserved[key] = self.reserved.get(key, 0) - amount_fen
        if approved:
            self.used[key] = self.used.get(key, 0) + amount_fen

    def adjust(self, mid: str, month: str, delta_fen: int) -> None:
        """A committed state change of an earlier row (void, reversal, reversal of a void)."""
        key = (mid, month)
        self.used[key] = self.used.get(key, 0) + delta_fen
