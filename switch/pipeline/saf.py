"""Store-and-forward: reversals and advices that an issuer must eventually take (protocol §7, §11).

A message is queued in the same database commit as the journal row that made it necessary, so
it survives a crash or restart. The worker sends what is due, marks every send after the first
as a retransmission (0400 → 0401, 0220 → 0221), and retries with capped exponential backoff
until the issuer gives a final answer. A reversal's attempts carry a fresh F11/F7 and name the
original in F90; an advice keeps the F11/F7 of its first transmission so that the issuer can
recognise a repeat.

Final answers: ``00`` and, for reversals, ``25`` (the issuer never saw the original: nothing to
undo) mark the message done; any other answer except the transient ``91``/``96`` is final too but
marked ``refused`` and logged as an error for reconciliation.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from typing import TYPE_CHECKING, Any, Callable

import anyio
import anyio.abc

from switch.adapters.sqlite_store import StoreError
from switch.core.codec import Fields
from switch.ports import IssuerLink, IssuerTimeout, IssuerUnavailable, Metrics

if TYPE_CHECKING:
    from switch.adapters.sqlite_store import Op, SqliteStore

log = logging.getLogger("switch.saf")

REPEAT_MTI = {"0400": "0401", "0220": "0221"}
TRANSIENT_CODES = frozenset({"91", "96"})
IDLE_POLL = 5.0


# Queued messages and write-ahead intents keep their ISO fields in one of two encodings (both
# read back, so rows written by an earlier version stay readable):
# - packed (written since 2026-11; one per financial request on the hot path, a quarter of the
#   JSON's cost): "P1", then per field RS + number + "s" + text or "b" + hex, in field order;
# - JSON {"<number>": ["s", text] | ["b", hex]} (the first encoding; still written when a text
#   value holds the separator itself or cannot be UTF-8).
_RS = "\x1e"
_PACKED = b"P1" + _RS.encode()


def encode_fields(fields: Fields) -> bytes:
    parts = ["P1"]
    for k, v in fields.items():
        if isinstance(v, bytes):
            parts.append(f"{k}b{v.hex()}")
        elif _RS in v:
            return _json_fields(fields)
        else:
            parts.append(f"{k}s{v}")
    try:
        return _RS.join(parts).encode()
    except UnicodeEncodeError:  # a lone surrogate: JSON escapes it
        return _json_fields(fields)


def _json_fields(fields: Fields) -> bytes:
    return json.dumps(
        {str(k): (["b", v.hex()] if isinstance(v, bytes) else ["s", v]) for k, v in fields.items()}
    ).encode()


def decode_fields(raw: bytes) -> Fields:
    out: Fields = {}
    if raw.startswith(_PACKED):
        for part in raw.decode().split(_RS)[1:]:
            i = 0
            while part[i].isdigit():
                i += 1
            kind, value = part[i], part[i + 1 :]
            out[int(part[:i])] = bytes.fromhex(value) if kind == "b" else value
        return out
    for k, (kind, v) in json.loads(raw).items():
        out[int(k)] = bytes.fromhex(v) if kind == "b" else v
    return out


class IntentTakenOver(RuntimeError):
    """A request's write-ahead intent was promoted to a reversal before its journal commit."""


