"""Master-key rotation without downtime: a new master key, and every wrapped blob in the store
re-wrapped under it while the switch keeps running.

Owns the list of what the store wraps under the master key (:data:`WRAPPED`: table, column,
the context each row binds its blob to), the rotation lock (``data_dir/master.key.lock``), and
the two operations the ``switch keys`` command offers:

* :func:`rotate` — file-held keys: ``master.key`` is kept as ``master.key.old.<id>`` (0600), a
  new key becomes ``master.key``, every blob not yet under it is re-wrapped (format v2), in
  transactions of ``batch_size`` rows (a running switch's writer waits at most one batch;
  SQLite's busy timeout absorbs the contention). ``meta.master_key_id`` names the new key from
  before the first batch (so a store left by an interrupted rotation matches ``master.key``;
  rerunning re-wraps what is left, under yet another key — every old key file is kept).
* :func:`rewrap` — re-wrap under a given ring's current key, nothing else: the sweep after
  processes started before a rotation were restarted, and the whole procedure when the keys come
  from the environment (``SWITCH_MASTER_KEY`` = new, ``SWITCH_MASTER_KEY_OLD`` = old).

A switch started before :func:`rotate` keeps working if its store holds a
:class:`~switch.crypto.keystore.MasterKeyring` loaded from the data directory: a blob that names
the new key makes the ring re-read the key files. Until it restarts (or adopts the new key with
``MasterKeyring.use_current``) it still wraps what it writes under the old key; those blobs stay
readable (the old key file is kept) and the next :func:`rewrap` moves them.

Plaintext is unchanged by a re-wrap, so PAN tokens, terminal keys in memory and ``change_seq``
are untouched. Must not log, print or return any unwrapped value or key (only key ids and counts),
and holds no wire or business rule.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from switch.adapters.sqlite_store import SCHEMA_VERSION
from switch.crypto.keystore import (
    ENV_VAR,
    OLD_ENV_VAR,
    MasterKeyError,
    MasterKeyring,
    blob_key_id,
    install_new_key,
)

__all__ = ["BATCH_SIZE", "WRAPPED", "RotationError", "RotationReport", "WrappedColumn",
           "rewrap", "rotate"]

BATCH_SIZE = 200
BUSY_TIMEOUT = 30.0  # seconds a batch waits for the switch's writer (SQLite busy handler)
LOCK_FILE = "master.key.lock"

Row = sqlite3.Row


class RotationError(RuntimeError):
    """The rotation cannot start or cannot finish (the message says why; never a key)."""


@dataclass(frozen=True)
class WrappedColumn:
    """One column holding blobs wrapped under the master key. ``encoding``: ``blob`` (raw),
    ``hex`` (the blob as hex text), ``legs`` (JSON list of transfer legs, each ``pan_enc`` hex)."""

    table: str
    column: str
    context: Callable[[Row], str]
    needs: tuple[str, ...] = ()
    encoding: str = "blob"
    where: str = "1=1"

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


# Every place switch/ wraps with the master key (contexts as the writers build them).
WRAPPED: tuple[WrappedColumn, ...] = (
    WrappedColumn("meta", "value", lambda r: "pan-token-key", encoding="hex",
                  where="key = 'pan_token_key'"),
    WrappedColumn("terminals", "tmk", lambda r: f"tmk:{r['tid']}", ("tid",)),
    WrappedColumn("terminals", "pik", lambda r: f"pik:{r['tid']}", ("tid",)),
    WrappedColumn("terminals", "mak", lambda r: f"mak:{r['tid']}", ("tid",)),
    WrappedColumn("terminals", "tdk", lambda r: f"tdk:{r['tid']}", ("tid",)),
    WrappedColumn("issuer_keys", "zpk", lambda r: f"zpk:{r['issuer']}", ("issuer",)),
    WrappedColumn("merchants", "id_card_enc", lambda r: f"id_card:{r['mid']}", ("mid",)),
    WrappedColumn("merchants", "bank_account_enc", lambda r: f"account:{r['mid']}", ("mid",)),
    WrappedColumn("merchants", "webhook_secret_enc", lambda r: f"webhook:{r['mid']}", ("mid",)),
    WrappedColumn("journal", "pan_enc", lambda r: "pan"),
    WrappedColumn("journal", "response_blob", lambda r: f"response:{r['dup_key']}", ("dup_key",)),
    WrappedColumn("journal", "legs", lambda r: "pan", encoding="legs"),
    WrappedColumn("saf_queue", "fields", lambda r: f"saf:{r['issuer']}", ("issuer",)),
    WrappedColumn("intents", "fields", lambda r: f"saf:{r['issuer']}", ("issuer",)),
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
    store_path: Path,
    data_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    batch_size: int = BATCH_SIZE,
    busy_timeout: float = BUSY_TIMEOUT,
) -> RotationReport:
    """Install a new master key in ``data_dir`` and re-wrap every blob of the store under it."""
    env = os.environ if env is None else env
    if ENV_VAR in env:
        raise RotationError(
            f"the master key comes from {ENV_VAR}: generate the new key where that variable is "
            f"kept, restart the switch with {ENV_VAR}=<new> and {OLD_ENV_VAR}=<old>, then run "
            "`switch keys rewrap`"
        )
    data_dir = Path(data_dir)
    with _rotation_lock(data_dir), _connect(Path(store_path), busy_timeout) as db:
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
    store_path: Path,
    data_dir: Path,
    keyring: MasterKeyring,
    *,
    batch_size: int = BATCH_SIZE,
    busy_timeout: float = BUSY_TIMEOUT,
) -> RotationReport:
    """Re-wrap every blob not already under ``keyring``'s current key (format v2), then record
    that key in ``meta.master_key_id``. Idempotent."""
    with _rotation_lock(Path(data_dir)), _connect(Path(store_path), busy_timeout) as db:
        _check_store(db, keyring)
        report = RotationReport(None, keyring.key_id)
        _rewrap_all(db, keyring, batch_size, report)
        return report


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


@contextmanager
def _connect(store_path: Path, busy_timeout: float) -> Iterator[sqlite3.Connection]:
    if not store_path.is_file():
        raise RotationError(f"no switch store at {store_path}")
    db = sqlite3.connect(store_path, timeout=busy_timeout, isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        db.execute("PRAGMA synchronous=FULL")
        yield db
    finally:
        db.close()


def _meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _check_store(db: sqlite3.Connection, ring: MasterKeyring) -> None:
    """Same schema as this code (a newer one may wrap columns it does not know), written under a
    key the ring holds (else this is the wrong data directory)."""
    try:
        version = _meta(db, "schema_version")
        recorded = _meta(db, "master_key_id")
    except sqlite3.DatabaseError as exc:
        raise RotationError(f"not a switch store: {exc}") from None
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


def _rewrap_all(
    db: sqlite3.Connection, ring: MasterKeyring, batch_size: int, report: RotationReport
) -> None:
    if batch_size < 1:
        raise RotationError("batch size must be at least 1")
    # first: a running switch that watches meta can adopt the new key at once, and a store left
    # by an interrupted rotation names the key master.key holds
    _transaction(db, lambda: db.execute(
        "INSERT OR REPLACE INTO meta(key, value) VALUES('master_key_id', ?)", (ring.key_id,)
    ))
    for col in WRAPPED:
        report.rewrapped[col.name] = _rewrap_column(db, col, ring, batch_size)


def _transaction(db: sqlite3.Connection, body: Callable[[], object]) -> None:
    db.execute("BEGIN IMMEDIATE")  # the write lock first: no stale read, no upgrade deadlock
    try:
        body()
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _rewrap_column(
    db: sqlite3.Connection, col: WrappedColumn, ring: MasterKeyring, batch_size: int
) -> int:
    """Walk the table by rowid, ``batch_size`` rows per transaction. Rows are read and updated
    inside the same write transaction, so a concurrent writer's change is never overwritten."""
    select = (
        f"SELECT rowid AS rid, {', '.join((*col.needs, col.column))} FROM {col.table} "
        f"WHERE rowid > ? AND {col.column} IS NOT NULL AND ({col.where}) ORDER BY rowid LIMIT ?"
    )
    update = f"UPDATE {col.table} SET {col.column} = ? WHERE rowid = ?"
    changed = 0
    last = -1 << 63
    while True:  # ends: each batch moves `last` past the rows it saw
        rows: list[Row] = []

        def batch() -> None:
            nonlocal changed
            rows.extend(db.execute(select, (last, batch_size)).fetchall())
            updates = []
            for row in rows:
                new, blobs = _rewrapped(col, row, ring)
                if new is not None:
                    updates.append((new, row["rid"]))
                    changed += blobs
            db.executemany(update, updates)

        _transaction(db, batch)
        if len(rows) < batch_size:
            return changed
        last = int(rows[-1]["rid"])


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
            f"{col.name} of row {row['rid']} ({context!r}) cannot be re-wrapped: {exc}; nothing "
            "after it was re-wrapped (rerun once fixed: done rows are skipped)"
        ) from None
