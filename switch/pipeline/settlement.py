"""Batch settlement 0500 and batch upload 0320 (protocol §9.4, §9.5).

Settlement compares the terminal's totals (F48, 62 digits) with the switch's own for that
terminal and batch, answers ``00`` with the terminal's totals and result ``1`` (balanced) or its
own totals and result ``2`` (unbalanced), records the answer and closes the batch: the next batch
is the closed one + 1. Settling a closed batch again returns the recorded answer; the current
batch exists even when empty; any other batch gets ``25``; a count above 999 cannot be expressed
(``30``).

Several processes may share one store, and a terminal retrying through a load balancer may
reach two of them with the same batch at once: the settlement row is recorded atomically before
the answer (``record_settlement``), and a request that finds one already recorded answers exactly
what the first recorded, as a retransmission would be answered (§11). Closing the batch (the
terminal's next batch number) goes with the request's journal commit. Batch upload rows have no
key to collide on: each request's rows are its own.

Totals: debits = consume, scan-to-pay, completion and completion advice (a voided sale stays a
debit, its void is a credit); credits = consume voids, completion voids and refunds; only
approved, unreversed rows count. They are counted only once no request of that terminal and
batch is still in flight (several may be, §1): a consume at its issuer when the 0500 arrives is
in the totals when it is approved, never journaled into a batch that closed without it.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import timezone

import anyio

from switch.domain.codes import ResultCode
from switch.domain.model import Terminal
from switch.pipeline.checks import refresh_terminal
from switch.pipeline.context import Context, SwitchState

DEBITS = ("consume", "scan_to_pay", "completion", "completion_advice")
CREDITS = ("consume_void", "completion_void", "refund")
FOREIGN_ZEROS = "0" * 30 + "1"  # amount 12 + count 3 + amount 12 + count 3 = 30 zeros, result 1


@dataclass(frozen=True)
class Totals:
    debit_fen: int
    debit_count: int
    credit_fen: int
    credit_count: int

    @classmethod
    def parse(cls, f48: str) -> Totals:
        return cls(int(f48[0:12]), int(f48[12:15]), int(f48[15:27]), int(f48[27:30]))

    def fits(self) -> bool:
        return self.debit_count <= 999 and self.credit_count <= 999 and max(self.debit_fen, self.credit_fen) < 10**12

    def f48(self, result: str) -> str:
        return (
            f"{self.debit_fen:012d}{self.debit_count:03d}{self.credit_fen:012d}{self.credit_count:03d}{result}"
            + FOREIGN_ZEROS
        )


def batch_totals(state: SwitchState, tid: str, batch: str) -> Totals:
    assert state.store is not None
    d = ",".join("?" for _ in DEBITS)
    c = ",".join("?" for _ in CREDITS)
    debit = state.store.query(
        f"SELECT COUNT(*) AS n, COALESCE(SUM(amount_fen), 0) AS total FROM journal WHERE tid = ? AND batch = ?"
        f" AND dup_key IS NOT NULL AND txn IN ({d}) AND state IN ('approved', 'voided')",
        (tid, batch, *DEBITS),
    )[0]
    credit = state.store.query(
        f"SELECT COUNT(*) AS n, COALESCE(SUM(amount_fen), 0) AS total FROM journal WHERE tid = ? AND batch = ?"
        f" AND dup_key IS NOT NULL AND txn IN ({c}) AND state = 'approved'",
        (tid, batch, *CREDITS),
    )[0]
    return Totals(int(debit["total"]), int(debit["n"]), int(credit["total"]), int(credit["n"]))


# requests whose journal rows count in (or change rows of) a batch
BATCH_MTIS = ("0100", "0200", "0220", "0400")


async def settle(state: SwitchState, ctx: Context) -> None:
    terminal, f60 = ctx.terminal, ctx.f60
    assert terminal is not None and f60 is not None and state.store is not None
    f = ctx.request.fields
    f48 = f.get(48)
    if not isinstance(f48, str) or len(f48) != 62 or 49 not in f:
        ctx.decline(ResultCode.FORMAT_ERROR, "settlement needs F48 (62 digits) and F49")
        return
    batch = f60.batch
    if not await _batch_quiet(state, terminal.tid, batch):
        ctx.decline(ResultCode.SYSTEM_ERROR, "requests of the batch still in flight")
        return
    # from here to closing the batch nothing awaits: a request of this batch arriving now is
    # either counted (its journal row committed) or meets the next batch (77)
    recorded = _recorded(state, terminal.tid, batch)
    if recorded is None and batch != terminal.batch:
        refresh_terminal(state, terminal)  # another process sharing the store may have moved it
    if recorded is not None:
        # settling a settled batch again (a retry, another process, a concurrent copy): the same answer
        _answer_recorded(state, ctx, terminal, batch, recorded)
        return
    if batch != terminal.batch:
        ctx.decline(ResultCode.ORIGINAL_NOT_FOUND, "no such batch")
        return
    theirs = Totals.parse(f48)
    ours = batch_totals(state, terminal.tid, batch)
    if not ours.fits():
        ctx.decline(ResultCode.FORMAT_ERROR, "more than 999 transactions in one batch")
        return
    balanced = theirs == ours
    answer = theirs.f48("1") if balanced else ours.f48("2")
    created = ctx.now.astimezone(timezone.utc).isoformat()
    won = state.store.record_settlement(
        terminal.tid, batch, ctx.business_date, f48, answer, "1" if balanced else "2", created
    )
    if won["response_f48"] != answer or won["request_f48"] != f48:
        _answer_recorded(state, ctx, terminal, batch, won)  # another request recorded it first
        return
    ctx.resp[48] = answer
    ctx.note = "balanced" if balanced else f"unbalanced: terminal {theirs}, switch {ours}"
    _close_batch(ctx, terminal, batch)
    ctx.rc = ResultCode.APPROVED


async def _batch_quiet(state: SwitchState, tid: str, batch: str) -> bool:
    """Wait (bounded: a transfer's two legs and a reversal) until no financial request or
    reversal of this terminal and batch is in flight here or, with several processes, claimed in
    the database; False if some still are at the deadline."""
    prefix = f"{tid}|{batch}|"
    deadline = anyio.current_time() + 3 * state.settings.issuer_timeout + 5.0
    while True:
        busy = [e for k, e in state.inflight.items() if k.startswith(prefix) and k[-4:] in BATCH_MTIS]
        elsewhere = state.dup_claims is not None and state.dup_claims.held(prefix, BATCH_MTIS)
        if not busy and not elsewhere:
            return True
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            return False
        with anyio.move_on_after(remaining if busy else min(remaining, 0.05)):
            if busy:
                await busy[0].done.wait()
            else:
                await anyio.sleep(0.05)


def _recorded(state: SwitchState, tid: str, batch: str) -> dict[str, object] | None:
    assert state.store is not None
    done = state.store.query(
        "SELECT request_f48, response_f48, result FROM settlements WHERE tid = ? AND batch = ?", (tid, batch)
    )
    return done[0] if done else None


def _answer_recorded(state: SwitchState, ctx: Context, terminal: Terminal, batch: str,
                     recorded: dict[str, object]) -> None:
    """39 ``00`` and the recorded F48. When this process still holds the batch open, it is closed
    here too: the request that recorded it was served by another process (or its journal commit
    never happened), and the terminal's next batch is the settled one + 1 either way."""
    ctx.resp[48] = str(recorded["response_f48"])
    ctx.note = "batch already settled: the recorded answer"
    if batch == terminal.batch:
        refresh_terminal(state, terminal)
    if batch == terminal.batch:
        _close_batch(ctx, terminal, batch)
    ctx.rc = ResultCode.APPROVED


def _close_batch(ctx: Context, terminal: Terminal, batch: str) -> None:
    """The next batch opens with the next request (written with the request's journal row)."""
    terminal.batch_no = int(batch) + 1
    terminal.batch_date = None
    ctx.change_terminal("terminal_batch", terminal)


RECORD_DIGITS = 2 + 6 + 20 + 12


def upload(state: SwitchState, ctx: Context) -> None:
    """0320: records the terminal's transactions (201) or the end of an upload (202/207) and the
    differences against the journal, for reconciliation. Always ``00`` once recorded (§9.5)."""
    terminal, f60 = ctx.terminal, ctx.f60
    assert terminal is not None and f60 is not None and state.store is not None
    f48 = ctx.request.fields.get(48)
    if not isinstance(f48, str):
        ctx.decline(ResultCode.FORMAT_ERROR, "batch upload needs F48")
        return
    records: list[dict[str, object]] = []
    differences: list[dict[str, object]] = []
    if f60.nmc == "201":
        count = int(f48[:2]) if f48[:2].isdigit() else 0
        if not 1 <= count <= 8 or len(f48) < 2 + count * RECORD_DIGITS:
            ctx.decline(ResultCode.FORMAT_ERROR, "F48 record count or length")
            return
        for i in range(count):
            rec = f48[2 + i * RECORD_DIGITS: 2 + (i + 1) * RECORD_DIGITS]
            org, stan, card, amount = rec[:2], rec[2:8], rec[8:28].lstrip("0"), int(rec[28:40])
            records.append({"org": org, "stan": stan, "card": _mask(card), "amount_fen": amount})
            differences.extend(_compare(state, terminal.tid, f60.batch, stan, card, amount))
    else:
        if len(f48) < 4:
            ctx.decline(ResultCode.FORMAT_ERROR, "F48 total records")
            return
        records.append({"total_records": int(f48[:4])})
    row = (terminal.tid, f60.batch, f60.nmc, json.dumps(records), json.dumps(differences) if differences else None,
           ctx.now.astimezone(timezone.utc).isoformat())

    def op(db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT INTO batch_uploads (tid, batch, nmc, records, differences, created_at) VALUES (?,?,?,?,?,?)", row
        )

    ctx.store_ops.append(op)
    if differences:
        ctx.note = f"{len(differences)} difference(s) recorded"
    ctx.rc = ResultCode.APPROVED


def _mask(card: str) -> str:
    from switch.domain.cards import mask_pan

    return mask_pan(card) if card else ""


def _compare(state: SwitchState, tid: str, batch: str, stan: str, card: str, amount: int) -> list[dict[str, object]]:
    assert state.store is not None
    rows = state.store.query(
        "SELECT txn, amount_fen, pan_token, state FROM journal WHERE tid = ? AND batch = ? AND stan = ?"
        " AND dup_key IS NOT NULL AND mti IN ('0100', '0200', '0220') ORDER BY id LIMIT 1",
        (tid, batch, stan),
    )
    if not rows:
        return [{"stan": stan, "difference": "not in the switch's journal", "amount_fen": amount}]
    row = rows[0]
    out: list[dict[str, object]] = []
    if row["amount_fen"] != amount:
        out.append({"stan": stan, "difference": "amount", "terminal_fen": amount, "switch_fen": row["amount_fen"]})
    if card and row["pan_token"] != state.store.pan_token(card):
        out.append({"stan": stan, "difference": "card"})
    if row["state"] not in ("approved", "voided"):
        out.append({"stan": stan, "difference": f"switch has it {row['state']}"})
    return out