class StoreAndForward:
    def __init__(
        self,
        store: SqliteStore,
        links: dict[str, IssuerLink],
        metrics: Metrics,
        *,
        timeout: float = 5.0,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.links = links
        self.metrics = metrics
        self.timeout = timeout
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.clock = clock
        self._wake = anyio.Event()
        self._busy: set[int] = set()

    # ---- queueing (ops committed with the journal row) ------------------------------------
    def op_enqueue(self, issuer: str, kind: str, mti: str, fields: Fields, journal_id: int | None) -> Op:
        blob = self.store.master_key.wrap(encode_fields(fields), f"saf:{issuer}")
        now = self.clock()

        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO saf_queue (issuer, kind, mti, fields, journal_id, created_at, next_attempt)"
                " VALUES (?,?,?,?,?,?,?)",
                (issuer, kind, mti, blob, journal_id, now, now),
            )

        return op

    def wake(self) -> None:
        self._wake.set()

    # ---- write-ahead intents (crash safety) -----------------------------------------------
    # Before a reversible request leaves for the issuer, how to reverse it is made durable. The
    # request's journal commit deletes the intent. An intent still there means the switch died (or
    # failed) between sending and recording the outcome: the terminal never saw an answer, so the
    # request is reversed through the queue.
    def op_intent(self, key: str, issuer: str, reversal: Fields, origin: str | None = None) -> Op:
        """``origin``: the terminal request it would undo (TID|batch|STAN|MTI), kept with the
        reversal it may become so that the terminal's own 0400 can find it."""
        blob = self.store.master_key.wrap(encode_fields(reversal), f"saf:{issuer}")
        now = self.clock()

        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO intents (key, issuer, fields, created_at, origin) VALUES (?,?,?,?,?)",
                       (key, issuer, blob, now, origin))

        return op

    @staticmethod
    def op_clear_intent(key: str) -> Op:
        def op(db: sqlite3.Connection) -> None:
            if db.execute("DELETE FROM intents WHERE key = ?", (key,)).rowcount == 0:
                # another process's sweep took it for an orphan and queued its reversal: this
                # request must not be journaled (or answered) as if the issuer kept the money
                raise IntentTakenOver(f"write-ahead intent {key[:8]}… was already queued for reversal")

        return op

    def op_promote_intents(self, keys: list[str] | None = None, *, older_than: float | None = None) -> Op:
        """Turn intents (all, these, or those written before ``older_than``) into queued reversals."""
        now = self.clock()

        def op(db: sqlite3.Connection) -> None:
            where, params = ("", ()) if keys is None else (
                f" WHERE key IN ({','.join('?' for _ in keys)})", tuple[object, ...](keys))
            if older_than is not None:
                where += (" AND" if where else " WHERE") + " created_at < ?"
                params = (*params, older_than)
            # DELETE ... RETURNING takes each row once: a request's own journal commit deleting
            # it at the same moment either wins (the row is not returned here) or finds it gone
            # (op_clear_intent refuses to journal it)
            rows = db.execute(f"DELETE FROM intents{where} RETURNING issuer, fields, origin", params).fetchall()
            for issuer, blob, origin in rows:
                db.execute(
                    "INSERT INTO saf_queue (issuer, kind, mti, fields, journal_id, created_at, next_attempt, origin)"
                    " VALUES (?, 'reversal', '0400', ?, NULL, ?, ?, ?)",
                    (issuer, blob, now, now, origin),
                )
            if rows:
                log.warning("store-and-forward: %d request(s) without a recorded outcome queued for reversal",
                            len(rows))

        return op

    async def sweep_orphan_intents(
        self, max_age: float, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """An intent older than ``max_age`` (far beyond the issuer timeout plus a journal commit)
        belongs to a request that will never commit its journal row: its process died (several
        processes on one database), or its journal commit failed here; queue its reversal.
        Intents younger than that may be requests in flight, this process's or another's. A
        request whose intent is taken while its commit is only slow fails that commit
        (``IntentTakenOver``): it is never journaled as approved while being reversed."""
        task_status.started()
        while True:  # for the life of the switch; cancelled with its task group
            try:
                await self.store.write(self.op_promote_intents(older_than=self.clock() - max_age))
                self.wake()
            except Exception:
                log.exception("sweeping orphaned write-ahead intents failed; will retry")
            await anyio.sleep(max_age / 2)

    # ---- delivery -------------------------------------------------------------------------
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The worker: delivers what is due, sleeps until the next due message or a wake-up."""
        task_status.started()
        while True:
            try:
                await self.deliver_due()
                pending = self.store.query(
                    "SELECT MIN(next_attempt) AS t FROM saf_queue WHERE state = 'pending'"
                )
                due = pending[0]["t"] if pending and pending[0]["t"] is not None else None
                wait = IDLE_POLL if due is None else min(IDLE_POLL, max(0.0, due - self.clock()))
            except Exception:  # the store failing to read: the worker outlives it (and the switch)
                log.exception("store-and-forward: delivery pass failed; will retry")
                wait = IDLE_POLL
            with anyio.move_on_after(wait):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def deliver_due(self, issuer: str | None = None) -> None:
        """Send every due message (of one issuer, or all), one at a time per issuer, in order."""
        sql = "SELECT * FROM saf_queue WHERE state = 'pending' AND next_attempt <= ?"
        params: list[Any] = [self.clock()]
        if issuer is not None:
            sql += " AND issuer = ?"
            params.append(issuer)
        rows = self.store.query(sql + " ORDER BY id", params)
        by_issuer: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if row["id"] not in self._busy:
                by_issuer.setdefault(row["issuer"], []).append(row)
        async with anyio.create_task_group() as tg:
            for name, queue in by_issuer.items():
                tg.start_soon(self._deliver_queue, name, queue)
        self.report_depth()

    async def _deliver_queue(self, issuer: str, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["id"] in self._busy:
                continue
            self._busy.add(row["id"])
            try:
                if not await self._claim(int(row["id"])):
                    continue  # another process is sending it
                await self._attempt(issuer, row)
            except StoreError:
                # the outcome could not be recorded (the store is closing or failing): the row is
                # still pending and will be attempted again, an issuer takes repeats idempotently
                log.warning("store-and-forward: could not record the attempt of #%s; will retry", row["id"])
                return
            except Exception:  # a bug, not the row (unreadable rows are set aside in _attempt)
                log.exception("store-and-forward: attempt of #%s failed; will retry", row["id"])
                return
            finally:
                self._busy.discard(row["id"])

    async def _claim(self, row_id: int) -> bool:
        """Take the row for one attempt (several processes may share the queue): a conditional
        update that only one worker can win until the claim expires (attempt timeout + margin)."""
        now = self.clock()
        won: list[int] = []

        def op(db: sqlite3.Connection) -> None:
            cur = db.execute(
                "UPDATE saf_queue SET claimed_until = ? WHERE id = ? AND state = 'pending'"
                " AND (claimed_until IS NULL OR claimed_until < ?)",
                (now + self.timeout + 5.0, row_id, now),
            )
            won.append(cur.rowcount)

        await self.store.write(op)
        return bool(won and won[0] == 1)

    async def _attempt(self, issuer: str, row: dict[str, Any]) -> None:
        try:
            fields = decode_fields(self.store.master_key.unwrap(row["fields"], f"saf:{issuer}"))
        except Exception as exc:
            # a row that does not unwrap or decode (damaged at rest) can never be sent: set it
            # aside for reconciliation instead of failing the queue (or the switch) at every pass
            log.error("store-and-forward: %s #%s for %s cannot be read (%s); marked refused, reconcile by hand",
                      row["kind"], row["id"], issuer, type(exc).__name__)
            await self.store.write(self._op_finish(row["id"], "refused", int(row["attempts"]), "unreadable",
                                                   self.clock()))
            return
        if row["kind"] == "reversal":
            # a reversal names its original in F90: each attempt gets a fresh F11/F7
            fields.pop(11, None)
            fields.pop(7, None)
        # an advice keeps the F11/F7 of its first transmission, so an issuer that already took
        # it recognises the repeat (specs/issuer.md: same F11 + F7 → first answer, no second effect)
        mti = row["mti"] if row["attempts"] == 0 else REPEAT_MTI.get(row["mti"], row["mti"])
        link = self.links.get(issuer)
        code: str | None = None
        try:
            if link is None:
                raise IssuerUnavailable(f"no link to {issuer}")
            _, reply = await link.send(mti, fields, self.timeout)
            code = str(reply.get(39, ""))
            outcome = "refused" if code in TRANSIENT_CODES else "acknowledged"
        except IssuerUnavailable:
            outcome = "unavailable"
        except IssuerTimeout:
            outcome = "timeout"
        except ValueError:  # its F11 is still in flight on the link: try again later
            outcome = "timeout"
        self.metrics.saf_attempt(issuer, outcome)
        attempts = int(row["attempts"]) + 1
        now = self.clock()
        if outcome == "acknowledged":
            final = "done" if code == "00" or (code == "25" and row["kind"] == "reversal") else "refused"
            if final == "refused":
                log.error("store-and-forward: issuer %s refused %s #%s with %s; reconcile by hand",
                          issuer, row["kind"], row["id"], code)
            else:
                log.info("store-and-forward: %s #%s acknowledged by %s (%s) after %d attempt(s)",
                         row["kind"], row["id"], issuer, code, attempts)
            await self.store.write(self._op_finish(row["id"], final, attempts, code, now))
        else:
            delay = min(self.max_delay, self.base_delay * (2 ** min(attempts - 1, 16)))
            log.info("store-and-forward: %s #%s to %s: %s, retry in %.1fs",
                     row["kind"], row["id"], issuer, outcome if code is None else code, delay)
            await self.store.write(self._op_retry(row["id"], attempts, code or outcome, now + delay))

    @staticmethod
    def _op_finish(row_id: int, state: str, attempts: int, code: str | None, now: float) -> Op:
        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE saf_queue SET state=?, attempts=?, last_response=?, done_at=?, claimed_until=NULL"
                " WHERE id=?",
                (state, attempts, code, now, row_id),
            )

        return op

    @staticmethod
    def _op_retry(row_id: int, attempts: int, last: str, next_attempt: float) -> Op:
        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE saf_queue SET attempts=?, last_response=?, next_attempt=?, claimed_until=NULL WHERE id=?",
                (attempts, last, next_attempt, row_id),
            )

        return op

    def report_depth(self) -> None:
        now = self.clock()
        rows = self.store.query(
            "SELECT issuer, COUNT(*) AS n, MIN(created_at) AS oldest FROM saf_queue"
            " WHERE state = 'pending' GROUP BY issuer"
        )
        seen = set()
        for r in rows:
            seen.add(r["issuer"])
            self.metrics.saf_state(r["issuer"], int(r["n"]), max(0.0, now - float(r["oldest"])))
        for name in self.links:
            if name not in seen:
                self.metrics.saf_state(name, 0, 0.0)
