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

import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from switch.adapters.sqlite_store import Op, SqliteStore

log = logging.getLogger("switch.limits")

COUNTED = frozenset({"consume", "scan_to_pay", "completion", "completion_advice"})


def month_of(business_date: str) -> str:
    return business_date[:6]


def counts(row: dict[str, Any]) -> bool:
    """Does this journal row, in its current state, use headroom?"""
    return row.get("txn") in COUNTED and row.get("state") == "approved" and row.get("amount_fen") is not None


Reservation = tuple[str, str, int, str]  # mid, month, fen, id


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

    def reserve(self, mid: str, month: str, amount_fen: int, limit_fen: int) -> Reservation | None:
        """Take headroom for a request in flight; None when it would exceed the limit."""
        if amount_fen > self.headroom(mid, month, limit_fen):
            return None
        key = (mid, month)
        self.reserved[key] = self.reserved.get(key, 0) + amount_fen
        return (mid, month, amount_fen, "")

    def commit_ops(self, reservation: Reservation | None, approved: bool,
                   deltas: list[tuple[str, str, int]]) -> list[Op]:
        """Store changes for the request's journal commit (none: this ledger lives in memory)."""
        return []

    def committed(self, reservation: Reservation | None, approved: bool, deltas: list[tuple[str, str, int]]) -> None:
        """After the journal commit: an approved reservation becomes usage, a declined one is
        freed, and state changes of earlier rows (voids, reversals) move the usage."""
        if reservation is not None:
            mid, month, fen, _ = reservation
            key = (mid, month)
            self.reserved[key] = self.reserved.get(key, 0) - fen
            if approved:
                self.used[key] = self.used.get(key, 0) + fen
        for mid, month, delta in deltas:
            key = (mid, month)
            self.used[key] = self.used.get(key, 0) + delta

    def release(self, reservation: Reservation) -> None:
        """The request ended without a journal commit."""
        self.committed(reservation, False, [])


class DatabaseLimits:
    """The same ledger arbitrated by the database, for several switch processes on one PostgreSQL.

    A merchant-month row (``limit_usage``, created from the journal the first time it is needed) is
    locked FOR UPDATE while a reservation is checked and inserted (``limit_reservations``); the
    request's journal commit deletes its reservation and adds its amount to the usage when it was
    approved, and voids and reversals move the usage in their own commits. Reservations older than
    ``stale_after`` (a crashed process's) no longer count.
    """

    def __init__(self, connect: Callable[[], Any], stale_after: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self._connect = connect
        self._conn: Any = None
        self.stale_after = stale_after
        self.clock = clock

    def load(self, store: SqliteStore) -> None:
        """Nothing to rebuild: the database holds the usage."""

    def _db(self) -> Any:
        if self._conn is None or getattr(self._conn, "closed", False):
            self._conn = self._connect()
        return self._conn

    def reserve(self, mid: str, month: str, amount_fen: int, limit_fen: int) -> Reservation | None:
        marks = ",".join("%s" for _ in COUNTED)
        now = self.clock()
        conn = self._db()
        with conn.transaction():
            conn.execute(
                "INSERT INTO limit_usage (mid, month, used_fen) SELECT %s, %s, COALESCE(SUM(amount_fen), 0)"
                f" FROM journal WHERE mid = %s AND substr(business_date, 1, 6) = %s AND txn IN ({marks})"
                " AND state = 'approved' AND dup_key IS NOT NULL ON CONFLICT DO NOTHING",
                (mid, month, mid, month, *sorted(COUNTED)),
            )
            used = conn.execute(
                "SELECT used_fen FROM limit_usage WHERE mid = %s AND month = %s FOR UPDATE", (mid, month)
            ).fetchone()[0]
            reserved = conn.execute(
                "SELECT COALESCE(SUM(fen), 0) FROM limit_reservations WHERE mid = %s AND month = %s"
                " AND created_at > %s", (mid, month, now - self.stale_after),
            ).fetchone()[0]
            if int(used) + int(reserved) + amount_fen > limit_fen:
                return None
            rid = uuid.uuid4().hex
            conn.execute(
                "INSERT INTO limit_reservations (id, mid, month, fen, created_at) VALUES (%s, %s, %s, %s, %s)",
                (rid, mid, month, amount_fen, now),
            )
        return (mid, month, amount_fen, rid)

    def commit_ops(self, reservation: Reservation | None, approved: bool,
                   deltas: list[tuple[str, str, int]]) -> list[Op]:
        ops: list[Op] = []
        if reservation is not None:
            mid, month, fen, rid = reservation

            def settle(db: sqlite3.Connection) -> None:
                db.execute("DELETE FROM limit_reservations WHERE id = ?", (rid,))
                if approved:
                    db.execute("UPDATE limit_usage SET used_fen = used_fen + ? WHERE mid = ? AND month = ?",
                               (fen, mid, month))

            ops.append(settle)
        for mid, month, delta in deltas:
            def adjust(db: sqlite3.Connection, mid: str = mid, month: str = month, delta: int = delta) -> None:
                # no row yet: it will be built from the journal, which this commit also changes
                db.execute("UPDATE limit_usage SET used_fen = used_fen + ? WHERE mid = ? AND month = ?",
                           (delta, mid, month))

            ops.append(adjust)
        return ops

    def committed(self, reservation: Reservation | None, approved: bool, deltas: list[tuple[str, str, int]]) -> None:
        """Nothing: the commit itself moved the usage."""

    def release(self, reservation: Reservation) -> None:
        try:
            self._db().execute("DELETE FROM limit_reservations WHERE id = %s", (reservation[3],))
        except Exception:  # it goes stale and stops counting anyway
            log.warning("could not release a limit reservation; it expires after %.0fs", self.stale_after)
