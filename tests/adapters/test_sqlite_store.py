"""What only the SQLite store has: WAL mode, the v1 schema migrated, key columns and the database
files themselves free of clear keys, a group commit that waits for another connection's write lock
off the event loop, and failures of the connection itself.

Everything both stores must do (schema and reopen, refusals, round trips, PAN tokens, the
group-committing writer, RRN blocks, store-and-forward, settlement records) is the contract suite,
tests/adapters/test_store_contract.py, run on SQLite and on PostgreSQL.

Real SQLite files in ``tmp_path``; a second ``sqlite3`` connection is the independent witness.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing
from decimal import Decimal
from pathlib import Path

import anyio
import anyio.abc
import pytest

from switch.adapters.sqlite_store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    JournalEntry,
    SqliteStore,
    StoreError,
)
from switch.crypto.keystore import MasterKey
from switch.domain.model import Merchant, Terminal

MK = MasterKey.from_hex("00" * 32)

# protocol §14 test keys
TMK_1 = bytes.fromhex("E54E7BCB2078DE2AF51B9DA88AB5B395")
TMK_2 = bytes.fromhex("3E528141224F676C06FA50238B9C2907")
PIK = bytes.fromhex("1F2E3D4C5B6A79880123456789ABCDEF")
MAK = bytes.fromhex("A1B2C3D4E5F60718293A4B5C6D7E8F90")
TDK = bytes.fromhex("0F1E2D3C4B5A69788796A5B4C3D2E1F0")
ZPK = bytes.fromhex("C0FFEE00DEADBEEF0123456789ABCDEF")

M1 = "898310048990001"
M2 = "898310058120002"


def entry(i: int, **overrides: object) -> JournalEntry:
    e = JournalEntry(
        created_at="2025-03-01T10:00:00+08:00",
        business_date="20250301",
        tid="10000001",
        mid=M1,
        mti="0200",
        txn="consume",
        response_code="00",
        pcode="000000",
        stan=f"{i:06d}",
        batch="000001",
        amount_fen=100 + i,
        fee_fen=1,
        currency="156",
        pan_masked="622202*********1684",
    )
    for k, v in overrides.items():
        setattr(e, k, v)
    return e


def witness(path: Path) -> sqlite3.Connection:
    """An independent connection: sees only what was committed."""
    return sqlite3.connect(path, isolation_level=None)


def journal_stans(path: Path) -> list[str]:
    with closing(witness(path)) as db:
        return [r[0] for r in db.execute("SELECT stan FROM journal ORDER BY id")]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "switch.db"  # parent directory does not exist yet


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(db_path, MK)
    s.open()
    yield s
    s.close()


@asynccontextmanager
async def running_writer(store: SqliteStore) -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as tg:
        await tg.start(store.run_writer)
        yield tg
        tg.cancel_scope.cancel()


def add_fixture(store: SqliteStore) -> None:
    store.add_merchant(Merchant(M1, "micro", "老王便利店", fee_rate=Decimal("0.0038")))
    store.add_merchant(
        Merchant(M2, "enterprise", "星河超市", state="disabled", monthly_limit_fen=5_000_000_00,
                 params_version=3)
    )
    store.add_terminal(Terminal("10000001", M1, "main", None, "active", tmk=TMK_1))
    store.add_terminal(Terminal("10000002", M1, "secondary", "10000001", "active", tmk=TMK_2,
                                batch_no=7, params_version=2))
    store.add_terminal(
        Terminal("20000002", M2, "secondary", "20000001", "awaiting_activation"),
        activation_code="48213579",
        expires=1_900_000_000.0,
    )


# ---- lifecycle ------------------------------------------------------------------------------


V1_TABLES = {"meta", "merchants", "terminals", "journal", "issuer_keys"}


def test_open_creates_the_schema_in_wal_mode(db_path: Path) -> None:
    s = SqliteStore(db_path, MK)
    s.open()
    try:
        assert db_path.is_file()
        with closing(witness(db_path)) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            assert V1_TABLES <= tables
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        assert SCHEMA_VERSION >= 1
        assert meta["schema_version"] == str(SCHEMA_VERSION)
        assert meta["master_key_id"] == MK.key_id
        assert s.is_empty()
    finally:
        s.close()


def test_a_v1_database_is_migrated_to_the_current_schema_keeping_its_rows(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with closing(witness(db_path)) as db:  # a store as schema v1 left it
        for stmt in MIGRATIONS[0].split(";"):
            if stmt.strip():
                db.execute(stmt)
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        db.execute("INSERT INTO merchants VALUES (?, 'micro', 'v1 shop', 'active', '0.0060', 30000000, 1)",
                   (M1,))
        db.execute(
            "INSERT INTO journal (created_at, business_date, tid, mid, mti, txn, response_code, stan)"
            " VALUES ('2025-03-01T10:00:00+08:00', '20250301', '10000001', ?, '0200', 'consume', '00',"
            " '000001')", (M1,))
    s = SqliteStore(db_path, MK)
    s.open()
    try:
        assert s.load_merchants()[M1].shop_name == "v1 shop"
        assert [r["stan"] for r in s.journal()] == ["000001"]
        with closing(witness(db_path)) as db:
            version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        assert version == str(SCHEMA_VERSION)
    finally:
        s.close()


# ---- merchants, terminals, keys -------------------------------------------------------------


@pytest.mark.anyio
async def test_revoked_keys_are_stored_as_none(store: SqliteStore) -> None:
    add_fixture(store)
    t = store.load_terminals()["10000001"]
    t.key_mode, t.pik, t.mak = "001", PIK, MAK
    async with running_writer(store):
        await store.write(store.op_terminal_keys(t))
        assert store.load_terminals()["10000001"].signed_on
        t.revoke_keys()
        await store.write(store.op_terminal_keys(t))
    back = store.load_terminals()["10000001"]
    assert (back.key_mode, back.pik, back.mak, back.tdk) == (None, None, None, None)
    assert back.tmk == TMK_1


def _file_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


@pytest.mark.anyio
async def test_clear_keys_never_reach_the_database_files(db_path: Path) -> None:
    s = SqliteStore(db_path, MK)
    s.open()
    add_fixture(s)
    s.set_zone_pin_key("ICBC", ZPK)
    t = s.load_terminals()["10000001"]
    t.key_mode, t.pik, t.mak, t.tdk = "004", PIK, MAK, TDK
    async with running_writer(s):
        await s.write(s.op_terminal_keys(t))

    secrets = [TMK_1, TMK_2, PIK, MAK, TDK, ZPK]
    forms = [f for k in secrets for f in (k, k.hex().encode(), k.hex().upper().encode())]
    forms.append(b"48213579")  # the activation code is kept as a hash only

    while_open = _file_bytes(db_path.parent)  # the main file and the WAL
    s.close()
    after_close = _file_bytes(db_path.parent)
    for blob in (while_open, after_close):
        assert M1.encode() in blob  # the scan does see the stored rows
        for form in forms:
            assert form not in blob, form


# ---- the group-committing writer on SQLite ------------------------------------------------


@pytest.mark.anyio
async def test_a_write_waits_for_another_connections_lock_off_the_event_loop(store: SqliteStore) -> None:
    # a back-office command in another process holds the write lock: the group commit waits for
    # it on the commit thread (statements normally run on the event loop's thread, the COMMIT on
    # the commit thread), while the event loop keeps running; the write lands once it is free
    with closing(sqlite3.connect(store.path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        done = anyio.Event()

        async def write() -> None:
            await store.write(store.op_journal(entry(7)))
            done.set()

        async with running_writer(store), anyio.create_task_group() as tg:
            tg.start_soon(write)
            ticks = 0
            with anyio.fail_after(2):  # the loop is not blocked behind the lock
                for _ in range(20):
                    await anyio.sleep(0.01)
                    ticks += 1
            assert ticks == 20 and not done.is_set()
            other.execute("COMMIT")
            with anyio.fail_after(10):
                await done.wait()
    assert journal_stans(store.path) == ["000007"]


@pytest.mark.anyio
async def test_a_write_to_a_closed_store_fails_instead_of_hanging(db_path: Path) -> None:
    s = SqliteStore(db_path, MK)
    s.open()
    s.close()
    with anyio.fail_after(5), pytest.raises(StoreError):
        await s.write(s.op_journal(entry(1)))


def test_a_commit_whose_connection_fails_marks_every_write_failed(store: SqliteStore) -> None:
    # the transaction could not even start (a broken or closed connection): no write of the
    # batch may be reported durable
    from switch.adapters.sqlite_store import _Pending

    def broken(batch: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    store._commit_locked = broken  # type: ignore[method-assign,assignment]
    batch = [_Pending([store.op_journal(entry(i))]) for i in range(3)]
    store._commit(batch)
    assert all(isinstance(p.error, sqlite3.OperationalError) for p in batch)
