"""Master-key rotation (switch/admin/rotation.py) on the PostgreSQL store several switch processes
share, through the same code as on SQLite (the store's SQL translator): the store of
``test_rotation`` seeded in a throwaway database, rotated by DSN; afterwards every blob in the
database is v2 under the new key and the new key alone reads everything. Also: a store opened
before the rotation keeps committing journal rows while small batches run (rows locked FOR UPDATE,
nothing lost), a second rotation on the same database is refused while one holds the database's
rotation lock, and ``switch keys rotate-master --config`` / ``set-zpk`` work on the DSN."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest

from switch.adapters.pg_store import PostgresStore, open_store_for
from switch.admin import keys_cli
from switch.admin.rotation import PG_ROTATION_LOCK, RotationError, rewrap, rotate
from switch.crypto.keystore import (
    ENV_VAR,
    KEY_FILE,
    OLD_ENV_VAR,
    OLD_KEY_FILE_PREFIX,
    MasterKey,
    MasterKeyring,
)

from tests.adapters.pg_cluster import pg_cluster, pg_database  # noqa: F401  (fixtures)
from tests.admin.test_rotation import (
    JOURNAL_ROWS, check_readable, count_key_ids, entry, seed_into, wrapped_values,
)

pytestmark = [pytest.mark.postgres]


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv(OLD_ENV_VAR, raising=False)
    monkeypatch.delenv("SWITCH_STORE_DSN", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    MasterKey.create_file(data / KEY_FILE)
    return data


def seed(data: Path, dsn: str) -> str:
    store = open_store_for(dsn, MasterKey.from_file(data / KEY_FILE))  # bare key: v1 blobs
    try:
        return seed_into(store)
    finally:
        store.close()


def every_blob(dsn: str) -> Iterator[tuple[str, bytes]]:
    """Every wrapped value in the database (see test_rotation.wrapped_values)."""
    with psycopg.connect(dsn) as db:
        tables = [r[0] for r in db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
        yield from wrapped_values(db, tables)


def key_ids_in(dsn: str) -> dict[str | None, int]:
    return count_key_ids(every_blob(dsn))


def meta_key_id(dsn: str) -> str:
    with psycopg.connect(dsn) as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'master_key_id'").fetchone()
    assert row is not None
    return str(row[0])


def test_rotation_on_postgresql_rewraps_every_blob(data_dir: Path, pg_database: str) -> None:  # noqa: F811
    token = seed(data_dir, pg_database)
    old = MasterKey.from_file(data_dir / KEY_FILE)
    before = key_ids_in(pg_database)
    assert set(before) == {None}
    report = rotate(pg_database, data_dir, env={}, batch_size=37)
    new = MasterKey.from_file(data_dir / KEY_FILE)
    assert report.old_key_id == old.key_id and report.new_key_id == new.key_id != old.key_id
    assert key_ids_in(pg_database) == {new.key_id: before[None]}
    assert report.total == before[None]
    assert report.rewrapped["journal.pan_enc"] == JOURNAL_ROWS
    assert report.rewrapped["journal.legs"] == 2 * (JOURNAL_ROWS // 10)
    assert meta_key_id(pg_database) == new.key_id
    # the new key alone reads everything; the old key alone is refused
    (data_dir / (OLD_KEY_FILE_PREFIX + old.key_id)).rename(data_dir.parent / "offline-backup.key")
    alone = open_store_for(pg_database, MasterKey.from_file(data_dir / KEY_FILE))
    try:
        check_readable(alone, token)
    finally:
        alone.close()
    with pytest.raises(Exception, match="not the one this store was written with"):
        open_store_for(pg_database, old).close()


@pytest.mark.anyio
async def test_rotation_on_postgresql_while_a_store_writes(data_dir: Path, pg_database: str) -> None:  # noqa: F811
    """A PostgresStore opened before the rotation commits journal rows through its group-commit
    writer while the rotation runs in a thread with batches of 8 rows (locked FOR UPDATE): nothing
    fails, everything stays readable, and ``rewrap`` moves what the old process wrote."""
    token = seed(data_dir, pg_database)
    running = open_store_for(pg_database, MasterKeyring.load({}, data_dir))
    assert isinstance(running, PostgresStore)
    extra = 60
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(running.run_writer)
            done = anyio.Event()

            async def do_rotate() -> None:
                await anyio.to_thread.run_sync(
                    lambda: rotate(pg_database, data_dir, env={}, batch_size=8, busy_timeout=20))
                done.set()

            tg.start_soon(do_rotate)
            for n in range(JOURNAL_ROWS + 1, JOURNAL_ROWS + 1 + extra):
                await running.write(running.op_journal(entry(n, running)))
            await done.wait()
            tg.cancel_scope.cancel()
        check_readable(running, token, JOURNAL_ROWS + extra)
        new_id = MasterKey.from_file(data_dir / KEY_FILE).key_id
        ids = key_ids_in(pg_database)
        assert set(ids) <= {new_id, running.master_key.key_id}
        report = rewrap(pg_database, data_dir, MasterKeyring.load({}, data_dir))
        assert report.total == ids.get(running.master_key.key_id, 0)
        assert set(key_ids_in(pg_database)) == {new_id}
        check_readable(running, token, JOURNAL_ROWS + extra)
    finally:
        running.close()


def test_a_second_rotation_on_the_same_database_is_refused(data_dir: Path, pg_database: str,  # noqa: F811
                                                            tmp_path: Path) -> None:
    """Two operators with two data directories (two hosts) cannot rotate one database at once:
    the database's rotation lock refuses the second before it touches a key file."""
    seed(data_dir, pg_database)
    with psycopg.connect(pg_database, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (PG_ROTATION_LOCK,))
        with pytest.raises(RotationError, match="another key rotation is running on postgresql://"):
            rotate(pg_database, data_dir, env={})
    assert list(data_dir.glob(OLD_KEY_FILE_PREFIX + "*")) == []
    assert set(key_ids_in(pg_database)) == {None}


