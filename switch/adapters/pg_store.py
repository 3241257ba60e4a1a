"""PostgreSQL store: the same tables, public API and group-committing writer as the SQLite store,
so several switch processes can share one database (issue 7).

Owns: the PostgreSQL connections (one writer connection used by the group-commit worker thread and
by set-up code through ``db``; one autocommit read connection behind ``query``), the PostgreSQL
form of the versioned migrations (derived from ``sqlite_store.MIGRATIONS``: BIGSERIAL ids, BIGINT,
BYTEA, DOUBLE PRECISION), RRN blocks reserved under a row lock, the per-peer advisory lock that makes the activation
lockout count atomic between processes, and a small translator from the
SQLite dialect the pipeline's ops are written in (``?`` placeholders, ``INSERT OR REPLACE`` /
``INSERT OR IGNORE``, ``BEGIN IMMEDIATE``) to PostgreSQL, behind a connection wrapper whose
``execute``/``fetchone``/``fetchall``/``description`` behave like ``sqlite3``'s.

Reuses from ``SqliteStore`` (by inheritance) everything that does not depend on the database
engine: the writer queue and its drain on cancel, op builders, key and PAN wrapping, PAN tokens.

Must not: hold business rules, log keys, PANs or PIN data, or rewrite SQL beyond the dialect
differences listed above (anything else is passed through unchanged and must already be valid
in both engines).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, cast

import psycopg
from psycopg.types.numeric import NumericLoader

from switch.adapters.sqlite_store import (
    MIGRATIONS,
    RRN_BLOCK,
    SCHEMA_VERSION,
    Committer,
    SqliteStore,
    StoreError,
    _Pending,
)
from switch.crypto.keystore import KeyWrapper
from switch.ports import Metrics, NullMetrics

log = logging.getLogger("switch.store")

# conflict targets for INSERT OR REPLACE / INSERT OR IGNORE (the tables' primary keys)
PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "meta": ("key",),
    "merchants": ("mid",),
    "terminals": ("tid",),
    "issuer_keys": ("issuer",),
    "settlements": ("tid", "batch"),
    "payouts": ("mid", "business_date"),
    "intents": ("key",),
    "portal_accounts": ("mid",),
    "portal_sessions": ("id_hash",),
}
# column order of tables that code inserts into without a column list
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "meta": ("key", "value"),
    "issuer_keys": ("issuer", "zpk"),
}
MIGRATION_LOCK = 0x5357_4954  # pg_advisory_lock key: one process migrates at a time
ACTIVATION_LOCK_SPACE = 9001  # pg_advisory_xact_lock(int, int): our key space, then hashtext(peer)


# ---- the SQLite -> PostgreSQL translator -------------------------------------------------------
_BEGIN = re.compile(r"^\s*BEGIN(?:\s+(?:IMMEDIATE|EXCLUSIVE|DEFERRED))?(?:\s+TRANSACTION)?\s*;?\s*$", re.I)
_INSERT_OR = re.compile(r"^(\s*)INSERT\s+OR\s+(REPLACE|IGNORE)\s+INTO\s+(\w+)\s*(\(([^)]*)\))?", re.I)


def _placeholders(sql: str) -> str:
    """``?`` outside quotes -> ``%s``; every ``%`` -> ``%%`` (psycopg's own escape)."""
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if ch == "%":
            out.append("%%")
            continue
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append(ch)
    return "".join(out)


def translate(sql: str) -> str:
    """One SQLite statement as PostgreSQL (see the module docstring for what is rewritten)."""
    if _BEGIN.match(sql):
        return "BEGIN"
    m = _INSERT_OR.match(sql)
    if m is not None:
        lead, how, table = m.group(1), m.group(2).upper(), m.group(3)
        body = sql[m.end():].strip().rstrip(";").rstrip()
        head = f"{lead}INSERT INTO {table}{' ' + m.group(4) if m.group(4) else ''} "
        if how == "IGNORE":
            sql = f"{head}{body} ON CONFLICT DO NOTHING"
        else:
            key = PRIMARY_KEYS.get(table.lower())
            if key is None:
                raise StoreError(f"INSERT OR REPLACE INTO {table}: no primary key known for PostgreSQL")
            if m.group(5) is not None:
                cols = tuple(c.strip() for c in m.group(5).split(",") if c.strip())
            elif table.lower() in TABLE_COLUMNS:
                cols = TABLE_COLUMNS[table.lower()]
            else:
                raise StoreError(f"INSERT OR REPLACE INTO {table} needs a column list for PostgreSQL")
            rest = [c for c in cols if c not in key]
            action = (
                "DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in rest) if rest else "DO NOTHING"
            )
            sql = f"{head}{body} ON CONFLICT ({', '.join(key)}) {action}"
    return _placeholders(sql)


def pg_ddl(sqlite_ddl: str) -> str:
    """A migration's SQLite DDL as PostgreSQL DDL (types only; statements are kept)."""
    ddl = re.sub(r"\bINTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b", "BIGSERIAL PRIMARY KEY", sqlite_ddl, flags=re.I)
    ddl = re.sub(r"\bINTEGER\b", "BIGINT", ddl, flags=re.I)
    ddl = re.sub(r"\bBLOB\b", "BYTEA", ddl, flags=re.I)
    ddl = re.sub(r"\bREAL\b", "DOUBLE PRECISION", ddl, flags=re.I)
    return ddl


PG_MIGRATIONS: list[str] = [pg_ddl(m) for m in MIGRATIONS]


class _SqliteLikeNumeric(NumericLoader):
    """SUM/AVG over integer columns are ``numeric`` in PostgreSQL: load them as SQLite would
    (an int when whole, else a float) so callers see the same types from both stores."""

    def load(self, data: Any) -> Any:
        value = super().load(data)
        if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
            return int(value)
        return float(value)


class PgCursor:
    """The part of ``sqlite3.Cursor`` the code base uses."""

    def __init__(self, cur: psycopg.Cursor[tuple[Any, ...]]) -> None:
        self._cur = cur

    @property
    def description(self) -> Sequence[Any] | None:
        return self._cur.description

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def fetchone(self) -> tuple[Any, ...] | None:
        return None if self._cur.description is None else self._cur.fetchone()

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [] if self._cur.description is None else self._cur.fetchall()

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.fetchall())


