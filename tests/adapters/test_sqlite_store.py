"""The SQLite store (design.md, durability): schema v1 in WAL mode, refusal of a newer schema or
another master key, merchants/terminals/keys round trip with keys encrypted at rest, PAN tokens,
the group-committing writer (batching, durability before return, drain on shutdown, per-write
failure), and RRN blocks reserved durably.

Real SQLite files in ``tmp_path``; a second ``sqlite3`` connection is the independent witness.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing
from decimal import Decimal
from pathlib import Path

import anyio
import anyio.abc
import pytest

from switch.adapters.sqlite_store import (
    MIGRATIONS,
    RRN_BLOCK,
    SCHEMA_VERSION,
    JournalEntry,
    Op,
    SqliteStore,
    StoreError,
)
from switch.crypto.keystore import MasterKey
from switch.domain.model import Merchant, Terminal
from switch.ports import NullMetrics

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


class RecordingMetrics(NullMetrics):
    def __init__(self) -> None:
        self.commits: list[tuple[int, float]] = []

    def journal_commit(self, batch_size: int, seconds: float) -> None:
        self.commits.append((batch_size, seconds))


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


def test_reopen_keeps_data_and_does_not_migrate_again(db_path: Path) -> None:
    s = SqliteStore(db_path, MK)
    s.open()
    add_fixture(s)
    s.close()

    s2 = SqliteStore(db_path, MK)
    s2.open()
    try:
        assert not s2.is_empty()
        assert set(s2.load_merchants()) == {M1, M2}
        assert set(s2.load_terminals()) == {"10000001", "10000002", "20000002"}
        with closing(witness(db_path)) as db:
            version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        assert version == str(SCHEMA_VERSION)
    finally:
        s2.close()


def test_a_newer_schema_is_refused_naming_both_versions(db_path: Path) -> None:
    s = SqliteStore(db_path, MK)
    s.open()
    s.close()
    newer = SCHEMA_VERSION + 98
    with closing(witness(db_path)) as db:
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(newer),))

    s2 = SqliteStore(db_path, MK)
    with pytest.raises(StoreError) as info:
        s2.open()
    s2.close()
    msg = str(info.value)
    assert re.search(rf"\b{newer}\b", msg), msg
    assert re.search(rf"\b{SCHEMA_VERSION}\b", msg), msg
    with closing(witness(db_path)) as db:  # left as it was
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(newer)


@pytest.mark.parametrize("other", [MasterKey.from_hex("11" * 32), MasterKey(os.urandom(32))],
                         ids=["fixed", "generated"])
def test_another_master_key_is_refused(db_path: Path, other: MasterKey) -> None:
    s = SqliteStore(db_path, MK)
    s.open()
    add_fixture(s)
    s.close()

    wrong = SqliteStore(db_path, other)
    with pytest.raises(StoreError) as info:
        wrong.open()
    wrong.close()
    assert MK.key_id in str(info.value) and other.key_id in str(info.value)

    # the refusal changed nothing: the right key still opens it and unwraps the TMKs
    right = SqliteStore(db_path, MK)
    right.open()
    try:
        assert right.load_terminals()["10000001"].tmk == TMK_1
    finally:
        right.close()


def test_writable_false_before_open_and_after_close(db_path: Path) -> None:
    s = SqliteStore(db_path, MK)
    assert not s.writable()
    s.open()
    assert s.writable()
    s.close()
    assert not s.writable()
    with pytest.raises(StoreError):
        s.load_merchants()


# ---- merchants, terminals, keys -------------------------------------------------------------


@pytest.mark.anyio
async def test_merchants_terminals_and_keys_round_trip(db_path: Path) -> None:
    s = SqliteStore(db_path, MK)
    s.open()
    add_fixture(s)
    s.set_zone_pin_key("ICBC", ZPK)

    merchants = s.load_merchants()
    assert merchants[M1] == Merchant(M1, "micro", "老王便利店", fee_rate=Decimal("0.0038"))
    assert isinstance(merchants[M1].fee_rate, Decimal)
    assert merchants[M2] == Merchant(M2, "enterprise", "星河超市", state="disabled",
                                     monthly_limit_fen=5_000_000_00, params_version=3)

    t = s.load_terminals()
    assert t["10000001"].tmk == TMK_1 and not t["10000001"].signed_on
    assert (t["10000002"].tmk, t["10000002"].main_tid, t["10000002"].batch_no,
            t["10000002"].params_version) == (TMK_2, "10000001", 7, 2)
    assert t["20000002"].tmk is None and t["20000002"].state == "awaiting_activation"

    # a sign-on's working keys and a batch change go through the writer
    signed = t["10000001"]
    signed.key_mode, signed.pik, signed.mak, signed.tdk = "004", PIK, MAK, TDK
    signed.batch_no, signed.batch_date, signed.params_version = 2, "20250301", 1
    async with running_writer(s):
        await s.write(s.op_terminal_keys(signed), s.op_terminal_batch(signed))
    s.close()

    s2 = SqliteStore(db_path, MK)
    s2.open()
    try:
        back = s2.load_terminals()["10000001"]
        assert (back.key_mode, back.pik, back.mak, back.tdk) == ("004", PIK, MAK, TDK)
        assert back.tmk == TMK_1 and back.signed_on
        assert (back.batch_no, back.batch_date, back.params_version) == (2, "20250301", 1)
        assert s2.load_terminals()["10000002"].pik is None  # only its own row changed
        assert s2.load_zone_pin_keys() == {"ICBC": ZPK}
    finally:
        s2.close()


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


# ---- PAN tokens -----------------------------------------------------------------------------

DEMO_PANS = [
    "6222029375642931684",
    "6222028992986377539",
    "6222021007789355041",
    "6214834474520070",
    "6214831675710245",
    "4111237450925694",
]


def test_pan_token_is_stable_across_reopen_and_distinct_per_pan(db_path: Path) -> None:
    s = SqliteStore(db_path, MK)
    s.open()
    first = {pan: s.pan_token(pan) for pan in DEMO_PANS}
    assert all(s.pan_token(pan) == tok for pan, tok in first.items())  # deterministic
    s.close()

    s2 = SqliteStore(db_path, MK)
    s2.open()
    try:
        assert {pan: s2.pan_token(pan) for pan in DEMO_PANS} == first
    finally:
        s2.close()

    assert len(set(first.values())) == len(DEMO_PANS)
    for pan, tok in first.items():
        assert tok != pan
        assert pan not in tok and pan[-10:] not in tok
        assert re.fullmatch(r"[0-9a-f]{32}", tok)


# ---- the group-committing writer ------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_writes_share_commits(db_path: Path) -> None:
    metrics = RecordingMetrics()
    s = SqliteStore(db_path, MK, metrics)
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
        assert sorted(journal_stans(db_path)) == sorted(f"{i:06d}" for i in range(200))
        sizes = [n for n, _ in metrics.commits]
        assert sum(sizes) == 200
        assert len(sizes) < 200
        assert all(n >= 1 for n in sizes)
        assert all(sec >= 0 for _, sec in metrics.commits)
    finally:
        s.close()


@pytest.mark.anyio
async def test_a_write_returns_only_once_its_row_is_committed(store: SqliteStore) -> None:
    seen: list[int] = []
    with closing(witness(store.path)) as db:

        async def one(i: int) -> None:
            await store.write(store.op_journal(entry(i)))
            # no await between the return and the look: the row must already be committed
            row = db.execute("SELECT amount_fen FROM journal WHERE stan=?", (f"{i:06d}",)).fetchone()
            assert row == (100 + i,)
            seen.append(i)

        async with running_writer(store):
            for i in range(5):  # one by one
                await one(i)
            async with anyio.create_task_group() as tg:  # and concurrently
                for i in range(5, 60):
                    tg.start_soon(one, i)
    assert sorted(seen) == list(range(60))


@pytest.mark.anyio
async def test_journal_row_round_trips_every_column(store: SqliteStore) -> None:
    e = entry(
        42, rrn="000000001001", auth_code="123456", pan_token="ab" * 16, entry_mode="051",
        issuer="ICBC", issuer_stan="000777", issuer_f7="0301100000", issuer_response_code="00",
        needs_reversal=True, request_digest="d" * 64, latency_us=1234, issuer_latency_us=999,
        note="consume",
    )
    async with running_writer(store):
        await store.write(store.op_journal(e))
    (row,) = store.journal("stan=?", ["000042"])
    for col in JournalEntry.COLUMNS:
        want = getattr(e, col)
        assert row[col] == (int(want) if isinstance(want, bool) else want), col


@pytest.mark.anyio
async def test_cancelling_the_writer_commits_the_queued_writes(db_path: Path) -> None:
    metrics = RecordingMetrics()
    s = SqliteStore(db_path, MK, metrics)
    s.open()
    entered = threading.Event()
    release = threading.Event()

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
                await anyio.wait_all_tasks_blocked()  # all 50 queued behind the held commit
                assert done == []
                writer_tg.cancel_scope.cancel()  # shut down with 50 writes queued
                release.set()
            # the writer task has ended
            assert not s.writable()
            with pytest.raises(StoreError):
                await s.write(s.op_journal(entry(999)))
        assert sorted(done) == [-1, *range(50)]
        assert sorted(journal_stans(db_path)) == [f"{i:06d}" for i in range(50)]
        assert [n for n, _ in metrics.commits] == [1, 50]
    finally:
        release.set()
        s.close()


@pytest.mark.anyio
async def test_a_failing_op_fails_only_its_own_write(db_path: Path) -> None:
    metrics = RecordingMetrics()
    s = SqliteStore(db_path, MK, metrics)
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
            # NOT NULL response_code: SQLite refuses the row
            tg.start_soon(one, "constraint", s.op_journal(entry(100, response_code=None)))
            # a write is all or nothing: its first row must not survive its second op's failure
            tg.start_soon(one, "half", s.op_journal(entry(200)), boom)
            for i in range(10, 20):
                tg.start_soon(one, f"good{i}", s.op_journal(entry(i)))
            await anyio.wait_all_tasks_blocked()  # all 23 queued before the writer starts
            await tg.start(s.run_writer)
            with anyio.fail_after(30):
                await all_answered.wait()
            await s.write(s.op_journal(entry(300)))  # the writer goes on after the failures
            tg.cancel_scope.cancel()

        assert [n for n, _ in metrics.commits][0] == total  # they shared one batch
        for i in range(20):
            assert outcome[f"good{i}"] is None, i
        for name, cause in (("raises", RuntimeError), ("constraint", sqlite3.IntegrityError),
                            ("half", RuntimeError)):
            exc = outcome[name]
            assert isinstance(exc, StoreError), name
            assert isinstance(exc.__cause__, cause), name
        assert sorted(journal_stans(db_path)) == [f"{i:06d}" for i in [*range(20), 300]]
    finally:
        s.close()


# ---- RRN ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_rrns_are_12_digits_unique_and_increasing(store: SqliteStore) -> None:
    got: list[str] = []
    async with running_writer(store):
        for _ in range(2 * RRN_BLOCK + 5):  # crosses two block boundaries
            got.append(await store.next_rrn())
    assert all(re.fullmatch(r"\d{12}", r) for r in got)
    nums = [int(r) for r in got]
    assert all(a < b for a, b in zip(nums, nums[1:]))


@pytest.mark.anyio
async def test_concurrent_rrns_are_unique(store: SqliteStore) -> None:
    got: list[str] = []

    async def take() -> None:
        got.append(await store.next_rrn())

    async with running_writer(store):
        async with anyio.create_task_group() as tg:
            for _ in range(RRN_BLOCK + RRN_BLOCK // 2):  # all start on an exhausted block
                tg.start_soon(take)
    assert len(got) == RRN_BLOCK + RRN_BLOCK // 2
    assert len(set(got)) == len(got)
    assert all(re.fullmatch(r"\d{12}", r) for r in got)


@pytest.mark.anyio
async def test_rrns_stay_unique_across_reopen(db_path: Path) -> None:
    before: list[int] = []
    s = SqliteStore(db_path, MK)
    s.open()
    async with running_writer(s):
        for _ in range(3):
            before.append(int(await s.next_rrn()))
    s.close()  # most of the reserved block is never used

    after: list[int] = []
    s2 = SqliteStore(db_path, MK)
    s2.open()
    try:
        async with running_writer(s2):
            for _ in range(RRN_BLOCK + 3):
                after.append(int(await s2.next_rrn()))
    finally:
        s2.close()
    assert min(after) > max(before)
    assert len(set(before) | set(after)) == len(before) + len(after)


@pytest.mark.anyio
async def test_rrn_block_is_reserved_before_it_is_used(db_path: Path) -> None:
    """A second store opening the file while the first still holds a block (as after a kill -9:
    no close) never hands out a number from that block."""
    first = SqliteStore(db_path, MK)
    first.open()
    second = SqliteStore(db_path, MK)
    try:
        async with running_writer(first):
            a = [int(await first.next_rrn())]
        second.open()
        async with running_writer(second):
            b = [int(await second.next_rrn()) for _ in range(RRN_BLOCK + 5)]
        # the first store serves the rest of its block from memory (its writer has stopped)
        a += [int(await first.next_rrn()) for _ in range(RRN_BLOCK - 1)]
        with pytest.raises(StoreError):  # the next block would need a write
            await first.next_rrn()
    finally:
        second.close()
        first.close()
    assert len(set(a)) == RRN_BLOCK
    assert not set(a) & set(b)


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
