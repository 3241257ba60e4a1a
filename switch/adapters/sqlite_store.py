"""SQLite (WAL) store: merchants, terminals, keys (encrypted under the master key), the
authorization journal, and counters.

Writes go through one writer task that group-commits: every write waiting when a commit starts
shares that one transaction (and its fsync), and each waiter is released only after the commit
returned, so a response is never sent before its journal row is durable. Reads of merchants and
terminals happen once at start (the pipeline keeps them in memory and writes changes through).

Holds no business rules: what to write is the pipeline's decision.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import operator
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable

import anyio
import anyio.abc

from switch.crypto.keystore import KeyWrapper
from switch.domain.model import Merchant, Terminal
from switch.ports import Metrics, NullMetrics

log = logging.getLogger("switch.store")

SCHEMA_VERSION = 11
RRN_BLOCK = 1000

MIGRATIONS: list[str] = [
    # v1
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE merchants (
        mid TEXT PRIMARY KEY, kind TEXT NOT NULL, shop_name TEXT NOT NULL, state TEXT NOT NULL,
        fee_rate TEXT NOT NULL, monthly_limit_fen INTEGER NOT NULL, params_version INTEGER NOT NULL
    );
    CREATE TABLE terminals (
        tid TEXT PRIMARY KEY, mid TEXT NOT NULL REFERENCES merchants(mid), role TEXT NOT NULL,
        main_tid TEXT, state TEXT NOT NULL, tmk BLOB, key_mode TEXT, pik BLOB, mak BLOB, tdk BLOB,
        batch_no INTEGER NOT NULL DEFAULT 1, batch_date TEXT, params_version INTEGER NOT NULL DEFAULT 0,
        activation_code_hash TEXT, activation_expires REAL
    );
    CREATE TABLE journal (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at TEXT NOT NULL, business_date TEXT NOT NULL,
        tid TEXT NOT NULL, mid TEXT NOT NULL, mti TEXT NOT NULL, txn TEXT NOT NULL,
        pcode TEXT, stan TEXT, batch TEXT, rrn TEXT, auth_code TEXT, response_code TEXT NOT NULL,
        amount_fen INTEGER, fee_fen INTEGER, currency TEXT,
        pan_masked TEXT, pan_token TEXT, entry_mode TEXT,
        issuer TEXT, issuer_stan TEXT, issuer_f7 TEXT, issuer_response_code TEXT,
        needs_reversal INTEGER NOT NULL DEFAULT 0,
        request_digest TEXT, latency_us INTEGER, issuer_latency_us INTEGER, note TEXT
    );
    CREATE TABLE issuer_keys (issuer TEXT PRIMARY KEY, zpk BLOB NOT NULL);
    CREATE INDEX journal_rrn ON journal(rrn);
    CREATE INDEX journal_tid_batch_stan ON journal(tid, batch, stan);
    CREATE INDEX journal_date ON journal(business_date);
    """,
    # v2: the transaction set — duplicates, originals' state, store-and-forward
    """
    ALTER TABLE journal ADD COLUMN dup_key TEXT;
    ALTER TABLE journal ADD COLUMN response_blob BLOB;
    ALTER TABLE journal ADD COLUMN state TEXT;
    ALTER TABLE journal ADD COLUMN refunded_fen INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE journal ADD COLUMN original_id INTEGER;
    ALTER TABLE journal ADD COLUMN pan_enc BLOB;
    ALTER TABLE journal ADD COLUMN legs TEXT;
    CREATE INDEX journal_dup ON journal(dup_key);
    CREATE INDEX journal_original ON journal(original_id);
    CREATE TABLE saf_queue (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        issuer TEXT NOT NULL, kind TEXT NOT NULL, mti TEXT NOT NULL, fields BLOB NOT NULL,
        journal_id INTEGER, created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
        last_response TEXT, done_at REAL
    );
    CREATE INDEX saf_pending ON saf_queue(state, issuer, next_attempt);
    """,
    # v3: merchants and money — onboarding data (sensitive parts wrapped), settlement, payouts,
    # merchant notifications; change_seq lets a running switch pick up CLI changes
    """
    ALTER TABLE merchants ADD COLUMN owner_name TEXT;
    ALTER TABLE merchants ADD COLUMN id_card_enc BLOB;
    ALTER TABLE merchants ADD COLUMN bank_account_enc BLOB;
    ALTER TABLE merchants ADD COLUMN bank_name TEXT;
    ALTER TABLE merchants ADD COLUMN licence_no TEXT;
    ALTER TABLE merchants ADD COLUMN webhook_url TEXT;
    ALTER TABLE merchants ADD COLUMN webhook_secret_enc BLOB;
    ALTER TABLE merchants ADD COLUMN created_at TEXT;
    ALTER TABLE merchants ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE terminals ADD COLUMN device_serial TEXT;
    ALTER TABLE terminals ADD COLUMN activated_at TEXT;
    ALTER TABLE terminals ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE settlements (
        tid TEXT NOT NULL, batch TEXT NOT NULL, business_date TEXT NOT NULL,
        request_f48 TEXT NOT NULL, response_f48 TEXT NOT NULL, result TEXT NOT NULL,
        created_at TEXT NOT NULL, PRIMARY KEY (tid, batch)
    );
    CREATE TABLE batch_uploads (
        id INTEGER PRIMARY KEY AUTOINCREMENT, tid TEXT NOT NULL, batch TEXT NOT NULL,
        nmc TEXT NOT NULL, records TEXT NOT NULL, differences TEXT, created_at TEXT NOT NULL
    );
    CREATE TABLE payouts (
        mid TEXT NOT NULL, business_date TEXT NOT NULL, approved_fen INTEGER NOT NULL,
        fees_fen INTEGER NOT NULL, refunds_fen INTEGER NOT NULL, net_fen INTEGER NOT NULL,
        balance_before_fen INTEGER NOT NULL, paid_fen INTEGER NOT NULL, carried_fen INTEGER NOT NULL,
        created_at TEXT NOT NULL, PRIMARY KEY (mid, business_date)
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT, mid TEXT NOT NULL, event TEXT NOT NULL,
        created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending', last_error TEXT, delivered_at REAL
    );
    CREATE INDEX outbox_pending ON outbox(state, next_attempt);
    CREATE INDEX journal_mid_date ON journal(mid, business_date);
    INSERT OR IGNORE INTO meta(key, value) VALUES('change_seq', '0');
    """,
    # v4: write-ahead intents — how to reverse an issuer request, durable before it is sent
    """
    CREATE TABLE intents (
        key TEXT PRIMARY KEY, issuer TEXT NOT NULL, fields BLOB NOT NULL, created_at REAL NOT NULL
    );
    """,
    # v5: the merchant portal's accounts (scrypt hashes) and sessions (hashed ids)
    """
    CREATE TABLE IF NOT EXISTS portal_accounts (
        mid TEXT PRIMARY KEY REFERENCES merchants(mid), password_hash TEXT NOT NULL,
        failed_count INTEGER NOT NULL DEFAULT 0, locked_until REAL, updated_at TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS portal_sessions (
        id_hash TEXT PRIMARY KEY, mid TEXT NOT NULL, csrf TEXT NOT NULL, created REAL NOT NULL,
        expires REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS portal_sessions_expires ON portal_sessions(expires);
    """,
    # v6: monthly-limit usage and reservations arbitrated by the database (several processes)
    """
    CREATE TABLE limit_usage (
        mid TEXT NOT NULL, month TEXT NOT NULL, used_fen INTEGER NOT NULL, PRIMARY KEY (mid, month)
    );
    CREATE TABLE limit_reservations (
        id TEXT PRIMARY KEY, mid TEXT NOT NULL, month TEXT NOT NULL, fen INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX limit_reservations_mid ON limit_reservations(mid, month);
    """,
    # v7: claims on duplicate keys (several processes: the first claim processes the request)
    """
    CREATE TABLE dup_claims (dup_key TEXT PRIMARY KEY, digest TEXT NOT NULL, created_at REAL NOT NULL);
    """,
    # v8: store-and-forward rows are claimed by the worker that sends them (several processes)
    """
    ALTER TABLE saf_queue ADD COLUMN claimed_until REAL;
    """,
    # v9: wrong activation codes per peer address (§9.1 lockout), shared by every process on the
    # store; "at" is wall-clock seconds (time.time), comparable between processes
    """
    CREATE TABLE activation_failures (peer TEXT NOT NULL, at REAL NOT NULL);
    CREATE INDEX activation_failures_peer ON activation_failures(peer, at);
    CREATE INDEX activation_failures_at ON activation_failures(at);
    """,
    # v10: a completion or pre-auth void finds its pre-auth by merchant, batch and STAN (§7.3:
    # any terminal of the merchant may complete it); journal_mid_date alone made that lookup read
    # every row the merchant ever had
    """
    CREATE INDEX journal_mid_batch_stan ON journal(mid, batch, stan);
    """,
    # v11: a write-ahead intent and the reversal it becomes name the terminal request they undo
    # (TID|batch|STAN|MTI): the terminal's own 0400 for a request whose journal row was never
    # written finds that the switch is reversing it (00, §11) instead of no original (25)
    """
    ALTER TABLE intents ADD COLUMN origin TEXT;
    ALTER TABLE saf_queue ADD COLUMN origin TEXT;
    CREATE INDEX saf_origin ON saf_queue(origin);
    """,
]