class PgConnection:
    """A psycopg connection (autocommit: transactions are explicit BEGIN/COMMIT, as with the
    SQLite store's ``isolation_level=None``) that speaks the code base's SQLite dialect."""

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        self.raw = conn

    def execute(self, sql: str, params: Iterable[Any] = ()) -> PgCursor:
        args = tuple(int(p) if isinstance(p, bool) else p for p in params)
        cur = self.raw.cursor()
        cur.execute(translate(sql), args)
        return PgCursor(cur)

    @property
    def broken(self) -> bool:
        return bool(self.raw.closed or self.raw.broken)

    def close(self) -> None:
        self.raw.close()


def _connect(dsn: str) -> PgConnection:
    try:
        conn = psycopg.connect(dsn, autocommit=True)
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to PostgreSQL: {type(exc).__name__}") from exc
    conn.adapters.register_loader("numeric", _SqliteLikeNumeric)
    return PgConnection(conn)


class PostgresStore(SqliteStore):
    """``SqliteStore``'s public API over PostgreSQL. ``db`` and the ops' connection are a
    ``PgConnection`` (duck-typed like ``sqlite3.Connection``)."""

    def __init__(self, dsn: str, master_key: KeyWrapper, metrics: Metrics | None = None) -> None:
        # not SqliteStore.__init__: there is no file
        self.dsn = dsn
        self.path = Path(os.devnull)  # kept for callers that log it; never opened
        self.master_key = master_key
        self.metrics = metrics or NullMetrics()
        self._pg: PgConnection | None = None
        self._pg_reader: PgConnection | None = None
        self._commit_lock = threading.Lock()
        self._probe_ok = True
        self._init_writer()
        self._rrn_next = 0
        self._rrn_limit = 0
        self._pan_key = b""

    # ---- lifecycle ------------------------------------------------------------------------
    def open(self) -> None:
        self._pg = _connect(self.dsn)
        try:
            self._migrate()
            self._pg_reader = _connect(self.dsn)
            self._check_master_key()
            self._pan_key = self._load_pan_token_key()
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        for conn in (self._pg_reader, self._pg):
            if conn is not None:
                conn.close()
        self._pg_reader = None
        self._pg = None

    @property
    def db(self) -> Any:  # a PgConnection: sqlite3.Connection's execute(), our dialect
        if self._pg is None:
            raise StoreError("store is not open")
        return self._pg

    @property
    def _reader(self) -> Any:  # SqliteStore.load_merchants/load_terminals(reader=True) use it
        return self._pg_reader

    @_reader.setter
    def _reader(self, value: Any) -> None:
        self._pg_reader = value

    @property
    def _db(self) -> Any:
        return self._pg

    @_db.setter
    def _db(self, value: Any) -> None:
        self._pg = value

    def _migrate(self) -> None:
        db = self.db
        db.execute("SELECT pg_advisory_lock(?)", (MIGRATION_LOCK,))  # another process may be migrating
        try:
            has_meta = db.execute("SELECT to_regclass('meta')").fetchone()[0] is not None
            self._apply_migrations(has_meta, PG_MIGRATIONS)
        finally:
            db.execute("SELECT pg_advisory_unlock(?)", (MIGRATION_LOCK,))

    def _meta_once(self, key: str, value: str) -> str:
        """Set ``meta[key]`` unless a process already did; return the value that won."""
        self.db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES(?, ?)", (key, value))
        return str(self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0])

    def _check_master_key(self) -> None:
        recorded = self._meta_once("master_key_id", self.master_key.key_id)
        if recorded != self.master_key.key_id and recorded not in getattr(self.master_key, "key_ids", ()):
            raise StoreError(
                f"the master key (id {self.master_key.key_id}) is not the one this store was written "
                f"with (id {recorded}): refusing to start"
            )

    def _load_pan_token_key(self) -> bytes:
        fresh = self.master_key.wrap(os.urandom(32), "pan-token-key").hex()
        return self.master_key.unwrap(bytes.fromhex(self._meta_once("pan_token_key", fresh)), "pan-token-key")

    def writable(self) -> bool:
        """For /readyz: the last write probe committed and the writer connection is alive."""
        return self._pg is not None and not self._closing and self._probe_ok and not self._pg.broken

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        if self._pg_reader is None:
            raise StoreError("store is not open")
        cur = self._pg_reader.execute(sql, params)
        cols = [d[0] for d in cur.description or ()]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    # ---- the group commit ---------------------------------------------------------------------
    def _hand_off(self, batch: list[_Pending], committer: Committer) -> None:
        # the whole transaction on the commit thread: every statement is a round trip to the server
        self._commit_on_thread(batch, committer)

    def _commit_locked(self, batch: list[_Pending]) -> None:
        t0 = time.perf_counter()
        try:
            db = self.db
            if db.broken:  # the server restarted: one new connection, then the usual path
                self._pg = db = _connect(self.dsn)
            self._run(db, batch)
        except BaseException as exc:  # a failing batch: retry each request alone
            log.exception("group commit failed; retrying one by one")
            for p in batch:
                try:
                    self._run(self.db, [p])
                except BaseException as exc2:
                    p.error = exc2
            if all(p.error for p in batch):
                log.error("journal write failed: %s", type(exc).__name__)
        self.metrics.journal_commit(len(batch), time.perf_counter() - t0)

    @staticmethod
    def _run(db: PgConnection, batch: list[_Pending]) -> None:
        db.execute("BEGIN")
        try:
            for p in batch:
                for op in p.ops:
                    op(cast(Any, db))
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except psycopg.Error:
                pass
            raise

    # ---- shared decisions (SqliteStore.add_activation_failure) -----------------------------
    def _lock_activation_peer(self, db: Any, peer: str, since: float) -> None:
        """A transaction-scoped advisory lock on the peer (read committed would let two processes
        both count four and both insert a fifth), then the expired rows nobody else is deleting
        (SKIP LOCKED: two sweeps never wait on, or deadlock with, each other)."""
        db.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (ACTIVATION_LOCK_SPACE, peer))
        db.execute(
            "DELETE FROM activation_failures WHERE ctid IN (SELECT ctid FROM activation_failures"
            " WHERE at < ? FOR UPDATE SKIP LOCKED)", (since,),
        )

    # ---- RRN ------------------------------------------------------------------------------
    async def _reserve_rrn_block(self) -> None:
        """Take the next block under the ``meta.rrn_next`` row lock (UPDATE ... RETURNING): two
        processes committing at once are serialised by PostgreSQL, never given the same block."""
        got: list[int] = []

        def op(db: PgConnection) -> None:
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('rrn_next', '1')")
            row = db.execute(
                "UPDATE meta SET value = CAST(CAST(value AS BIGINT) + ? AS TEXT) WHERE key = 'rrn_next'"
                " RETURNING CAST(value AS BIGINT) - ?",
                (RRN_BLOCK, RRN_BLOCK),
            ).fetchone()
            assert row is not None  # the INSERT above made sure the row exists
            got.append(int(row[0]))

        await self.write(cast(Any, op))
        if self._rrn_next >= self._rrn_limit:
            self._rrn_next, self._rrn_limit = got[0], got[0] + RRN_BLOCK


