"""The store contract, run against both stores (issue 7): ``SqliteStore`` on a file in
``tmp_path`` and ``PostgresStore`` on a fresh database in a throwaway cluster (marked
``postgres``; skipped when the PostgreSQL binaries are missing).

Covered: schema and migrations (and that PostgreSQL has the same tables and columns), refusal of a
newer schema or another master key, merchants/terminals/keys round trip with no clear key in any
column, PAN tokens, the group-committing writer (shared commits, durable on return, drain on
cancel, a failing op fails only its own write), RRNs (unique, increasing, across reopen, two stores
on one database), journal rows, store-and-forward and intent ops, the SQLite->PostgreSQL
translator, ``open_store_for``, the decisions several processes share (activation wrong codes
counted atomically, the first settlement of a batch recorded once, each raced from several
connections at once), and a sign-on + consume + void + settlement through
``TransactionManager.handle`` over each store.

An independent connection (``Backend.rows``) is the witness of what was committed.
"""

from __future__ import annotations

import itertools
import os
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psycopg
import pytest

from switch.adapters.issuer_link import InMemoryIssuerLink
from switch.adapters.pg_store import PG_MIGRATIONS, PostgresStore, open_store_for, pg_ddl, translate
from switch.adapters.sqlite_store import (
    MIGRATIONS,
    RRN_BLOCK,
    SCHEMA_VERSION,
    JournalEntry,
    Op,
    SqliteStore,
    StoreError,
)
from switch.app import seed_demo
from switch.core.codec import Codec, Fields, FieldValue, load_dialect
from switch.crypto.keystore import KeyWrapper, MasterKey
from switch.crypto.working_keys import parse_f62
from switch.demo_fixture import TERMINALS_BY_TID
from switch.domain.cards import IssuerRoute, RoutingTable
from switch.domain.model import Merchant, Terminal
from switch.issuers.cards import demo_issuers
from switch.issuers.mock import mock_from_demo
from switch.pipeline.context import Settings, SwitchState
from switch.pipeline.manager import TransactionManager
from switch.pipeline.saf import IntentTakenOver, StoreAndForward
from switch.ports import IssuerUnavailable, Metrics, NullMetrics
from switch.pos.client import TerminalClient
from tests.adapters.pg_cluster import pg_cluster, pg_database  # noqa: F401  (fixtures)
from tests.manager_io import round_trip

MK = MasterKey.from_hex("00" * 32)
TMK_1 = bytes.fromhex("E54E7BCB2078DE2AF51B9DA88AB5B395")
TMK_2 = bytes.fromhex("3E528141224F676C06FA50238B9C2907")
PIK = bytes.fromhex("1F2E3D4C5B6A79880123456789ABCDEF")
MAK = bytes.fromhex("A1B2C3D4E5F60718293A4B5C6D7E8F90")
TDK = bytes.fromhex("0F1E2D3C4B5A69788796A5B4C3D2E1F0")
ZPK = bytes.fromhex("C0FFEE00DEADBEEF0123456789ABCDEF")
M1 = "898310048990001"
M2 = "898310058120002"
TABLES = {"meta", "merchants", "terminals", "journal", "issuer_keys", "saf_queue", "settlements",
          "batch_uploads", "payouts", "outbox", "intents", "portal_accounts", "portal_sessions",
          "activation_failures"}


class RecordingMetrics(NullMetrics):
    def __init__(self) -> None:
        self.commits: list[tuple[int, float]] = []

    def journal_commit(self, batch_size: int, seconds: float) -> None:
        self.commits.append((batch_size, seconds))