def legacy_code_hash(code: str) -> str:
    """How activation codes were kept before ``code_token`` (an unkeyed SHA-256): still looked up,
    so a code issued by an older version works for the rest of its 24 hours."""
    return hashlib.sha256(code.encode()).hexdigest()


class StoreError(RuntimeError):
    pass


@dataclass
class JournalEntry:
    """One row of the authorization journal. Never holds a PIN block, track, CVV or key."""

    created_at: str
    business_date: str
    tid: str
    mid: str
    mti: str
    txn: str
    response_code: str
    pcode: str | None = None
    stan: str | None = None
    batch: str | None = None
    rrn: str | None = None
    auth_code: str | None = None
    amount_fen: int | None = None
    fee_fen: int | None = None
    currency: str | None = None
    pan_masked: str | None = None
    pan_token: str | None = None
    entry_mode: str | None = None
    issuer: str | None = None
    issuer_stan: str | None = None
    issuer_f7: str | None = None
    issuer_response_code: str | None = None
    needs_reversal: bool = False
    request_digest: str | None = None
    latency_us: int | None = None
    issuer_latency_us: int | None = None
    note: str | None = None
    dup_key: str | None = None  # TID|batch|STAN|MTI of a request that passed step 4 (§11)
    response_blob: bytes | None = None  # the response frame, wrapped (it may carry F2)
    state: str | None = None  # approved | declined | voided | reversed | completed | duplicate
    original_id: int | None = None
    pan_enc: bytes | None = None  # the PAN wrapped under the master key (reversals, transfers)
    legs: str | None = None  # JSON: issuer legs of a transfer (issuer, stan, f7, rc)

    COLUMNS = (
        "created_at", "business_date", "tid", "mid", "mti", "txn", "response_code", "pcode", "stan",
        "batch", "rrn", "auth_code", "amount_fen", "fee_fen", "currency", "pan_masked", "pan_token",
        "entry_mode", "issuer", "issuer_stan", "issuer_f7", "issuer_response_code", "needs_reversal",
        "request_digest", "latency_us", "issuer_latency_us", "note", "dup_key", "response_blob",
        "state", "original_id", "pan_enc", "legs",
    )

    def row(self) -> tuple[Any, ...]:
        values = list(_JOURNAL_ROW(self))  # one C call for every column, in COLUMNS order
        values[_NEEDS_REVERSAL] = int(values[_NEEDS_REVERSAL])  # the one bool column
        return tuple(values)


