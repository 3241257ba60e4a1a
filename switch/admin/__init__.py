"""Back-office operations (onboarding, reports, payouts, key rotation): a Python API over the store
that the ``switch`` CLI (and the admin HTTP API) calls. No business rule of the wire lives here.

Owns where a back-office command finds its store (:class:`StoreTarget`): the data directory (the
master key files, and the SQLite file ``switch.db`` by default) and the store DSN — the
``[store] dsn`` of the switch's TOML file given with ``--config``, else ``SWITCH_STORE_DSN``, else
none (the SQLite file). A ``postgresql://`` DSN opens the PostgreSQL store a running ``switch
serve`` uses (``switch.adapters.pg_store.open_store_for``), so every command works against it.
Must not print or log a DSN's password (messages name the host and database only).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from switch.adapters.sqlite_store import SqliteStore, next_change_seq

__all__ = ["DSN_ENV", "StoreTarget", "add_store_arguments", "bump_change_seq", "open_store", "target_of"]

DSN_ENV = "SWITCH_STORE_DSN"
DEFAULT_DATA_DIR = Path("data")
STORE_FILE = "switch.db"
PG_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class StoreTarget:
    """The store a back-office command works on. ``dsn``: ``""`` (the SQLite file of
    ``data_dir``), ``sqlite:///path`` or ``postgresql://...``."""

    data_dir: Path
    dsn: str = ""

    @classmethod
    def of(cls, data_dir: Path, env: Mapping[str, str] | None = None) -> StoreTarget:
        """``data_dir`` with the DSN of ``SWITCH_STORE_DSN`` (the override ``switch serve`` honours too)."""
        env = os.environ if env is None else env
        return cls(Path(data_dir), env.get(DSN_ENV, "").strip())

    @property
    def is_postgres(self) -> bool:
        return self.dsn.startswith(PG_SCHEMES)

    @property
    def sqlite_path(self) -> Path:
        if self.dsn.startswith("sqlite://"):
            return Path(self.dsn[len("sqlite://"):])
        return self.data_dir / STORE_FILE

    @property
    def location(self) -> Path | str:
        """What ``switch.admin.rotation`` takes: the SQLite file, or the PostgreSQL DSN."""
        return self.dsn if self.is_postgres else self.sqlite_path

    def describe(self) -> str:
        """For messages: the SQLite file, or the DSN without its password."""
        if not self.is_postgres:
            return str(self.sqlite_path)
        from switch.adapters.pg_store import redact_dsn

        return redact_dsn(self.dsn)

    def exists(self) -> bool:
        """A store was created there (the SQLite file exists; the database has the switch's tables)."""
        if not self.is_postgres:
            return self.sqlite_path.exists()
        from switch.adapters.pg_store import store_exists

        return store_exists(self.dsn)


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--config`` on a back-office command."""
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="master key files (and the SQLite store unless a DSN is set); default: data, "
                             "or the data_dir of --config")
    parser.add_argument("--config", type=Path, default=None,
                        help="the switch's TOML file: its data_dir and [store] dsn (SWITCH_* variables "
                             "override it); without it SWITCH_STORE_DSN selects the store")


def target_of(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> StoreTarget:
    """The store named by ``--config`` / ``--data-dir`` / ``SWITCH_STORE_DSN`` (ConfigError when the
    file or the DSN is not valid)."""
    from switch.config import ConfigError, load_config

    env = os.environ if env is None else env
    data_dir: Path | None = getattr(args, "data_dir", None)
    config: Path | None = getattr(args, "config", None)
    if config is not None:
        cfg = load_config(config, env)
        return StoreTarget(data_dir if data_dir is not None else cfg.data_dir, cfg.store_dsn)
    target = StoreTarget.of(data_dir if data_dir is not None else DEFAULT_DATA_DIR, env)
    if target.dsn and not target.dsn.startswith(("sqlite://", *PG_SCHEMES)):
        raise ConfigError(f"{DSN_ENV}: must start with sqlite:/// or postgresql://")
    return target


@contextmanager
def open_store(where: Path | StoreTarget, *, create_key: bool = False) -> Iterator[SqliteStore]:
    """The store, opened with the data directory's master key (SWITCH_MASTER_KEY or master.key).
    A bare data directory means :meth:`StoreTarget.of` (``SWITCH_STORE_DSN`` may name PostgreSQL)."""
    from switch.app import load_master_key

    target = where if isinstance(where, StoreTarget) else StoreTarget.of(where)
    key = load_master_key(target.data_dir, create=create_key)
    store: SqliteStore
    if target.is_postgres:
        from switch.adapters.pg_store import open_store_for

        store = open_store_for(target.dsn, key)  # opened: migrated, master key checked
    else:
        store = SqliteStore(target.sqlite_path, key)
        store.open()
    try:
        yield store
    finally:
        store.close()


def bump_change_seq(store: SqliteStore) -> int:
    """Tell a running switch that merchants or terminals changed (it reloads rows whose
    change_seq is above the one it saw). Call inside the transaction that made the change."""
    return next_change_seq(store.db)
