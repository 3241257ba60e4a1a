"""Back-office operations (onboarding, reports, payouts): a Python API over the store that the
``switch`` CLI (and later the admin HTTP API) calls. No business rule of the wire lives here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from switch.adapters.sqlite_store import SqliteStore


@contextmanager
def open_store(data_dir: Path, *, create_key: bool = False) -> Iterator[SqliteStore]:
    """The data directory's store, opened with its master key (SWITCH_MASTER_KEY or master.key)."""
    from switch.app import load_master_key

    store = SqliteStore(Path(data_dir) / "switch.db", load_master_key(Path(data_dir), create=create_key))
    store.open()
    try:
        yield store
    finally:
        store.close()


def bump_change_seq(store: SqliteStore) -> int:
    """Tell a running switch that merchants or terminals changed (it reloads rows whose
    change_seq is above the one it saw). Call inside the transaction that made the change."""
    store.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'change_seq'")
    return int(store.db.execute("SELECT value FROM meta WHERE key = 'change_seq'").fetchone()[0])