_JOURNAL_ROW = operator.attrgetter(*JournalEntry.COLUMNS)
_NEEDS_REVERSAL = JournalEntry.COLUMNS.index("needs_reversal")

_INSERT_JOURNAL = (
    f"INSERT INTO journal ({', '.join(JournalEntry.COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in JournalEntry.COLUMNS)})"
)

Op = Callable[[sqlite3.Connection], None]
BUSY_TIMEOUT_MS = 5000  # sqlite3.connect's default timeout: how long a write waits for the lock


def next_change_seq(db: Any) -> int:
    """Bump ``meta.change_seq`` inside the caller's transaction and return the new value, for
    the rows that transaction changes: every running switch process reloads rows stamped above
    the number it last saw (switch/pipeline/reload.py). ``db``: a sqlite3 connection or the
    PostgreSQL store's translating one."""
    db.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'change_seq'")
    return int(db.execute("SELECT value FROM meta WHERE key = 'change_seq'").fetchone()[0])


async def _wait_shielded(done: asyncio.Event) -> None:
    """Wait for ``done`` even if this task is cancelled meanwhile (the cancellation is re-raised
    afterwards). The shielded scope is only built on that rare path: on the common one a plain
    wait is cheaper than entering and leaving a cancel scope on every journal write."""
    try:
        await done.wait()
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await done.wait()
        raise


def _rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:  # no transaction left to roll back
        pass


class _Pending:
    """One ``write``: its ops, set ``done`` once they are committed (or failed: ``error``).
    An ``asyncio.Event``, not anyio's: a write is the hot path, and anyio's costs a backend
    lookup to create and a wrapper to wait on."""

    __slots__ = ("ops", "done", "error")

    def __init__(self, ops: list[Op]) -> None:
        self.ops = ops
        self.done = asyncio.Event()
        self.error: BaseException | None = None