# ---- the two backends -------------------------------------------------------------------------
@dataclass
class Backend:
    name: str
    make: Callable[[KeyWrapper, Metrics | None], SqliteStore]  # a new, unopened store on the same db
    witness_rows: Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]
    integrity_error: type[BaseException]

    def store(self, key: KeyWrapper = MK, metrics: Metrics | None = None) -> SqliteStore:
        return self.make(key, metrics)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Through an independent connection (``?`` placeholders): sees only what was committed."""
        return self.witness_rows(sql, params)

    def columns(self) -> dict[str, list[str]]:
        if self.name == "sqlite":
            names = [r[0] for r in self.rows("SELECT name FROM sqlite_master WHERE type='table'")]
            return {n: [r[1] for r in self.rows(f"PRAGMA table_info({n})")] for n in names
                    if not n.startswith("sqlite_")}
        out: dict[str, list[str]] = {}
        for table, col in self.rows(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema='public'"
            " ORDER BY table_name, ordinal_position"
        ):
            out.setdefault(table, []).append(col)
        return out


def _sqlite_backend(path: Path) -> Backend:
    def rows(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(path, isolation_level=None)) as db:
            return [tuple(r) for r in db.execute(sql, params)]

    return Backend("sqlite", lambda k, m: SqliteStore(path, k, m), rows, sqlite3.IntegrityError)


def _pg_backend(dsn: str) -> Backend:
    def rows(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with psycopg.connect(dsn, autocommit=True) as db:
            cur = db.execute(sql.replace("?", "%s"), params)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []

    return Backend("postgres", lambda k, m: PostgresStore(dsn, k, m), rows, psycopg.IntegrityError)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return _sqlite_backend(tmp_path / "data" / "switch.db")
    return _pg_backend(request.getfixturevalue("pg_database"))


@pytest.fixture
def store(backend: Backend) -> Iterator[SqliteStore]:
    s = backend.store()
    s.open()
    yield s
    s.close()


@asynccontextmanager
async def running_writer(store: SqliteStore) -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as tg:
        await tg.start(store.run_writer)
        yield tg
        tg.cancel_scope.cancel()


def entry(i: int, **overrides: object) -> JournalEntry:
    e = JournalEntry(
        created_at="2025-03-01T10:00:00+08:00", business_date="20250301", tid="10000001", mid=M1,
        mti="0200", txn="consume", response_code="00", pcode="000000", stan=f"{i:06d}", batch="000001",
        amount_fen=100 + i, fee_fen=1, currency="156", pan_masked="622202*********1684",
    )
    for k, v in overrides.items():
        setattr(e, k, v)
    return e


def stans(backend: Backend) -> list[str]:
    return [r[0] for r in backend.rows("SELECT stan FROM journal ORDER BY id")]


def add_fixture(store: SqliteStore) -> None:
    store.add_merchant(Merchant(M1, "micro", "老王便利店", fee_rate=Decimal("0.0038")))
    store.add_merchant(Merchant(M2, "enterprise", "星河超市", state="disabled",
                                monthly_limit_fen=5_000_000_00, params_version=3))
    store.add_terminal(Terminal("10000001", M1, "main", None, "active", tmk=TMK_1))
    store.add_terminal(Terminal("10000002", M1, "secondary", "10000001", "active", tmk=TMK_2,
                                batch_no=7, params_version=2))
    store.add_terminal(Terminal("20000002", M2, "secondary", "20000001", "awaiting_activation"),
                       activation_code="48213579", expires=1_900_000_000.0)


# ---- the translator (no database) -----------------------------------------------------------
def test_translate_placeholders_outside_quotes_and_percent_escaped() -> None:
    assert translate("SELECT * FROM t WHERE a = ? AND b IN (?,?)") == \
        "SELECT * FROM t WHERE a = %s AND b IN (%s,%s)"
    assert translate("SELECT '?', \"a?\" FROM t WHERE x LIKE '50%' AND y = ?") == \
        "SELECT '?', \"a?\" FROM t WHERE x LIKE '50%%' AND y = %s"
    assert translate("SELECT 'it''s ?' WHERE z = ?") == "SELECT 'it''s ?' WHERE z = %s"


@pytest.mark.parametrize("sql", ["BEGIN IMMEDIATE", "  begin immediate ", "BEGIN", "BEGIN EXCLUSIVE;",
                                 "BEGIN DEFERRED TRANSACTION"])
def test_translate_begin(sql: str) -> None:
    assert translate(sql) == "BEGIN"


def test_translate_insert_or_replace_and_ignore() -> None:
    assert translate("INSERT OR REPLACE INTO meta(key, value) VALUES('heartbeat', ?)") == (
        "INSERT INTO meta (key, value) VALUES('heartbeat', %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value")
    assert translate("INSERT OR REPLACE INTO issuer_keys VALUES (?, ?)") == (
        "INSERT INTO issuer_keys VALUES (%s, %s) ON CONFLICT (issuer) DO UPDATE SET zpk = EXCLUDED.zpk")
    assert translate("INSERT OR REPLACE INTO settlements (tid, batch) VALUES (?, ?);") == (
        "INSERT INTO settlements (tid, batch) VALUES (%s, %s) ON CONFLICT (tid, batch) DO NOTHING")
    assert translate("INSERT OR IGNORE INTO meta(key, value) VALUES('change_seq', '0')") == (
        "INSERT INTO meta (key, value) VALUES('change_seq', '0') ON CONFLICT DO NOTHING")
    assert translate("INSERT INTO journal (a) VALUES (?)") == "INSERT INTO journal (a) VALUES (%s)"
    with pytest.raises(StoreError, match="nowhere"):
        translate("INSERT OR REPLACE INTO nowhere VALUES (?)")


def test_pg_ddl_types() -> None:
    ddl = pg_ddl("CREATE TABLE x (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER, b BLOB, r REAL, t TEXT)")
    assert ddl == "CREATE TABLE x (id BIGSERIAL PRIMARY KEY, n BIGINT, b BYTEA, r DOUBLE PRECISION, t TEXT)"
    assert len(PG_MIGRATIONS) == len(MIGRATIONS) == SCHEMA_VERSION
    assert not any(re.search(r"\b(BLOB|REAL|AUTOINCREMENT)\b", m) for m in PG_MIGRATIONS)


def test_open_store_for_picks_the_store_by_dsn(tmp_path: Path) -> None:
    for dsn in (str(tmp_path / "a.db"), f"sqlite://{tmp_path / 'b.db'}"):
        s = open_store_for(dsn, MK, None)
        try:
            assert type(s) is SqliteStore and s.writable()
        finally:
            s.close()
    assert (tmp_path / "a.db").is_file() and (tmp_path / "b.db").is_file()


@pytest.mark.postgres
def test_open_store_for_postgres(pg_database: str) -> None:
    s = open_store_for(pg_database, MK, None)
    try:
        assert isinstance(s, PostgresStore) and s.writable() and s.is_empty()
    finally:
        s.close()
    assert not s.writable()


# ---- lifecycle ------------------------------------------------------------------------------
def test_open_creates_the_schema(backend: Backend) -> None:
    s = backend.store()
    assert not s.writable()
    s.open()
    try:
        assert s.writable() and s.is_empty()
        assert TABLES <= set(backend.columns())
        meta = dict(backend.rows("SELECT key, value FROM meta"))
        assert meta["schema_version"] == str(SCHEMA_VERSION)
        assert meta["master_key_id"] == MK.key_id
    finally:
        s.close()
    assert not s.writable()
    with pytest.raises(StoreError):
        s.load_merchants()


@pytest.mark.postgres
def test_postgres_has_the_same_tables_and_columns_as_sqlite(pg_database: str, tmp_path: Path) -> None:
    sqlite_side, pg_side = _sqlite_backend(tmp_path / "s.db"), _pg_backend(pg_database)
    for b in (sqlite_side, pg_side):
        s = b.store()
        s.open()
        s.close()
    lite = {t: c for t, c in sqlite_side.columns().items()}
    assert pg_side.columns() == lite
    types = dict(pg_side.rows("SELECT column_name, data_type FROM information_schema.columns"
                              " WHERE table_name = 'terminals'"))
    assert (types["tmk"], types["batch_no"], types["activation_expires"]) == ("bytea", "bigint", "double precision")


def test_reopen_keeps_data_and_does_not_migrate_again(backend: Backend) -> None:
    s = backend.store()
    s.open()
    add_fixture(s)
    s.close()
    s2 = backend.store()
    s2.open()
    try:
        assert not s2.is_empty()
        assert set(s2.load_merchants()) == {M1, M2}
        assert set(s2.load_terminals()) == {"10000001", "10000002", "20000002"}
        assert backend.rows("SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    finally:
        s2.close()


def test_a_newer_schema_is_refused_naming_both_versions(backend: Backend) -> None:
    s = backend.store()
    s.open()
    s.close()
    newer = SCHEMA_VERSION + 98
    backend.rows("UPDATE meta SET value=? WHERE key='schema_version'", (str(newer),))
    s2 = backend.store()
    with pytest.raises(StoreError) as info:
        s2.open()
    s2.close()
    assert re.search(rf"\b{newer}\b", str(info.value)) and re.search(rf"\b{SCHEMA_VERSION}\b", str(info.value))
    assert backend.rows("SELECT value FROM meta WHERE key='schema_version'") == [(str(newer),)]


@pytest.mark.parametrize("other", [MasterKey.from_hex("11" * 32), MasterKey(os.urandom(32))],
                         ids=["fixed", "generated"])
def test_another_master_key_is_refused(backend: Backend, other: MasterKey) -> None:
    s = backend.store()
    s.open()
    add_fixture(s)
    s.close()
    wrong = backend.store(other)
    with pytest.raises(StoreError) as info:
        wrong.open()
    wrong.close()
    assert MK.key_id in str(info.value) and other.key_id in str(info.value)
    right = backend.store()
    right.open()
    try:
        assert right.load_terminals()["10000001"].tmk == TMK_1
    finally:
        right.close()


# ---- merchants, terminals, keys ---------------------------------------------------------------
@pytest.mark.anyio
async def test_merchants_terminals_and_keys_round_trip(backend: Backend) -> None:
    s = backend.store()
    s.open()
    add_fixture(s)
    s.set_zone_pin_key("ICBC", ZPK)
    s.set_zone_pin_key("ICBC", ZPK)  # replaced, not duplicated
    merchants = s.load_merchants()
    assert merchants[M1] == Merchant(M1, "micro", "老王便利店", fee_rate=Decimal("0.0038"))
    assert isinstance(merchants[M1].fee_rate, Decimal)
    assert merchants[M2] == Merchant(M2, "enterprise", "星河超市", state="disabled",
                                     monthly_limit_fen=5_000_000_00, params_version=3)
    assert set(s.load_merchants("state = ?", ["disabled"], reader=True)) == {M2}
    t = s.load_terminals()
    assert t["10000001"].tmk == TMK_1 and not t["10000001"].signed_on
    assert (t["10000002"].tmk, t["10000002"].main_tid, t["10000002"].batch_no,
            t["10000002"].params_version) == (TMK_2, "10000001", 7, 2)
    assert t["20000002"].tmk is None and t["20000002"].state == "awaiting_activation"
    signed = t["10000001"]
    signed.key_mode, signed.pik, signed.mak, signed.tdk = "004", PIK, MAK, TDK
    signed.batch_no, signed.batch_date, signed.params_version = 2, "20250301", 1
    async with running_writer(s):
        await s.write(s.op_terminal_keys(signed), s.op_terminal_batch(signed))
    s.close()

    s2 = backend.store()
    s2.open()
    try:
        back = s2.load_terminals()["10000001"]
        assert (back.key_mode, back.pik, back.mak, back.tdk) == ("004", PIK, MAK, TDK)
        assert back.tmk == TMK_1 and back.signed_on
        assert (back.batch_no, back.batch_date, back.params_version) == (2, "20250301", 1)
        assert s2.load_terminals()["10000002"].pik is None  # only its own row changed
        assert s2.load_zone_pin_keys() == {"ICBC": ZPK}
        assert set(s2.load_terminals("tid = ?", ["10000002"], reader=True)) == {"10000002"}
    finally:
        s2.close()


@pytest.mark.anyio
async def test_no_clear_key_in_any_column(store: SqliteStore, backend: Backend) -> None:
    add_fixture(store)
    store.set_zone_pin_key("ICBC", ZPK)
    t = store.load_terminals()["10000001"]
    t.key_mode, t.pik, t.mak, t.tdk = "004", PIK, MAK, TDK
    async with running_writer(store):
        await store.write(store.op_terminal_keys(t))
    secrets = [TMK_1, TMK_2, PIK, MAK, TDK, ZPK]
    forms = [f for k in secrets for f in (k, k.hex().encode(), k.hex().upper().encode())]
    forms.append(b"48213579")  # the activation code is kept as a hash only
    seen_blobs = 0
    for table in ("terminals", "issuer_keys", "meta", "merchants"):
        for row in backend.rows(f"SELECT * FROM {table}"):
            for v in row:
                raw = v if isinstance(v, bytes) else str(v).encode()
                seen_blobs += isinstance(v, bytes)
                for form in forms:
                    assert form not in raw, (table, form)
    assert seen_blobs == 2 + 3 + 1  # the scan did see the two wrapped TMKs, PIK/MAK/TDK and the ZPK


def test_pan_token_is_stable_across_reopen_and_distinct_per_pan(backend: Backend) -> None:
    pans = ["6222029375642931684", "6222028992986377539", "6222021007789355041", "6214834474520070",
            "6214831675710245", "4111237450925694"]
    s = backend.store()
    s.open()
    first = {pan: s.pan_token(pan) for pan in pans}
    assert all(s.pan_token(pan) == tok for pan, tok in first.items())  # deterministic
    s.close()
    s2 = backend.store()
    s2.open()
    try:
        assert {pan: s2.pan_token(pan) for pan in pans} == first
        assert s2.unwrap_pan(s2.wrap_pan(pans[0])) == pans[0]
    finally:
        s2.close()
    assert len(set(first.values())) == len(pans)
    assert all(re.fullmatch(r"[0-9a-f]{32}", tok) for tok in first.values())
    assert all(pan not in tok and pan[-10:] not in tok for pan, tok in first.items())


# ---- the group-committing writer ---------------------------------------------------------------
@pytest.mark.anyio
async def test_concurrent_writes_share_commits(backend: Backend) -> None:
    metrics = RecordingMetrics()
    s = backend.store(MK, metrics)
    s.open()
    returned: list[int] = []

    async def one(i: int) -> None:
        await s.write(s.op_journal(entry(i)))
        returned.append(i)

    try:
        async with running_writer(s):
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(one, i)
        assert sorted(returned) == list(range(200))
        assert sorted(stans(backend)) == sorted(f"{i:06d}" for i in range(200))
        sizes = [n for n, _ in metrics.commits]
        assert sum(sizes) == 200 and len(sizes) < 200
    finally:
        s.close()


@pytest.mark.anyio
async def test_a_write_is_visible_to_others_once_it_returns(store: SqliteStore, backend: Backend) -> None:
    seen: list[int] = []

    async def one(i: int) -> None:
        await store.write(store.op_journal(entry(i)))
        assert backend.rows("SELECT amount_fen FROM journal WHERE stan=?", (f"{i:06d}",)) == [(100 + i,)]
        assert store.query("SELECT amount_fen FROM journal WHERE stan=?", (f"{i:06d}",)) == [{"amount_fen": 100 + i}]
        seen.append(i)

    async with running_writer(store):
        for i in range(3):
            await one(i)
        async with anyio.create_task_group() as tg:
            for i in range(3, 30):
                tg.start_soon(one, i)
    assert sorted(seen) == list(range(30))


@pytest.mark.anyio
async def test_journal_row_round_trips_every_column(store: SqliteStore) -> None:
    e = entry(42, rrn="000000001001", auth_code="123456", pan_token="ab" * 16, entry_mode="051",
              issuer="ICBC", issuer_stan="000777", issuer_f7="0301100000", issuer_response_code="00",
              needs_reversal=True, request_digest="d" * 64, latency_us=1234, issuer_latency_us=999,
              note="consume", dup_key="10000001|000001|000042|0200", state="approved",
              response_blob=b"\x00\x01resp", pan_enc=store.wrap_pan("6222029375642931684"), legs="[]")
    async with running_writer(store):
        await store.write(store.op_journal(e))
    (row,) = store.journal("stan=?", ["000042"])
    for col in JournalEntry.COLUMNS:
        want = getattr(e, col)
        assert row[col] == (int(want) if isinstance(want, bool) else want), col
    assert isinstance(row["id"], int)
    # aggregate types as the pipeline reads them: ints, not Decimals
    agg = store.query("SELECT COUNT(*) AS n, COALESCE(SUM(amount_fen), 0) AS total,"
                      " substr(business_date, 1, 6) AS month FROM journal GROUP BY month")
    assert agg == [{"n": 1, "total": 142, "month": "202503"}]
    assert type(agg[0]["total"]) is int


@pytest.mark.anyio
async def test_cancelling_the_writer_commits_the_queued_writes(backend: Backend) -> None:
    metrics = RecordingMetrics()
    s = backend.store(MK, metrics)
    s.open()
    entered, release = threading.Event(), threading.Event()

    def hold(db: sqlite3.Connection) -> None:  # keeps the writer busy inside a commit
        entered.set()
        assert release.wait(30)

    done: list[int] = []

    async def one(i: int, *ops: Op) -> None:
        await s.write(*ops)
        done.append(i)

    try:
        async with anyio.create_task_group() as outer:
            async with anyio.create_task_group() as writer_tg:
                await writer_tg.start(s.run_writer)
                outer.start_soon(one, -1, hold)
                assert await anyio.to_thread.run_sync(entered.wait, 30)
                for i in range(50):
                    outer.start_soon(one, i, s.op_journal(entry(i)))
                await anyio.wait_all_tasks_blocked()
                assert done == []
                writer_tg.cancel_scope.cancel()
                release.set()
            assert not s.writable()
            with pytest.raises(StoreError):
                await s.write(s.op_journal(entry(999)))
        assert sorted(done) == [-1, *range(50)]
        assert sorted(stans(backend)) == [f"{i:06d}" for i in range(50)]
        assert [n for n, _ in metrics.commits] == [1, 50]
    finally:
        release.set()
        s.close()


@pytest.mark.anyio
async def test_a_failing_op_fails_only_its_own_write(backend: Backend) -> None:
    metrics = RecordingMetrics()
    s = backend.store(MK, metrics)
    s.open()

    def boom(db: sqlite3.Connection) -> None:
        raise RuntimeError("boom")

    outcome: dict[str, BaseException | None] = {}
    all_answered = anyio.Event()
    total = 23

    async def one(name: str, *ops: Op) -> None:
        try:
            await s.write(*ops)
        except StoreError as exc:
            outcome[name] = exc
        else:
            outcome[name] = None
        if len(outcome) == total:
            all_answered.set()

    try:
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, f"good{i}", s.op_journal(entry(i)))
            tg.start_soon(one, "raises", boom)
            tg.start_soon(one, "constraint", s.op_journal(entry(100, response_code=None)))
            tg.start_soon(one, "half", s.op_journal(entry(200)), boom)
            for i in range(10, 20):
                tg.start_soon(one, f"good{i}", s.op_journal(entry(i)))
            await anyio.wait_all_tasks_blocked()
            await tg.start(s.run_writer)
            with anyio.fail_after(30):
                await all_answered.wait()
            await s.write(s.op_journal(entry(300)))
            tg.cancel_scope.cancel()
        assert [n for n, _ in metrics.commits][0] == total
        for i in range(20):
            assert outcome[f"good{i}"] is None, i
        for name, cause in (("raises", RuntimeError), ("constraint", backend.integrity_error),
                            ("half", RuntimeError)):
            exc = outcome[name]
            assert isinstance(exc, StoreError), name
            assert isinstance(exc.__cause__, cause), name
        assert sorted(stans(backend)) == [f"{i:06d}" for i in [*range(20), 300]]
    finally:
        s.close()


# ---- RRN ------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_rrns_unique_and_increasing_across_blocks_and_reopen(backend: Backend) -> None:
    got: list[int] = []
    s = backend.store()
    s.open()
    async with running_writer(s):
        for _ in range(2 * RRN_BLOCK + 5):  # crosses two block boundaries
            r = await s.next_rrn()
            assert re.fullmatch(r"\d{12}", r)
            got.append(int(r))
    s.close()  # most of the second block is never used
    s2 = backend.store()
    s2.open()
    try:
        async with running_writer(s2):
            got += [int(await s2.next_rrn()) for _ in range(3)]
    finally:
        s2.close()
    assert all(a < b for a, b in zip(got, got[1:]))


@pytest.mark.anyio
async def test_concurrent_rrns_are_unique(store: SqliteStore) -> None:
    got: list[str] = []

    async def take() -> None:
        got.append(await store.next_rrn())

    async with running_writer(store):
        async with anyio.create_task_group() as tg:
            for _ in range(RRN_BLOCK + RRN_BLOCK // 2):
                tg.start_soon(take)
    assert len(set(got)) == len(got) == RRN_BLOCK + RRN_BLOCK // 2


@pytest.mark.anyio
async def test_two_stores_on_one_database_never_share_an_rrn(backend: Backend) -> None:
    """As two switch processes would: each reserves blocks; no number is handed out twice, and a
    block is reserved (durably) before its first number is used."""
    first, second = backend.store(), backend.store()
    first.open()
    second.open()
    try:
        a: list[int] = []
        b: list[int] = []

        async def take(s: SqliteStore, into: list[int], n: int) -> None:
            for _ in range(n):
                into.append(int(await s.next_rrn()))

        async with running_writer(first), running_writer(second):
            async with anyio.create_task_group() as tg:
                tg.start_soon(take, first, a, RRN_BLOCK * 2 + 7)
                tg.start_soon(take, second, b, RRN_BLOCK * 2 + 7)
        # the rest of the current block is served from memory; the next one needs the writer
        left = (-len(a)) % RRN_BLOCK
        await take(first, a, left)
        with pytest.raises(StoreError):
            await first.next_rrn()
    finally:
        second.close()
        first.close()
    assert len(set(a)) == len(a) and len(set(b)) == len(b)
    assert not set(a) & set(b)


# ---- store-and-forward and intents (switch/pipeline/saf.py) ------------------------------------
class FlakyLink:
    """Refuses the first ``down`` sends, then answers 00; records what it was sent."""

    def __init__(self, down: int) -> None:
        self.name = "ICBC"
        self.down = down
        self.sent: list[tuple[str, Fields]] = []

    @property
    def is_up(self) -> bool:
        return self.down == 0

    async def wait_up(self, timeout: float) -> bool:
        return self.is_up

    def stamp(self, fields: Fields) -> None:
        pass

    async def send(self, mti: str, fields: Fields, timeout: float) -> tuple[str, Fields]:
        if self.down > 0:
            self.down -= 1
            raise IssuerUnavailable("down")
        self.sent.append((mti, dict(fields)))
        return "0410", {39: "00"}


@pytest.mark.anyio
async def test_store_and_forward_queue_and_intents(store: SqliteStore, backend: Backend) -> None:
    clock = itertools.count(1_000, 10).__next__
    link = FlakyLink(down=1)
    saf = StoreAndForward(store, {"ICBC": link}, NullMetrics(), base_delay=5.0, clock=lambda: float(clock()))
    reversal: Fields = {2: "6222029375642931684", 4: "000000000100", 11: "000001", 90: "0" * 42}
    async with running_writer(store):
        await store.write(saf.op_intent("k1", "ICBC", reversal), saf.op_intent("k2", "ICBC", reversal))
        await store.write(saf.op_clear_intent("k1"))
        assert [r[0] for r in backend.rows("SELECT key FROM intents")] == ["k2"]
        await store.write(saf.op_promote_intents(["k2"]))  # a crash left k2: reverse it
        await store.write(saf.op_enqueue("ICBC", "advice", "0220", {4: "000000000200", 11: "000002"}, None))
        assert backend.rows("SELECT key FROM intents") == []
        assert backend.rows("SELECT kind, mti, state, attempts FROM saf_queue ORDER BY id") == [
            ("reversal", "0400", "pending", 0), ("advice", "0220", "pending", 0)]
        assert b"6222029375642931684" not in b"".join(r[0] for r in backend.rows("SELECT fields FROM saf_queue"))
        await saf.deliver_due()  # the link is down for the first: it is retried later
        assert backend.rows("SELECT state, attempts, last_response FROM saf_queue ORDER BY id") == [
            ("pending", 1, "unavailable"), ("done", 1, "00")]
        await saf.deliver_due()  # not due yet (base_delay 5 s on a clock that moves 10 s a call)
        await saf.deliver_due()
    assert [r[0] for r in backend.rows("SELECT state FROM saf_queue ORDER BY id")] == ["done", "done"]
    assert sorted(m for m, _ in link.sent) == ["0220", "0401"]  # the reversal's repeat is 0401


@pytest.mark.anyio
async def test_an_orphan_sweep_takes_only_old_intents_and_their_owner_cannot_journal_after_it(
    store: SqliteStore, backend: Backend
) -> None:
    """Several processes on one database: a sweep reverses intents old enough to be nobody's,
    never a younger one (another process's request in flight); a request whose intent a sweep
    took refuses its journal commit instead of recording an approval that is being reversed."""
    now = [1_000.0]
    saf = StoreAndForward(store, {}, NullMetrics(), clock=lambda: now[0])
    reversal: Fields = {2: "6222029375642931684", 4: "000000000100", 11: "000001", 90: "0" * 42}
    async with running_writer(store):
        await store.write(saf.op_intent("old", "ICBC", reversal))
        now[0] = 1_100.0
        await store.write(saf.op_intent("young", "ICBC", reversal))
        await store.write(saf.op_promote_intents(older_than=1_050.0))
        assert [r[0] for r in backend.rows("SELECT key FROM intents")] == ["young"]
        assert backend.rows("SELECT kind, mti FROM saf_queue") == [("reversal", "0400")]
        with pytest.raises(StoreError) as failed:  # the owner of "old" comes back to journal it
            await store.write(saf.op_clear_intent("old"), store.op_journal(entry(900)))
        assert isinstance(failed.value.__cause__, IntentTakenOver)
        assert 900 not in [int(s) for s in stans(backend)]
        await store.write(saf.op_clear_intent("young"), store.op_journal(entry(901)))  # its owner, in time
    assert backend.rows("SELECT key FROM intents") == []
    assert backend.rows("SELECT COUNT(*) FROM saf_queue") == [(1,)]


# ---- the pipeline over each store ---------------------------------------------------------------
CARD = "6222029375642931684"  # ICBC


async def _exchange(manager: TransactionManager, client: TerminalClient, mti: str,
                    fields: dict[int, FieldValue], *, mac: bool) -> tuple[str, Fields]:
    raw, _ = client.build_frame(mti, fields, mac=mac)
    return await round_trip(manager, raw)


@pytest.mark.anyio
async def test_sign_on_consume_void_settlement_through_the_pipeline(store: SqliteStore) -> None:
    seed_demo(store)  # BEGIN IMMEDIATE ... COMMIT through store.db
    fixture = demo_issuers()
    links = {name: InMemoryIssuerLink(name, mock_from_demo(d)) for name, d in fixture.items()}
    for name, d in fixture.items():
        links[name].up = d.listens
    state = SwitchState(
        codec=Codec(load_dialect("terminal")), issuer_codec=Codec(load_dialect("issuer")),
        terminals=store.load_terminals(), merchants=store.load_merchants(),
        routes=RoutingTable([IssuerRoute(p, name) for name, d in fixture.items() for p in d.prefixes]),
        links=dict(links), zone_pin_keys=store.load_zone_pin_keys(), metrics=NullMetrics(),
        settings=Settings(issuer_timeout=0.5),
    )
    state.limits.load(store)
    manager = TransactionManager(state, store)
    demo = TERMINALS_BY_TID["10000001"]
    assert demo.tmk_hex is not None
    tmk = bytes.fromhex(demo.tmk_hex)
    t = TerminalClient("127.0.0.1", 1, demo.tid, demo.mid, tmk)
    t.next_stan = 1
    async with running_writer(store):
        mti, f = await _exchange(manager, t, "0800", {11: t.take_stan(), 41: t.tid, 42: t.mid, 60: "00000000003"},
                                 mac=False)
        assert (mti, f[39]) == ("0810", "00")
        f62 = f[62]
        assert isinstance(f62, bytes)
        t.keys, t.key_mode, t.batch = parse_f62(tmk, "003", f62), "003", str(f[60])[2:8]
        mti, f = await _exchange(manager, t, "0800", {11: t.take_stan(), 41: t.tid, 42: t.mid,
                                                      60: f"00{t.batch}360"}, mac=False)
        assert f[39] == "00"

        def card(pcode: str, type_code: str, amount: int) -> dict[int, FieldValue]:
            return dict(t.card_fields(processing_code=pcode, type_code=type_code, card=CARD, amount_fen=amount,
                                      pin="123456", expiry="3012"))

        mti, a = await _exchange(manager, t, "0200", card("000000", "22", 12_345), mac=True)
        assert (mti, a[39]) == ("0210", "00")
        mti, b = await _exchange(manager, t, "0200", card("000000", "22", 100), mac=True)
        assert b[39] == "00"
        v = card("200000", "23", 100)
        v[37], v[61] = b[37], str(b[60])[2:8] + str(b[11])
        mti, void = await _exchange(manager, t, "0200", v, mac=True)
        assert (mti, void[39]) == ("0210", "00")
        f48 = f"{12_445:012d}{2:03d}{100:012d}{1:03d}0" + "0" * 31
        mti, settled = await _exchange(manager, t, "0500", {11: t.take_stan(), 41: t.tid, 42: t.mid, 48: f48,
                                                            49: "156", 60: f"00{t.batch}201"}, mac=False)
        assert (mti, settled[39]) == ("0510", "00")
        assert str(settled[48])[:31] == "000000012445002000000000100001" + "1"  # balanced
    rows = store.journal()
    assert [(r["txn"], r["response_code"]) for r in rows if r["mti"] != "0800"][-4:] == [
        ("consume", "00"), ("consume", "00"), ("consume_void", "00"), ("batch_settlement", "00")]
    states = {r["stan"]: r["state"] for r in rows if r["txn"] == "consume"}
    assert states[str(b[11])] == "voided" and states[str(a[11])] == "approved"
    assert all(CARD not in str(v) for r in rows for v in r.values())  # only masked/tokenised PANs
    assert store.query("SELECT result FROM settlements WHERE tid = ?", (t.tid,)) != []
    assert store.load_terminals()["10000001"].batch_no == 2


# ---- decisions several processes share (schema v9) ------------------------------------------
RACERS = 8


def _race(backend: Backend, work: Callable[[SqliteStore, int], Any]) -> list[Any]:
    """``work(store_i, i)`` on RACERS threads at once, each with its own store (its own database
    connection, as separate processes would have), released together by a barrier."""
    stores = [backend.store() for _ in range(RACERS)]
    for s in stores:
        s.open()
    barrier = threading.Barrier(RACERS)
    results: list[Any] = [None] * RACERS
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = work(stores[i], i)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(RACERS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a racer did not finish"
    finally:
        for s in stores:
            s.close()
    assert not errors, errors
    return results


def test_a_v8_store_is_migrated_to_the_current_version_keeping_its_data(backend: Backend) -> None:
    s = backend.store()
    s.open()
    add_fixture(s)
    s.close()
    backend.rows("DROP TABLE activation_failures")  # as a version 8 store has it
    backend.rows("DROP INDEX journal_mid_batch_stan")
    backend.rows("DROP INDEX saf_origin")
    backend.rows("ALTER TABLE saf_queue DROP COLUMN origin")
    backend.rows("ALTER TABLE intents DROP COLUMN origin")
    backend.rows("UPDATE meta SET value = '8' WHERE key = 'schema_version'")
    s2 = backend.store()
    s2.open()
    try:
        assert backend.rows("SELECT value FROM meta WHERE key='schema_version'") == [("11",)]
        assert set(s2.load_terminals()) == {"10000001", "10000002", "20000002"}
        assert s2.add_activation_failure("192.0.2.1", 1000.0, 400.0, 5)  # v9
        assert s2.activation_failures_since("192.0.2.1", 400.0) == 1
        index = ("SELECT name FROM sqlite_master WHERE type='index' AND name=?" if backend.name == "sqlite"
                 else "SELECT indexname FROM pg_indexes WHERE indexname=?")
        assert backend.rows(index, ("journal_mid_batch_stan",)) == [("journal_mid_batch_stan",)]  # v10
        assert backend.rows(index, ("saf_origin",)) == [("saf_origin",)]  # v11
        assert backend.rows("SELECT origin FROM intents") == backend.rows("SELECT origin FROM saf_queue") == []
    finally:
        s2.close()


def test_activation_failures_are_counted_per_peer_up_to_the_limit_in_a_window(store: SqliteStore,
                                                                               backend: Backend) -> None:
    peer, other = "192.0.2.7", "198.51.100.9"
    assert [store.add_activation_failure(peer, 1000.0 + i, 400.0 + i, 5) for i in range(6)] == [True] * 5 + [False]
    assert store.activation_failures_since(peer, 400.0) == 5  # the refused one was not counted
    assert store.activation_failures_since(other, 0.0) == 0
    assert store.add_activation_failure(other, 1006.0, 406.0, 5)
    # the window slides: at 1601 the wrong code of 1000 is out of it, so one more is counted
    assert store.activation_failures_since(peer, 1001.0) == 4
    assert store.add_activation_failure(peer, 1601.0, 1001.0, 5)
    assert not store.add_activation_failure(peer, 1601.0, 1001.0, 5)  # 1001..1004 and 1601: five again
    assert store.activation_failures_since(peer, 1001.0) == 5
    # a late wrong code sweeps every peer's expired rows, not only its own
    assert store.add_activation_failure("203.0.113.5", 5000.0, 4400.0, 5)
    assert backend.rows("SELECT peer FROM activation_failures") == [("203.0.113.5",)]


def test_two_connections_never_count_past_the_activation_limit(backend: Backend) -> None:
    """RACERS connections record a wrong code for the same peer at the same moment, three
    rounds: exactly five are counted each round (fails when the count and the insert are not one
    atomic step: several racers then read four and all insert)."""
    for round_ in range(3):
        peer = f"192.0.2.{round_ + 10}"
        got = _race(backend, lambda s, i: s.add_activation_failure(peer, 1000.0 + i / 100, 400.0, 5))
        assert sorted(got) == [False] * (RACERS - 5) + [True] * 5, (round_, got)
        assert backend.rows("SELECT COUNT(*) FROM activation_failures WHERE peer = ?", (peer,)) == [(5,)]


def test_record_settlement_keeps_the_first_answer(store: SqliteStore, backend: Backend) -> None:
    first = store.record_settlement("10000001", "000001", "20250301", "A" * 62, "B" * 62, "2", "t1")
    assert first == {"request_f48": "A" * 62, "response_f48": "B" * 62, "result": "2"}
    again = store.record_settlement("10000001", "000001", "20250301", "C" * 62, "C" * 62, "1", "t2")
    assert again == first
    other = store.record_settlement("10000001", "000002", "20250301", "C" * 62, "C" * 62, "1", "t3")
    assert other["response_f48"] == "C" * 62
    assert backend.rows("SELECT batch, response_f48, created_at FROM settlements ORDER BY batch") == [
        ("000001", "B" * 62, "t1"), ("000002", "C" * 62, "t3")]


def test_two_connections_settling_one_batch_get_one_answer(backend: Backend) -> None:
    """RACERS connections record different answers for the same batch at once: one row, and every
    racer is told that row's answer (fails with an integrity error, or with differing answers,
    when the insert and the read back are not one atomic step)."""
    got = _race(backend, lambda s, i: s.record_settlement(
        "10000001", "000003", "20250301", f"{i:062d}", f"{i:062d}", "1", f"t{i}"))
    assert len({g["response_f48"] for g in got}) == 1
    rows = backend.rows("SELECT response_f48 FROM settlements WHERE tid = '10000001' AND batch = '000003'")
    assert rows == [(got[0]["response_f48"],)]
