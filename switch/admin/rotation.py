"""Master-key rotation without downtime: a new master key, and every wrapped blob in the store
re-wrapped under it while the switch keeps running — on the SQLite file of the data directory or
on the PostgreSQL database several switch processes share.

Owns the list of what the store wraps under the master key (:data:`WRAPPED`: table, column, the
key the walk pages by, the context each row binds its blob to), the rotation locks
(``data_dir/master.key.lock``, and on PostgreSQL a database advisory lock, so two operators on
two hosts cannot rotate one database at once), and the two operations the ``switch keys`` command
offers:

* :func:`rotate` — file-held keys: ``master.key`` is kept as ``master.key.old.<id>`` (0600), a
  new key becomes ``master.key``, every blob not yet under it is re-wrapped (format v2), in
  transactions of ``batch_size`` rows (a running switch's writer waits at most one batch).
  ``meta.master_key_id`` names the new key from before the first batch (so a store left by an
  interrupted rotation matches ``master.key``; rerunning re-wraps what is left, under yet another
  key — every old key file is kept).
* :func:`rewrap` — re-wrap under a given ring's current key, nothing else: the sweep after
  processes started before a rotation were restarted, and the whole procedure when the keys come
  from the environment (``SWITCH_MASTER_KEY`` = new, ``SWITCH_MASTER_KEY_OLD`` = old).

One code path for both engines: the SQL is written in the store's SQLite dialect and runs on
PostgreSQL through the store's own translator (``switch.adapters.pg_store.connect``); the small
:class:`_Db` adapter holds the only differences — how a write transaction starts (SQLite
``BEGIN IMMEDIATE`` takes the write lock first; PostgreSQL locks the batch's rows with ``FOR
UPDATE``), how long a batch waits for the switch's writer (busy timeout / ``lock_timeout``), and
that a PostgreSQL batch chosen as a deadlock victim is retried.

A switch started before :func:`rotate` keeps working if its store holds a
:class:`~switch.crypto.keystore.MasterKeyring` loaded from the data directory: a blob that names
the new key makes the ring re-read the key files, and it adopts ``meta.master_key_id`` for new
wraps within a second. Blobs it wrapped under the old key meanwhile stay readable (the old key
file is kept) and the next :func:`rewrap` moves them. Several processes on one database must read
the same key files (one data directory, or the same files copied to each host before the
rotation is run; with keys in the environment use :func:`rewrap`).

Plaintext is unchanged by a re-wrap, so PAN tokens, terminal keys in memory and ``change_seq``
are untouched. Must not log, print or return any unwrapped value or key (only key ids and counts),
and holds no wire or business rule.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switch.adapters.sqlite_store import SCHEMA_VERSION, StoreError
from switch.crypto.keystore import (
    ENV_VAR,
    OLD_ENV_VAR,
    MasterKeyError,
    MasterKeyring,
    blob_key_id,
    install_new_key,
)

__all__ = ["BATCH_SIZE", "WRAPPED", "RotationError", "RotationReport", "StoreLocation", "WrappedColumn",
           "rewrap", "rotate"]

BATCH_SIZE = 200
BUSY_TIMEOUT = 30.0  # seconds a batch waits for the switch's writer (busy handler / lock_timeout)
LOCK_FILE = "master.key.lock"
PG_ROTATION_LOCK = 0x5357_524B  # pg_advisory_lock key: one rotation per database
PG_RETRIES = 5  # a batch PostgreSQL chose as a deadlock victim is retried this many times

Row = Mapping[str, Any]
StoreLocation = Path | str  # the SQLite file, or a postgresql:// DSN


class RotationError(RuntimeError):
    """The rotation cannot start or cannot finish (the message says why; never a key)."""


@dataclass(frozen=True)
class WrappedColumn:
    """One column holding blobs wrapped under the master key. ``key``: the table's primary key
    (the walk pages by it). ``encoding``: ``blob`` (raw), ``hex`` (the blob as hex text),
    ``legs`` (JSON list of transfer legs, each ``pan_enc`` hex)."""

    table: str
    column: str
    key: str
    context: Callable[[Row], str]
    needs: tuple[str, ...] = ()
    encoding: str = "blob"
    where: str = "1=1"

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


# Every place switch/ wraps with the master key (contexts as the writers build them).
WRAPPED: tuple[WrappedColumn, ...] = (
    WrappedColumn("meta", "value", "key", lambda r: "pan-token-key", encoding="hex",
                  where="key = 'pan_token_key'"),
    WrappedColumn("terminals", "tmk", "tid", lambda r: f"tmk:{r['tid']}", ("tid",)),
    WrappedColumn("terminals", "pik", "tid", lambda r: f"pik:{r['tid']}", ("tid",)),
    WrappedColumn("terminals", "mak", "tid", lambda r: f"mak:{r['tid']}", ("tid",)),
    WrappedColumn("terminals", "tdk", "tid", lambda r: f"tdk:{r['tid']}", ("tid",)),
    WrappedColumn("issuer_keys", "zpk", "issuer", lambda r: f"zpk:{r['issuer']}", ("issuer",)),
    WrappedColumn("merchants", "id_card_enc", "mid", lambda r: f"id_card:{r['mid']}", ("mid",)),
    WrappedColumn("merchants", "bank_account_enc", "mid", lambda r: f"account:{r['mid']}", ("mid",)),
    WrappedColumn("merchants", "webhook_secret_enc", "mid", lambda r: f"webhook:{r['mid']}", ("mid",)),
    WrappedColumn("journal", "pan_enc", "id", lambda r: "pan"),
    WrappedColumn("journal", "response_blob", "id", lambda r: f"response:{r['dup_key']}", ("dup_key",)),
    WrappedColumn("journal", "legs", "id", lambda r: "pan", encoding="legs"),
    WrappedColumn("saf_queue", "fields", "id", lambda r: f"saf:{r['issuer']}", ("issuer",)),
    WrappedColumn("intents", "fields", "key", lambda r: f"saf:{r['issuer']}", ("issuer",)),
)


@dataclass
class RotationReport:
    old_key_id: str | None  # None: rewrap only (no new key)
    new_key_id: str
    rewrapped: dict[str, int] = field(default_factory=dict)  # "table.column" -> blobs re-wrapped

    @property
    def total(self) -> int:
        return sum(self.rewrapped.values())


def rotate(
    store: StoreLocation,
    data_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    batch_size: int = BATCH_SIZE,
    busy_timeout: float = BUSY_TIMEOUT,
) -> RotationReport:
    """Install a new master key in ``data_dir`` and re-wrap every blob of the store (the SQLite
    file, or the database of a ``postgresql://`` DSN) under it."""
    env = os.environ if env is None else env
    if ENV_VAR in env:
        raise RotationError(
            f"the master key comes from {ENV_VAR}: generate the new key where that variable is "
            f"kept, restart the switch with {ENV_VAR}=<new> and {OLD_ENV_VAR}=<old>, then run "
            "`switch keys rewrap`"
        )
    data_dir = Path(data_dir)
    with _rotation_lock(data_dir), _connect(store, busy_timeout) as db:
        before = MasterKeyring.load({}, data_dir)
        _check_store(db, before)
        old, new = install_new_key(data_dir)
        ring = MasterKeyring.load({}, data_dir)
        if ring.key_id != new.key_id:  # cannot happen under the lock; do not rewrap blindly
            raise RotationError("master.key changed during the rotation")
        report = RotationReport(old.key_id, new.key_id)
        _rewrap_all(db, ring, batch_size, report)
        return report


def rewrap(
    store: StoreLocation,
    data_dir: Path,
    keyring: MasterKeyring,
    *,
    batch_size: int = BATCH_SIZE,
    busy_timeout: float = BUSY_TIMEOUT,
) -> RotationReport:
    """Re-wrap every blob not already under ``keyring``'s current key (format v2), then record
    that key in ``meta.master_key_id``. Idempotent."""
    with _rotation_lock(Path(data_dir)), _connect(store, busy_timeout) as db:
        _check_store(db, keyring)
        report = RotationReport(None, keyring.key_id)
        _rewrap_all(db, keyring, batch_size, report)
        return report


# ---- the connection adapter -------------------------------------------------------------------
class _Db:
    """A store connection as the rotation uses it: SQL in the store's SQLite dialect (translated
    on PostgreSQL by the store's own translator), rows as mappings, and the engine's way to lock
    what a batch reads before it rewrites it."""

    def __init__(self, conn: Any, *, postgres: bool) -> None:
        self.conn = conn
        self.postgres = postgres
        # SQLite: BEGIN IMMEDIATE already holds the database's write lock; PostgreSQL: lock the rows
        self.lock_rows = " FOR UPDATE" if postgres else ""
        self.retryable: tuple[type[BaseException], ...] = ()
        self.errors: tuple[type[BaseException], ...] = (sqlite3.DatabaseError,)
        if postgres:
            import psycopg

            self.retryable = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
            self.errors = (psycopg.Error,)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        cur = self.conn.execute(sql, params)
        cols = [d[0] for d in cur.description or ()]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def run(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        self.conn.execute(sql, params)

    def transaction(self, body: Callable[[], object]) -> None:
        """``body`` in one write transaction; on PostgreSQL retried when chosen as a deadlock
        victim against the switch's writer (nothing of it was committed)."""
        for attempt in range(PG_RETRIES + 1):
            self.run("BEGIN IMMEDIATE")  # SQLite: the write lock first (no stale read, no upgrade deadlock)
            try:
                body()
            except self.retryable:
                self.run("ROLLBACK")
                if attempt == PG_RETRIES:
                    raise
                time.sleep(0.05 * (attempt + 1))
                continue
            except BaseException:
                self.run("ROLLBACK")
                raise
            self.run("COMMIT")
            return


@contextmanager
def _connect(store: StoreLocation, busy_timeout: float) -> Iterator[_Db]:
    if isinstance(store, str) and store.startswith(("postgresql://", "postgres://")):
        with _connect_pg(store, busy_timeout) as db:
            yield db
        return
    path = Path(store)
    if not path.is_file():
        raise RotationError(f"no switch store at {path}")
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        yield _Db(conn, postgres=False)
    finally:
        conn.close()


@contextmanager
def _connect_pg(dsn: str, busy_timeout: float) -> Iterator[_Db]:
    from switch.adapters.pg_store import connect, redact_dsn

    try:
        conn = connect(dsn)
    except StoreError as exc:
        raise RotationError(f"{redact_dsn(dsn)}: {exc}") from None
    try:
        db = _Db(conn, postgres=True)
        db.run(f"SET lock_timeout = '{int(busy_timeout * 1000)}ms'")
        got = db.rows("SELECT pg_try_advisory_lock(?) AS got", (PG_ROTATION_LOCK,))
        if not got or not got[0]["got"]:
            raise RotationError(f"another key rotation is running on {redact_dsn(dsn)}")
        yield db  # the advisory lock goes with the connection
    finally:
        conn.close()


# ---- internals --------------------------------------------------------------------------------
@contextmanager
def _rotation_lock(data_dir: Path) -> Iterator[None]:
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError as exc:
        raise RotationError(f"cannot open the rotation lock in {data_dir}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RotationError(f"another key rotation is running on {data_dir}") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _meta(db: _Db, key: str) -> str | None:
    rows = db.rows("SELECT value FROM meta WHERE key = ?", (key,))
    return None if not rows else str(rows[0]["value"])


def _check_store(db: _Db, ring: MasterKeyring) -> None:
    """Same schema as this code (a newer one may wrap columns it does not know), written under a
    key the ring holds (else this is the wrong data directory)."""
    try:
        version = _meta(db, "schema_version")
        recorded = _meta(db, "master_key_id")
    except db.errors as exc:
        raise RotationError(f"not a switch store: {type(exc).__name__}: {exc}") from None
    if version != str(SCHEMA_VERSION):
        raise RotationError(
            f"store schema version {version} is not {SCHEMA_VERSION}: start this switch version "
            "on it once (it migrates), then rotate"
        )
    if recorded is not None and recorded not in ring:
        raise RotationError(
            f"the store was written under master key {recorded}, which is not among the loaded "
            f"keys ({', '.join(ring.key_ids)}): wrong data directory or key files"
        )


def _rewrap_all(db: _Db, ring: MasterKeyring, batch_size: int, report: RotationReport) -> None:
    if batch_size < 1:
        raise RotationError("batch size must be at least 1")
    # first: a running switch that watches meta can adopt the new key at once, and a store left
    # by an interrupted rotation names the key master.key holds
    db.transaction(lambda: db.run(
        "INSERT OR REPLACE INTO meta(key, value) VALUES('master_key_id', ?)", (ring.key_id,)
    ))
    for col in WRAPPED:
        report.rewrapped[col.name] = _rewrap_column(db, col, ring, batch_size)


def _rewrap_column(db: _Db, col: WrappedColumn, ring: MasterKeyring, batch_size: int) -> int:
    """Walk the table by its primary key, ``batch_size`` rows per transaction. Rows are read
    (and on PostgreSQL locked) and updated inside the same write transaction, so a concurrent
    writer's change is never overwritten."""
    cols = ", ".join(dict.fromkeys((col.key, *col.needs, col.column)))
    where = f"{col.column} IS NOT NULL AND ({col.where})"
    tail = f"ORDER BY {col.key} LIMIT ?{db.lock_rows}"
    first = f"SELECT {cols} FROM {col.table} WHERE {where} {tail}"
    after = f"SELECT {cols} FROM {col.table} WHERE {col.key} > ? AND {where} {tail}"
    update = f"UPDATE {col.table} SET {col.column} = ? WHERE {col.key} = ?"
    changed = 0
    last: Any = None
    while True:  # ends: each batch moves `last` past the rows it saw
        rows: list[Row] = []
        touched = 0

        def batch() -> None:
            nonlocal touched
            rows.clear()
            touched = 0
            rows.extend(db.rows(first, (batch_size,)) if last is None else db.rows(after, (last, batch_size)))
            for row in rows:
                new, blobs = _rewrapped(col, row, ring)
                if new is not None:
                    db.run(update, (new, row[col.key]))
                    touched += blobs

        db.transaction(batch)
        changed += touched
        if len(rows) < batch_size:
            return changed
        last = rows[-1][col.key]


def _under_current(blob: bytes, ring: MasterKeyring) -> bool:
    try:
        return blob_key_id(blob) == ring.key_id
    except MasterKeyError:
        return False


def _rewrap_blob(blob: bytes, context: str, ring: MasterKeyring) -> bytes | None:
    if _under_current(blob, ring):
        return None
    return ring.wrap(ring.unwrap(blob, context), context)


def _rewrapped(col: WrappedColumn, row: Row, ring: MasterKeyring) -> tuple[bytes | str | None, int]:
    """The new value and how many blobs it re-wrapped; ``(None, 0)`` when the stored value is
    already under the current key."""
    context = col.context(row)
    value = row[col.column]
    try:
        if col.encoding == "blob":
            new = _rewrap_blob(bytes(value), context, ring)
            return new, int(new is not None)
        if col.encoding == "hex":
            new = _rewrap_blob(bytes.fromhex(value), context, ring)
            return (None, 0) if new is None else (new.hex(), 1)
        legs = json.loads(value)
        touched = 0
        for leg in legs:
            if isinstance(leg, dict) and leg.get("pan_enc"):
                new = _rewrap_blob(bytes.fromhex(leg["pan_enc"]), context, ring)
                if new is not None:
                    leg["pan_enc"] = new.hex()
                    touched += 1
        return (json.dumps(legs), touched) if touched else (None, 0)
    except (MasterKeyError, ValueError, TypeError) as exc:
        raise RotationError(
            f"{col.name} of row {row[col.key]} ({context!r}) cannot be re-wrapped: {exc}; nothing "
            "after it was re-wrapped (rerun once fixed: done rows are skipped)"
        ) from None