def open_store_for(dsn: str, master_key: KeyWrapper, metrics: Metrics | None = None) -> SqliteStore | PostgresStore:
    """The store a ``[store] dsn`` names, opened (migrated, master key checked):
    ``postgresql://...`` / ``postgres://...`` -> PostgresStore; ``sqlite:///path`` or a plain
    file path -> SqliteStore. The caller starts ``run_writer`` and closes it."""
    store: SqliteStore | PostgresStore
    if dsn.startswith(("postgresql://", "postgres://")):
        store = PostgresStore(dsn, master_key, metrics)
    elif dsn.startswith("sqlite://"):
        store = SqliteStore(Path(dsn[len("sqlite://"):]), master_key, metrics)
    else:
        store = SqliteStore(Path(dsn), master_key, metrics)
    store.open()
    return store


# ---- for the back office (switch.admin): additive helpers, no store needed ----------------------
def connect(dsn: str) -> PgConnection:
    """An autocommit connection speaking the store's SQLite dialect (the same translator), for
    back-office code that works on the tables without a store object (master-key rotation)."""
    return _connect(dsn)


def store_exists(dsn: str) -> bool:
    """The database has the switch's tables (``meta``); False for an empty database."""
    conn = _connect(dsn)
    try:
        row = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
        return bool(row and row[0])
    finally:
        conn.close()


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(dsn)
        host = parts.hostname or ""
        user = f"{parts.username}@" if parts.username else ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "postgresql://(unparsable DSN)"
    return urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, "", ""))
