"""Finding the original a void, refund, completion or reversal refers to, holding it, and
changing its state (protocol §7, §11).

A journal row of a financial request has a ``state``: ``approved``, ``declined``, ``reversed``
(by the terminal's 0400 or by the switch after a timeout), ``voided`` (consume, scan-to-pay,
completion, pre-auth), ``completed`` (a pre-auth whose hold was captured) or ``duplicate``.
The row is locked (``SwitchState.lock_for``) from the read of its state to the commit of the
change, so two requests on the same original never both see it untouched.
"""

from __future__ import annotations

import sqlite3
from datetime import date
from typing import TYPE_CHECKING, Any, Callable

import anyio
import anyio.to_thread

from switch.pipeline import limits
from switch.pipeline.context import Context, SwitchState

if TYPE_CHECKING:
    from switch.adapters.sqlite_store import Op, SqliteStore

Row = dict[str, Any]
MAX_AGE_DAYS = 30


def _store(state: SwitchState) -> SqliteStore:
    assert state.store is not None
    return state.store


def by_key(state: SwitchState, tid: str, batch: str, stan: str, mti: str) -> Row | None:
    """The first answered request with this TID, batch, STAN and MTI (§11's duplicate key)."""
    rows = _store(state).query(
        "SELECT * FROM journal WHERE dup_key = ? ORDER BY id LIMIT 1", (f"{tid}|{batch}|{stan}|{mti}",)
    )
    return rows[0] if rows else None


def by_terminal_batch_stan(state: SwitchState, tid: str, batch: str, stan: str, txns: tuple[str, ...]) -> Row | None:
    marks = ",".join("?" for _ in txns)
    rows = _store(state).query(
        f"SELECT * FROM journal WHERE tid = ? AND batch = ? AND stan = ? AND txn IN ({marks})"
        " AND dup_key IS NOT NULL ORDER BY id LIMIT 1",
        (tid, batch, stan, *txns),
    )
    return rows[0] if rows else None


def by_rrn(state: SwitchState, rrn: str, txns: tuple[str, ...]) -> Row | None:
    marks = ",".join("?" for _ in txns)
    rows = _store(state).query(
        f"SELECT * FROM journal WHERE rrn = ? AND txn IN ({marks}) AND dup_key IS NOT NULL ORDER BY id LIMIT 1",
        (rrn, *txns),
    )
    return rows[0] if rows else None


def by_id(state: SwitchState, row_id: int) -> Row:
    return _store(state).query("SELECT * FROM journal WHERE id = ?", (row_id,))[0]


async def hold(state: SwitchState, ctx: Context, row: Row) -> Row:
    """Lock the original until this request's journal row is committed; return it re-read.
    Several processes on one PostgreSQL also take a database advisory lock on the row."""
    await ctx.held.enter_async_context(state.lock_for(int(row["id"])))
    if state.row_locker is not None:
        release = await anyio.to_thread.run_sync(state.row_locker.acquire, int(row["id"]))
        ctx.held.push_async_callback(anyio.to_thread.run_sync, release)
    fresh = by_id(state, int(row["id"]))
    ctx.original = fresh
    return fresh


def age_days(row: Row, ctx: Context) -> int:
    d = str(row["business_date"])
    then = date(int(d[:4]), int(d[4:6]), int(d[6:8]))
    return (ctx.now.date() - then).days


def same_card(state: SwitchState, ctx: Context, row: Row) -> bool:
    return ctx.pan is not None and row["pan_token"] == _store(state).pan_token(ctx.pan)


def original_pan(state: SwitchState, row: Row) -> str | None:
    blob = row.get("pan_enc")
    return _store(state).unwrap_pan(blob) if blob else None


def op_set_state(row_id: int, new_state: str) -> Op:
    def op(db: sqlite3.Connection) -> None:
        db.execute("UPDATE journal SET state = ? WHERE id = ?", (new_state, row_id))

    return op


def op_add_refund(row_id: int, amount_fen: int) -> Op:
    def op(db: sqlite3.Connection) -> None:
        db.execute("UPDATE journal SET refunded_fen = refunded_fen + ? WHERE id = ?", (amount_fen, row_id))

    return op


def set_state(ctx: Context, row: Row, new_state: str) -> None:
    """Change an original's state in this request's commit; a change of whether it uses monthly
    limit headroom (§13) is applied to the ledger after that commit."""
    ctx.store_ops.append(op_set_state(int(row["id"]), new_state))
    before, after = limits.counts(row), limits.counts({**row, "state": new_state})
    if before != after:
        delta = int(row["amount_fen"]) * (1 if after else -1)
        ctx.limit_deltas.append((str(row["mid"]), limits.month_of(str(row["business_date"])), delta))


def set_state_by_id(state: SwitchState, ctx: Context, row_id: int, new_state: str) -> None:
    set_state(ctx, by_id(state, row_id), new_state)


class AdvisoryRowLocks:
    """Database advisory locks on journal rows, for several processes on one PostgreSQL: each held
    lock has its own session (a connection), released when the request's journal row committed."""

    LOCK_SPACE = 8583  # pg_advisory_lock(int, int): our key space, then the row id

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect

    def acquire(self, row_id: int) -> Callable[[], None]:
        conn = self._connect()
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (self.LOCK_SPACE, row_id))

        def release() -> None:
            try:
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", (self.LOCK_SPACE, row_id))
            finally:
                conn.close()

        return release