def test_rotation_refuses_an_empty_database(data_dir: Path, pg_database: str) -> None:  # noqa: F811
    with pytest.raises(RotationError, match="not a switch store"):
        rotate(pg_database, data_dir, env={})
    assert list(data_dir.glob(OLD_KEY_FILE_PREFIX + "*")) == []


def test_cli_on_the_dsn_of_a_config(data_dir: Path, pg_database: str, tmp_path: Path,  # noqa: F811
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``switch keys ... --config FILE`` works on the database the file's [store] dsn names."""
    seed(data_dir, pg_database)
    cfg = tmp_path / "switch.toml"
    cfg.write_text(f'[switch]\ndata_dir = "{data_dir}"\n[store]\ndsn = "{pg_database}"\n', encoding="utf-8")
    zpk_hex = "A1B2C3D4E5F60718293A4B5C6D7E8F90"
    assert keys_cli.main(["set-zpk", "NEWBANK", "--config", str(cfg)], stdin=io.StringIO(zpk_hex)) == 0
    old = MasterKey.from_file(data_dir / KEY_FILE)
    assert keys_cli.main(["rotate-master", "--config", str(cfg)]) == 0
    new = MasterKey.from_file(data_dir / KEY_FILE)
    out = capsys.readouterr().out
    assert f"{old.key_id} -> {new.key_id}" in out and "journal.pan_enc" in out
    assert set(key_ids_in(pg_database)) == {new.key_id}
    store = open_store_for(pg_database, MasterKeyring.load({}, data_dir))
    try:
        assert store.load_zone_pin_keys()["NEWBANK"] == bytes.fromhex(zpk_hex)
    finally:
        store.close()
    assert keys_cli.main(["rewrap", "--config", str(cfg)]) == 0
    assert "re-wrapped     0" in capsys.readouterr().out