class Committer:
    """The store's one commit thread. ``submit`` runs ``work()`` there, in order, then
    ``on_done()`` on the submitting event loop. A plain queue and ``call_soon_threadsafe``:
    ``run_in_executor``'s concurrent future, its chaining to an asyncio future and their
    callbacks cost more than the hand-off itself."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], None], asyncio.AbstractEventLoop, Callable[[], None]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], None], on_done: Callable[[], None]) -> None:
        self._jobs.put((work, asyncio.get_running_loop(), on_done))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, loop, on_done = job
            try:
                work()
            except BaseException:  # the work records its own errors; never lose the thread
                log.exception("commit thread: unexpected error")
            finally:
                try:
                    loop.call_soon_threadsafe(on_done)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass

    def shutdown(self) -> None:
        """Stop the thread after the jobs already submitted."""
        self._jobs.put(None)


class SqliteStore:
    _committer: Committer | None  # see _init_writer
    def __init__(self, path: Path, master_key: KeyWrapper, metrics: Metrics | None = None) -> None:
        self.path = Path(path)
        self.master_key = master_key
        self.metrics: Metrics = metrics or NullMetrics()
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._loop_writer: sqlite3.Connection | None = None  # see _hand_off
        self._commit_lock = threading.Lock()
        self._probe_ok = True
        self._init_writer()
        self._rrn_next = 0
        self._rrn_limit = 0
        self._pan_key = b""

    # ---- lifecycle ------------------------------------------------------------------------
    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        self._db = db
        self._migrate()
        reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        reader.row_factory = sqlite3.Row
        reader.execute("PRAGMA query_only=ON")
        self._reader = reader
        # the event loop's own write connection (group commits started on the loop, see
        # _hand_off): no busy timeout, so a write lock held elsewhere never blocks the loop
        loop_writer = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        loop_writer.execute("PRAGMA synchronous=FULL")
        loop_writer.execute("PRAGMA foreign_keys=ON")
        self._loop_writer = loop_writer
        self._check_master_key()
        self._pan_key = self._load_pan_token_key()

    def close(self) -> None:
        # a commit may be running in the writer's worker thread: wait for it (the lock), never
        # close the connection under it
        with self._commit_lock:
            self._close()
        if self._committer is not None:
            self._committer.shutdown()  # idle: its last commit released the lock above
            self._committer = None

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._loop_writer is not None:
            self._loop_writer.close()
            self._loop_writer = None
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    def _migrate(self) -> None:
        has_meta = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone()
        self._apply_migrations(bool(has_meta), MIGRATIONS)

    def _apply_migrations(self, has_meta: bool, migrations: list[str]) -> None:
        """Bring the schema to SCHEMA_VERSION, one transaction per version; refuse a newer one.
        Shared by the PostgreSQL store (its DDL is generated from the same list)."""
        db = self.db
        version = 0
        if has_meta:
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store schema version {version} is newer than this switch ({SCHEMA_VERSION}); upgrade the switch"
            )
        for v in range(version, SCHEMA_VERSION):
            db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in migrations[v].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES('schema_version', ?)", (str(v + 1),)
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _check_master_key(self) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key='master_key_id'").fetchone()
        if row is None:
            self.db.execute(
                "INSERT INTO meta(key, value) VALUES('master_key_id', ?)", (self.master_key.key_id,)
            )
        elif row[0] != self.master_key.key_id and row[0] not in getattr(self.master_key, "key_ids", ()):
            raise StoreError(
                f"the master key (id {self.master_key.key_id}) is not the one this store was written "
                f"with (id {row[0]}): refusing to start"
            )

    def _load_pan_token_key(self) -> bytes:
        row = self.db.execute("SELECT value FROM meta WHERE key='pan_token_key'").fetchone()
        if row is not None:
            return self.master_key.unwrap(bytes.fromhex(row[0]), "pan-token-key")
        key = os.urandom(32)
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES('pan_token_key', ?)",
            (self.master_key.wrap(key, "pan-token-key").hex(),),
        )
        return key

    def refresh_master_key(self) -> bool:
        """After a rotation by ``switch keys rotate-master``: write new blobs under the key the
        store now records (the keyring reloads its key files on demand)."""
        use = getattr(self.master_key, "use_current", None)
        rows = self.query("SELECT value FROM meta WHERE key='master_key_id'")
        if use is None or not rows or rows[0]["value"] == self.master_key.key_id:
            return False
        use(rows[0]["value"])
        log.info("master key rotated: new blobs are wrapped under %s", rows[0]["value"])
        return True

    def writable(self) -> bool:
        """For /readyz: the last write probe (``run_probe``) committed, and the files look writable."""
        if self._db is None or self._closing or not self._probe_ok:
            return False
        return os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)

    async def run_probe(
        self, interval: float = 2.0, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Write a heartbeat row through the group-committing writer every ``interval`` seconds;
        readiness follows whether it commits (a read-only disk, a full disk, an immutable file)."""
        task_status.started()
        while True:
            try:
                stamp = str(time.time())

                def op(db: sqlite3.Connection) -> None:
                    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('heartbeat', ?)", (stamp,))

                await self.write(op)
                if not self._probe_ok:
                    log.warning("store writable again")
                self._probe_ok = True
            except StoreError:
                if self._probe_ok:
                    log.error("store not writable: not ready")
                self._probe_ok = False
            await anyio.sleep(interval)

    # ---- sync reads (start-up, tests, CLI) ------------------------------------------------
    def is_empty(self) -> bool:
        return bool(self.db.execute("SELECT COUNT(*) FROM merchants").fetchone()[0] == 0)

    def load_merchants(self, where: str = "1=1", params: Iterable[Any] = (), *, reader: bool = False) -> dict[str, Merchant]:
        """Merchants (all, or those matching ``where``). ``reader``: use the read-only connection
        (safe on the event loop while the writer thread commits)."""
        conn = self._reader if reader else self.db
        assert conn is not None
        out = {}
        for mid, kind, name, state, rate, limit, pv in conn.execute(
            "SELECT mid, kind, shop_name, state, fee_rate, monthly_limit_fen, params_version FROM merchants"
            f" WHERE {where}", tuple(params),
        ):
            out[mid] = Merchant(mid, kind, name, state, Decimal(rate), int(limit), int(pv))
        return out

    def load_terminals(self, where: str = "1=1", params: Iterable[Any] = (), *, reader: bool = False) -> dict[str, Terminal]:
        conn = self._reader if reader else self.db
        assert conn is not None
        out = {}
        for row in conn.execute(
            "SELECT tid, mid, role, main_tid, state, tmk, key_mode, pik, mak, tdk, batch_no, batch_date,"
            f" params_version FROM terminals WHERE {where}", tuple(params),
        ):
            tid, mid, role, main_tid, state, tmk, mode, pik, mak, tdk, batch_no, batch_date, pv = tuple(row)
            out[tid] = Terminal(
                tid, mid, role, main_tid, state,
                tmk=self._unwrap(tmk, f"tmk:{tid}"),
                key_mode=mode,
                pik=self._unwrap(pik, f"pik:{tid}"),
                mak=self._unwrap(mak, f"mak:{tid}"),
                tdk=self._unwrap(tdk, f"tdk:{tid}"),
                batch_no=int(batch_no), batch_date=batch_date, params_version=int(pv),
            )
        return out

    def load_zone_pin_keys(self) -> dict[str, bytes]:
        return {
            issuer: self.master_key.unwrap(blob, f"zpk:{issuer}")
            for issuer, blob in self.db.execute("SELECT issuer, zpk FROM issuer_keys")
        }

    def set_zone_pin_key(self, issuer: str, zpk: bytes) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO issuer_keys VALUES (?, ?)", (issuer, self.master_key.wrap(zpk, f"zpk:{issuer}"))
        )

    def journal(self, where: str = "1=1", params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        cur = self.db.execute(f"SELECT * FROM journal WHERE {where} ORDER BY id", tuple(params))
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    # ---- point reads on the hot path -------------------------------------------------------
    # Indexed SQLite point reads take a few microseconds in WAL mode, less than a hop to a worker
    # thread, so they run on the event loop on their own read-only connection. They see every
    # committed row, and a response is only sent after its row committed.
    def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        if self._reader is None:
            raise StoreError("store is not open")
        return [dict(r) for r in self._reader.execute(sql, tuple(params))]

    def wrap_pan(self, pan: str) -> bytes:
        return self.master_key.wrap(pan.encode(), "pan")

    def unwrap_pan(self, blob: bytes) -> str:
        return self.master_key.unwrap(blob, "pan").decode()

    def wrap_response(self, frame: bytes, dup_key: str) -> bytes:
        return self.master_key.wrap(frame, f"response:{dup_key}")

    def unwrap_response(self, blob: bytes, dup_key: str) -> bytes:
        return self.master_key.unwrap(blob, f"response:{dup_key}")

    # ---- sync writes used at set-up (demo fixture, CLI) -----------------------------------
    def add_merchant(self, m: Merchant) -> None:
        self.db.execute(
            "INSERT INTO merchants (mid, kind, shop_name, state, fee_rate, monthly_limit_fen, params_version)"
            " VALUES (?,?,?,?,?,?,?)",
            (m.mid, m.kind, m.shop_name, m.state, str(m.fee_rate), m.monthly_limit_fen, m.params_version),
        )

    def add_terminal(self, t: Terminal, activation_code: str | None = None, expires: float | None = None) -> None:
        code_hash = self.code_token(activation_code) if activation_code else None
        self.db.execute(
            "INSERT INTO terminals (tid, mid, role, main_tid, state, tmk, batch_no, params_version,"
            " activation_code_hash, activation_expires) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (t.tid, t.mid, t.role, t.main_tid, t.state, self._wrap(t.tmk, f"tmk:{t.tid}"), t.batch_no,
             t.params_version, code_hash, expires),
        )

    # ---- helpers --------------------------------------------------------------------------
    def _wrap(self, key: bytes | None, context: str) -> bytes | None:
        return None if key is None else self.master_key.wrap(key, context)

    def _unwrap(self, blob: bytes | None, context: str) -> bytes | None:
        return None if blob is None else self.master_key.unwrap(blob, context)

    def pan_token(self, pan: str) -> str:
        """A keyed hash of the PAN: lets later lookups match a card without storing it."""
        return hmac.digest(self._pan_key, pan.encode(), "sha256").hex()[:32]

    def code_token(self, code: str) -> str:
        """How an activation code is kept (``terminals.activation_code_hash``) and named in its
        request's duplicate key: ``k1:`` + HMAC-SHA-256 under a key derived from the token key
        (which is wrapped by the master key). An 8-digit code has 10**8 values: an unkeyed hash
        of it is reversed offline in about a minute (security review I)."""
        key = hmac.digest(self._pan_key, b"activation code token", "sha256")
        return "k1:" + hmac.digest(key, code.encode(), "sha256").hex()

    # ---- ops for the writer -----------------------------------------------------------------
    def op_journal(self, entry: JournalEntry) -> Op:
        row = entry.row()

        def op(db: sqlite3.Connection) -> None:
            db.execute(_INSERT_JOURNAL, row)

        return op

    def op_terminal_keys(self, t: Terminal) -> Op:
        args = (
            t.key_mode, self._wrap(t.pik, f"pik:{t.tid}"), self._wrap(t.mak, f"mak:{t.tid}"),
            self._wrap(t.tdk, f"tdk:{t.tid}"), t.tid,
        )

        def op(db: sqlite3.Connection) -> None:
            # stamped like a back-office change: every process sharing the store re-reads the keys
            # at its next change poll, so a sign-on's or a revocation's old keys stop working there
            db.execute("UPDATE terminals SET key_mode=?, pik=?, mak=?, tdk=?, change_seq=? WHERE tid=?",
                       (*args[:4], next_change_seq(db), args[4]))

        return op

    def op_terminal_batch(self, t: Terminal) -> Op:
        args = (t.batch_no, t.batch_date, t.params_version, t.tid)

        def op(db: sqlite3.Connection) -> None:
            db.execute("UPDATE terminals SET batch_no=?, batch_date=?, params_version=? WHERE tid=?", args)

        return op

    # ---- the group-committing writer --------------------------------------------------------
    # Callbacks on the event loop, no writer task: a write queues its ops and, unless a commit is
    # due already, schedules one for the end of this loop iteration (so everything queued in it
    # shares the commit); a commit's completion starts the next one with all that queued while it
    # ran. A writer task woken by an event cost two task switches per write.
    def _init_writer(self) -> None:
        self._queue: list[_Pending] = []
        self._committing = False  # a batch is on the commit thread
        self._commit_due = False  # a commit is scheduled, or starts when the running one ends
        self._closing = False
        self._committer = None

    async def write(self, *ops: Op) -> None:
        """Apply ``ops`` in the next group commit; returns once they are durable."""
        if self._closing:
            raise StoreError("store is closing")
        p = _Pending(list(ops))
        self._queue.append(p)
        if not self._commit_due:
            self._commit_due = True
            asyncio.get_running_loop().call_soon(self._start_commit)
        await _wait_shielded(p.done)
        if p.error is not None:
            self.metrics.store_write_failed()
            raise StoreError("journal write failed") from p.error

    def _start_commit(self) -> None:
        """(event loop) Hand every queued write to the commit thread as one batch, unless a
        commit is running: its completion starts this one."""
        if self._committing:
            return
        self._commit_due = False
        batch, self._queue = self._queue, []
        if not batch:
            return
        self._committing = True
        if self._committer is None:
            self._committer = Committer("journal-commit")  # one thread keeps commits in order
        self._hand_off(batch, self._committer)

    def _hand_off(self, batch: list[_Pending], committer: Committer) -> None:
        """(event loop) Start committing ``batch``; ``_committed`` runs when it is done.

        SQLite: the batch's statements run here, on the event loop's thread, and only the COMMIT
        (the WAL write and its fsync: the slow part, run without the GIL) on the commit thread.
        Run there too, the statements crawled: each one releases the GIL inside SQLite and then
        waits to take it back from the busy event loop (under the bench's closed loop 4 ms of
        statements per 1.5 ms fsync, every request waiting through both, twice). When the
        connection or the database's write lock is not free at once (a short transaction on
        another thread, a back-office command writing), the whole transaction runs on the
        commit thread as before: the event loop never waits for a lock."""
        db = self._loop_writer
        if db is None:  # closed under queued writes: they fail, they do not hang
            for p in batch:
                p.error = StoreError("store is not open")
            self._committed(batch)
            return
        if not self._commit_lock.acquire(blocking=False):
            self._commit_on_thread(batch, committer)
            return
        t0 = time.perf_counter()
        try:
            # this connection has no busy timeout (set at open, not toggled by a PRAGMA pair
            # around each BEGIN: that cost two statements and re-prepares per batch)
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:  # another connection writes: wait for it on the thread
            self._commit_lock.release()
            self._commit_on_thread(batch, committer)
            return
        try:
            for p in batch:
                for op in p.ops:
                    op(db)
        except BaseException as exc:  # a failing batch: each request alone, on the thread
            log.exception("group commit failed; retrying one by one")
            _rollback(db)
            committer.submit(functools.partial(self._one_by_one_and_release, batch, exc, t0),
                             functools.partial(self._committed, batch))
            return
        committer.submit(functools.partial(self._commit_and_release, db, batch, t0),
                         functools.partial(self._committed, batch))

    def _commit_on_thread(self, batch: list[_Pending], committer: Committer) -> None:
        """The whole transaction of ``batch`` (BEGIN to COMMIT) on the commit thread."""
        committer.submit(functools.partial(self._commit, batch), functools.partial(self._committed, batch))

    def _commit_and_release(self, db: sqlite3.Connection, batch: list[_Pending], t0: float) -> None:
        """(commit thread) COMMIT what ``_hand_off`` wrote on ``db``, then release the lock."""
        try:
            try:
                db.execute("COMMIT")
            except BaseException as exc:
                log.exception("group commit failed; retrying one by one")
                _rollback(db)
                self._one_by_one(self.db, batch, exc)  # on the writer: it waits for a busy lock
        finally:
            self._commit_lock.release()
        self.metrics.journal_commit(len(batch), time.perf_counter() - t0)

    def _one_by_one_and_release(self, batch: list[_Pending], exc: BaseException, t0: float) -> None:
        try:
            self._one_by_one(self.db, batch, exc)
        finally:
            self._commit_lock.release()
        self.metrics.journal_commit(len(batch), time.perf_counter() - t0)

    def _committed(self, batch: list[_Pending]) -> None:
        """(event loop) A batch is durable (or failed, per write): wake its writers, start the next."""
        self._committing = False
        for p in batch:
            p.done.set()
        if self._queue:
            self._start_commit()

    async def run_writer(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The writer's lifetime: writes are accepted until it is cancelled; then new writes are
        refused and the accepted ones are committed before it returns, so none is lost."""
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                self._closing = True
                while self._queue or self._committing:  # bounded: each pass is one commit
                    if self._queue and not self._committing and not self._commit_due:
                        self._start_commit()
                    await anyio.sleep(0.002)

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            with self._commit_lock:
                self._commit_locked(batch)
        except BaseException as exc:  # the connection itself (closed, broken): never report success
            log.exception("group commit failed")
            for p in batch:
                if p.error is None:
                    p.error = exc

    def _commit_locked(self, batch: list[_Pending]) -> None:
        db = self.db
        t0 = time.perf_counter()
        try:
            db.execute("BEGIN IMMEDIATE")
            for p in batch:
                for op in p.ops:
                    op(db)
            db.execute("COMMIT")
        except BaseException as exc:  # a failing batch: retry each request alone
            self._recover(db, batch, exc)
        self.metrics.journal_commit(len(batch), time.perf_counter() - t0)

    def _recover(self, db: sqlite3.Connection, batch: list[_Pending], exc: BaseException) -> None:
        """A batch failed: roll it back and write each request alone."""
        log.exception("group commit failed; retrying one by one")
        _rollback(db)
        self._one_by_one(db, batch, exc)

    @staticmethod
    def _one_by_one(db: sqlite3.Connection, batch: list[_Pending], exc: BaseException) -> None:
        """After a failed batch: each write in a transaction of its own; the failing ones get
        their error, the others commit."""
        for p in batch:
            try:
                db.execute("BEGIN IMMEDIATE")
                for op in p.ops:
                    op(db)
                db.execute("COMMIT")
            except BaseException as exc2:
                p.error = exc2
                _rollback(db)
        if all(p.error for p in batch):
            log.error("journal write failed: %s", type(exc).__name__)

    # ---- decisions that several processes must share: one short transaction each -------------
    # They run now, on the caller's thread (not in the next group commit), on the writer's
    # connection under the commit lock: the caller's answer depends on what they return.
    def _short_transaction(self, work: Callable[[Any], Any]) -> Any:
        with self._commit_lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
                db.execute("COMMIT")
            except BaseException:
                try:
                    db.execute("ROLLBACK")
                except Exception:
                    pass
                raise
        return result

    def _lock_activation_peer(self, db: Any, peer: str, since: float) -> None:
        """Serialise counting for ``peer`` and drop expired rows. SQLite: ``BEGIN IMMEDIATE``
        already holds the database's write lock, so every expired row can go."""
        db.execute("DELETE FROM activation_failures WHERE at < ?", (since,))

    def activation_failures_since(self, peer: str, since: float) -> int:
        """How many wrong activation codes are recorded for ``peer`` at or after ``since``."""
        rows = self.query(
            "SELECT COUNT(*) AS n FROM activation_failures WHERE peer = ? AND at >= ?", (peer, since)
        )
        return int(rows[0]["n"])

    def add_activation_failure(self, peer: str, at: float, since: float, limit: int) -> bool:
        """Record one wrong activation code from ``peer`` at ``at`` unless ``limit`` are already
        recorded at or after ``since``; count and insert are one atomic step across processes.
        True when it was recorded; False when the limit had been reached (nothing written)."""

        def work(db: Any) -> bool:
            self._lock_activation_peer(db, peer, since)
            n = db.execute(
                "SELECT COUNT(*) FROM activation_failures WHERE peer = ? AND at >= ?", (peer, since)
            ).fetchone()[0]
            if int(n) >= limit:
                return False
            db.execute("INSERT INTO activation_failures (peer, at) VALUES (?, ?)", (peer, at))
            return True

        return bool(self._short_transaction(work))

    def record_settlement(self, tid: str, batch: str, business_date: str, request_f48: str,
                          response_f48: str, result: str, created_at: str) -> dict[str, Any]:
        """Record the settlement of a terminal's batch unless one is already recorded (by another
        process, or a concurrent request), atomically. Returns the recorded row (``request_f48``,
        ``response_f48``, ``result``): this one's, or the first one's when it lost the race."""

        def work(db: Any) -> dict[str, Any]:
            db.execute(
                "INSERT OR IGNORE INTO settlements (tid, batch, business_date, request_f48, response_f48,"
                " result, created_at) VALUES (?,?,?,?,?,?,?)",
                (tid, batch, business_date, request_f48, response_f48, result, created_at),
            )
            row = db.execute(
                "SELECT request_f48, response_f48, result FROM settlements WHERE tid = ? AND batch = ?",
                (tid, batch),
            ).fetchone()
            return {"request_f48": row[0], "response_f48": row[1], "result": row[2]}

        return dict(self._short_transaction(work))

    def claim_activation_code(self, tid: str, code_hashes: tuple[str, ...]) -> bool:
        """Use up ``tid``'s activation code (kept as one of ``code_hashes``) if it still has it,
        atomically: True for the one request (of any process) that does, so one code activates
        one device, whatever arrives at the same moment elsewhere."""
        marks = ",".join("?" for _ in code_hashes)

        def work(db: Any) -> bool:
            return db.execute(
                "UPDATE terminals SET activation_code_hash = NULL, activation_expires = NULL"
                f" WHERE tid = ? AND state = 'awaiting_activation' AND activation_code_hash IN ({marks})"
                " RETURNING tid", (tid, *code_hashes),
            ).fetchone() is not None

        return bool(self._short_transaction(work))

    # ---- RRN --------------------------------------------------------------------------------
    async def next_rrn(self) -> str:
        """12 digits, unique per store: a persistent counter handed out in reserved blocks."""
        if self._rrn_next >= self._rrn_limit:
            await self._reserve_rrn_block()
        n = self._rrn_next
        self._rrn_next += 1
        return f"{n:012d}"

    async def _reserve_rrn_block(self) -> None:
        got: list[int] = []

        def op(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT value FROM meta WHERE key='rrn_next'").fetchone()
            start = int(row[0]) if row else 1
            db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES('rrn_next', ?)", (str(start + RRN_BLOCK),)
            )
            got.append(start)

        await self.write(op)
        if self._rrn_next >= self._rrn_limit:
            self._rrn_next, self._rrn_limit = got[0], got[0] + RRN_BLOCK
