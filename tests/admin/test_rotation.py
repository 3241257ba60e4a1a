"""Master-key rotation (switch/admin/rotation.py, switch keys ...) over a real SQLite store seeded
with ``switch.app.seed_demo`` plus working keys, merchant secrets, journal rows (PAN, response
frame, transfer legs), store-and-forward rows and intents, all wrapped by a bare MasterKey (v1),
as stores are today.

After a rotation: every blob in the database is v2 under the new key, the old key file is kept
(0600), the raw database file holds no clear key or secret, the store reopens with the new key +
old files (and, when nothing was written meanwhile, with the new key alone), PAN tokens are
unchanged, and a store opened BEFORE the rotation (with a keyring from the data directory) still
unwraps everything — also while its writer commits journal rows during the rotation; a later
``rewrap`` moves what it wrote under the old key. Refusals: keys from the environment, the wrong
data directory, a concurrent rotation, no store, a blob that does not unwrap."""

from __future__ import annotations

import fcntl
import io
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from switch.adapters.sqlite_store import JournalEntry, SqliteStore
from switch.admin import keys_cli
from switch.admin.rotation import LOCK_FILE, RotationError, rewrap, rotate
from switch.app import seed_demo
from switch.crypto.keystore import (
    ENV_VAR,
    KEY_FILE,
    OLD_ENV_VAR,
    OLD_KEY_FILE_PREFIX,
    MasterKey,
    MasterKeyring,
    blob_key_id,
)
from switch.demo_fixture import TERMINALS
from switch.domain.model import Terminal
from switch.issuers.cards import demo_issuers

PAN = "6222021234567890123"
PAN_CREDIT = "6225881234567890"
ID_CARD = "11010519491231002X"
ACCOUNT = "6222020200112233445"
WEBHOOK_SECRET = b"whsec-0123456789abcdef-secret"
PIK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
MAK = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
TDK = bytes.fromhex("13579BDF02468ACE0F1E2D3C4B5A6978")
RESPONSE = b"\x00\x60RESPONSE-FRAME-WITH-" + PAN.encode()
SAF_FIELDS = b"SAF-FIELDS-" + PAN.encode()
INTENT_FIELDS = b"INTENT-FIELDS-" + PAN.encode()
JOURNAL_ROWS = 150
MID = "898310048990001"
TID = "10000001"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv(OLD_ENV_VAR, raising=False)
    data = tmp_path / "data"
    data.mkdir()
    MasterKey.create_file(data / KEY_FILE)
    return data


def db_path(data: Path) -> Path:
    return data / "switch.db"


def entry(n: int, store: SqliteStore, *, legs: bool = False) -> JournalEntry:
    dup_key = f"{TID}|000001|{n:06d}|0200"
    return JournalEntry(
        created_at="2024-03-01T02:00:00+00:00", business_date="20240301", tid=TID, mid=MID,
        mti="0200", txn="transfer" if legs else "consume", response_code="00", stan=f"{n:06d}",
        batch="000001", rrn=f"{n:012d}", amount_fen=100 * n, pan_masked="622202*********0123",
        pan_token=store.pan_token(PAN), dup_key=dup_key,
        response_blob=store.wrap_response(RESPONSE, dup_key), pan_enc=store.wrap_pan(PAN),
        legs=json.dumps([
            {"leg": "debit", "issuer": "ICBC", "mti": "0200", "stan": "1", "f7": "0301020000",
             "rc": "00", "pan_enc": store.wrap_pan(PAN).hex()},
            {"leg": "credit", "issuer": "CMB", "mti": "0200", "stan": "2", "f7": "0301020000",
             "rc": "00", "pan_enc": store.wrap_pan(PAN_CREDIT).hex()},
        ]) if legs else None,
    )


def seed(data: Path) -> str:
    """The demo fixture and one of every wrapped thing, under a bare MasterKey (v1 blobs), as a
    store looks before this change. Returns the PAN token of PAN."""
    store = SqliteStore(db_path(data), MasterKey.from_file(data / KEY_FILE))
    store.open()
    try:
        return seed_into(store)
    finally:
        store.close()


def seed_into(store: SqliteStore) -> str:
    """``seed``'s rows in an open store (SQLite or PostgreSQL); the PAN token of PAN."""
    seed_demo(store)
    db = store.db
    db.execute("BEGIN IMMEDIATE")
    store.op_terminal_keys(Terminal(TID, MID, "main", None, "active", key_mode="003",
                                    pik=PIK, mak=MAK, tdk=TDK))(db)
    db.execute(
        "UPDATE merchants SET id_card_enc=?, bank_account_enc=?, webhook_secret_enc=? WHERE mid=?",
        (store.master_key.wrap(ID_CARD.encode(), f"id_card:{MID}"),
         store.master_key.wrap(ACCOUNT.encode(), f"account:{MID}"),
         store.master_key.wrap(WEBHOOK_SECRET, f"webhook:{MID}"), MID),
    )
    for n in range(1, JOURNAL_ROWS + 1):
        store.op_journal(entry(n, store, legs=n % 10 == 0))(db)
    for n in range(5):
        db.execute(
            "INSERT INTO saf_queue (issuer, kind, mti, fields, created_at, next_attempt)"
            " VALUES ('ICBC', 'reversal', '0400', ?, 0, 0)",
            (store.master_key.wrap(SAF_FIELDS, "saf:ICBC"),),
        )
    db.execute("INSERT INTO intents (key, issuer, fields, created_at) VALUES ('k1', 'CMB', ?, 0)",
               (store.master_key.wrap(INTENT_FIELDS, "saf:CMB"),))
    db.execute("COMMIT")
    return store.pan_token(PAN)


def check_readable(store: SqliteStore, token: str, journal_rows: int = JOURNAL_ROWS) -> None:
    """Every wrapped thing in the store unwraps to what was written."""
    terminals = store.load_terminals()
    for t in TERMINALS:
        assert terminals[t.tid].tmk == (bytes.fromhex(t.tmk_hex) if t.tmk_hex else None)
    assert (terminals[TID].pik, terminals[TID].mak, terminals[TID].tdk) == (PIK, MAK, TDK)
    assert store.load_zone_pin_keys() == {i.issuer_id: i.zpk for i in demo_issuers().values()}
    m = store.query("SELECT id_card_enc, bank_account_enc, webhook_secret_enc FROM merchants WHERE mid=?", (MID,))[0]
    assert store.master_key.unwrap(m["id_card_enc"], f"id_card:{MID}") == ID_CARD.encode()
    assert store.master_key.unwrap(m["bank_account_enc"], f"account:{MID}") == ACCOUNT.encode()
    assert store.master_key.unwrap(m["webhook_secret_enc"], f"webhook:{MID}") == WEBHOOK_SECRET
    rows = store.query("SELECT dup_key, response_blob, pan_enc, legs FROM journal")
    assert len(rows) == journal_rows
    for row in rows:
        assert store.unwrap_pan(row["pan_enc"]) == PAN
        assert store.unwrap_response(row["response_blob"], row["dup_key"]) == RESPONSE
        if row["legs"]:
            legs = json.loads(row["legs"])
            assert [store.unwrap_pan(bytes.fromhex(leg["pan_enc"])) for leg in legs] == [PAN, PAN_CREDIT]
    saf = store.query("SELECT fields FROM saf_queue")
    assert [store.master_key.unwrap(r["fields"], "saf:ICBC") for r in saf] == [SAF_FIELDS] * 5
    intent = store.query("SELECT fields FROM intents")
    assert [store.master_key.unwrap(r["fields"], "saf:CMB") for r in intent] == [INTENT_FIELDS]
    assert store.pan_token(PAN) == token


def every_blob(path: Path) -> Iterator[tuple[str, bytes]]:
    """Every wrapped value in the raw SQLite database (see ``wrapped_values``)."""
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        yield from wrapped_values(db, tables)


def wrapped_values(db: Any, tables: list[str]) -> Iterator[tuple[str, bytes]]:
    """Every wrapped value of a sqlite3 or psycopg connection, found without the rotation's own
    column list: each binary value of every table, the hex pan-token key, and each transfer
    leg's pan_enc."""
    for table in tables:
        cur = db.execute(f"SELECT * FROM {table}")
        names = [d[0] for d in cur.description or ()]
        for row in cur:
            for name, value in zip(names, row):
                if isinstance(value, (bytes, memoryview)):
                    yield f"{table}.{name}", bytes(value)
    for (hex_key,) in db.execute("SELECT value FROM meta WHERE key = 'pan_token_key'"):
        yield "meta.pan_token_key", bytes.fromhex(hex_key)
    for (legs,) in db.execute("SELECT legs FROM journal WHERE legs IS NOT NULL"):
        for leg in json.loads(legs):
            yield "journal.legs", bytes.fromhex(leg["pan_enc"])


def count_key_ids(blobs: Iterator[tuple[str, bytes]]) -> dict[str | None, int]:
    counts: dict[str | None, int] = {}
    for _, blob in blobs:
        kid = blob_key_id(blob)
        counts[kid] = counts.get(kid, 0) + 1
    return counts


def key_ids_in(path: Path) -> dict[str | None, int]:
    return count_key_ids(every_blob(path))


def meta_key_id(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return str(db.execute("SELECT value FROM meta WHERE key='master_key_id'").fetchone()[0])


# ---- the rotation ---------------------------------------------------------------------------
def test_rotation_rewraps_every_blob_under_the_new_key(data_dir: Path) -> None:
    token = seed(data_dir)
    old = MasterKey.from_file(data_dir / KEY_FILE)
    before = key_ids_in(db_path(data_dir))
    assert set(before) == {None}  # all v1 to start with
    total_blobs = before[None]

    report = rotate(db_path(data_dir), data_dir, env={}, batch_size=37)

    new = MasterKey.from_file(data_dir / KEY_FILE)
    assert report.old_key_id == old.key_id and report.new_key_id == new.key_id != old.key_id
    assert key_ids_in(db_path(data_dir)) == {new.key_id: total_blobs}
    assert report.total == total_blobs
    assert report.rewrapped["journal.pan_enc"] == JOURNAL_ROWS
    assert report.rewrapped["journal.legs"] == 2 * (JOURNAL_ROWS // 10)
    assert report.rewrapped["intents.fields"] == 1
    assert meta_key_id(db_path(data_dir)) == new.key_id
    kept = data_dir / (OLD_KEY_FILE_PREFIX + old.key_id)
    assert kept.stat().st_mode & 0o777 == 0o600
    assert MasterKey.from_file(kept).key_id == old.key_id
    # reopen with the new key + old files
    store = SqliteStore(db_path(data_dir), MasterKeyring.load({}, data_dir))
    store.open()
    try:
        check_readable(store, token)
    finally:
        store.close()
    # nothing is left under the old key: the new key alone reads everything
    kept.rename(data_dir.parent / "offline-backup.key")
    alone = SqliteStore(db_path(data_dir), MasterKey.from_file(data_dir / KEY_FILE))
    alone.open()
    try:
        check_readable(alone, token)
    finally:
        alone.close()


def test_raw_database_holds_no_clear_key(data_dir: Path) -> None:
    seed(data_dir)
    old_hex = (data_dir / KEY_FILE).read_text().strip()
    rotate(db_path(data_dir), data_dir, env={})
    new_hex = (data_dir / KEY_FILE).read_text().strip()
    secrets = [PIK, MAK, TDK, WEBHOOK_SECRET, ID_CARD.encode(), ACCOUNT.encode(), PAN.encode(),
               PAN_CREDIT.encode(), RESPONSE, SAF_FIELDS, INTENT_FIELDS]
    secrets += [bytes.fromhex(t.tmk_hex) for t in TERMINALS if t.tmk_hex]
    secrets += [i.zpk for i in demo_issuers().values()]
    texts = [s.hex() for s in secrets if s not in (PAN.encode(), PAN_CREDIT.encode())] + [old_hex, new_hex]
    raw = b"".join(p.read_bytes() for p in data_dir.glob("switch.db*"))
    assert len(raw) > 0
    for s in secrets:
        assert s not in raw
    for text in texts:
        assert text.lower().encode() not in raw.lower()


def test_store_opened_before_the_rotation_still_unwraps_everything(data_dir: Path) -> None:
    token = seed(data_dir)
    running = SqliteStore(db_path(data_dir), MasterKeyring.load({}, data_dir))
    running.open()
    try:
        check_readable(running, token)
        old_id = running.master_key.key_id
        rotate(db_path(data_dir), data_dir, env={}, batch_size=50)
        assert set(key_ids_in(db_path(data_dir))) == {MasterKey.from_file(data_dir / KEY_FILE).key_id}
        check_readable(running, token)  # learned the new key from the data directory
        assert running.master_key.key_id == old_id  # still writes under the old key until restart
    finally:
        running.close()


@pytest.mark.anyio
async def test_rotation_while_the_switch_writes(data_dir: Path) -> None:
    """The running store commits journal rows through its group-commit writer while the
    rotation runs in another thread with small batches; nothing fails, everything stays readable
    by the running store and by a fresh one, and ``rewrap`` then moves the stragglers."""
    token = seed(data_dir)
    running = SqliteStore(db_path(data_dir), MasterKeyring.load({}, data_dir))
    running.open()
    extra = 60
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(running.run_writer)
            done = anyio.Event()

            async def do_rotate() -> None:
                await anyio.to_thread.run_sync(
                    lambda: rotate(db_path(data_dir), data_dir, env={}, batch_size=8, busy_timeout=20)
                )
                done.set()

            tg.start_soon(do_rotate)
            for n in range(JOURNAL_ROWS + 1, JOURNAL_ROWS + 1 + extra):
                await running.write(running.op_journal(entry(n, running)))
            await done.wait()
            tg.cancel_scope.cancel()
        check_readable(running, token, JOURNAL_ROWS + extra)
        new_id = MasterKey.from_file(data_dir / KEY_FILE).key_id
        ids = key_ids_in(db_path(data_dir))
        assert set(ids) <= {new_id, running.master_key.key_id}
        # the sweep after the old process is restarted: everything under the new key
        report = rewrap(db_path(data_dir), data_dir, MasterKeyring.load({}, data_dir))
        assert report.total == ids.get(running.master_key.key_id, 0)
        assert set(key_ids_in(db_path(data_dir))) == {new_id}
        check_readable(running, token, JOURNAL_ROWS + extra)
    finally:
        running.close()


def test_two_rotations_and_an_idempotent_rewrap(data_dir: Path) -> None:
    token = seed(data_dir)
    first = rotate(db_path(data_dir), data_dir, env={})
    second = rotate(db_path(data_dir), data_dir, env={})
    assert second.old_key_id == first.new_key_id
    assert second.total == first.total
    assert {p.name for p in data_dir.glob(OLD_KEY_FILE_PREFIX + "*")} == {
        OLD_KEY_FILE_PREFIX + first.old_key_id, OLD_KEY_FILE_PREFIX + first.new_key_id}
    ring = MasterKeyring.load({}, data_dir)
    assert rewrap(db_path(data_dir), data_dir, ring).total == 0
    store = SqliteStore(db_path(data_dir), ring)
    store.open()
    try:
        check_readable(store, token)
    finally:
        store.close()


def test_rewrap_with_keys_from_the_environment(data_dir: Path) -> None:
    """The env procedure: SWITCH_MASTER_KEY = new, SWITCH_MASTER_KEY_OLD = old, then rewrap."""
    token = seed(data_dir)
    old_hex = (data_dir / KEY_FILE).read_text().strip()
    new_hex = "5A" * 32
    env = {ENV_VAR: new_hex, OLD_ENV_VAR: old_hex}
    ring = MasterKeyring.load(env, data_dir)
    report = rewrap(db_path(data_dir), data_dir, ring)
    assert report.old_key_id is None and report.new_key_id == MasterKey.from_hex(new_hex).key_id
    assert set(key_ids_in(db_path(data_dir))) == {report.new_key_id}
    assert meta_key_id(db_path(data_dir)) == report.new_key_id
    store = SqliteStore(db_path(data_dir), MasterKey.from_hex(new_hex))
    store.open()
    try:
        check_readable(store, token)
    finally:
        store.close()


# ---- refusals ---------------------------------------------------------------------------------
def test_rotate_refuses_keys_from_the_environment(data_dir: Path) -> None:
    seed(data_dir)
    key_file = (data_dir / KEY_FILE).read_text()
    with pytest.raises(RotationError, match="switch keys rewrap"):
        rotate(db_path(data_dir), data_dir, env={ENV_VAR: "11" * 32})
    assert (data_dir / KEY_FILE).read_text() == key_file
    assert set(key_ids_in(db_path(data_dir))) == {None}


def test_rotate_refuses_a_store_written_under_another_key(data_dir: Path, tmp_path: Path) -> None:
    seed(data_dir)
    other = tmp_path / "other"
    other.mkdir()
    MasterKey.create_file(other / KEY_FILE)
    with pytest.raises(RotationError, match="wrong data directory"):
        rotate(db_path(data_dir), other, env={})
    assert list(other.glob(OLD_KEY_FILE_PREFIX + "*")) == []  # no key file was touched


def test_rotate_refuses_while_another_rotation_runs(data_dir: Path) -> None:
    seed(data_dir)
    fd = os.open(data_dir / LOCK_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RotationError, match="another key rotation"):
            rotate(db_path(data_dir), data_dir, env={})
    finally:
        os.close(fd)
    assert list(data_dir.glob(OLD_KEY_FILE_PREFIX + "*")) == []


def test_rotate_refuses_without_a_store(data_dir: Path) -> None:
    with pytest.raises(RotationError, match="no switch store"):
        rotate(db_path(data_dir), data_dir, env={})
    assert not db_path(data_dir).exists()


def test_a_blob_that_does_not_unwrap_stops_the_rotation_and_names_the_row(data_dir: Path) -> None:
    seed(data_dir)
    with sqlite3.connect(db_path(data_dir)) as db:  # a row copied from another terminal
        blob = db.execute("SELECT tmk FROM terminals WHERE tid='10000001'").fetchone()[0]
        db.execute("UPDATE terminals SET tmk=? WHERE tid='20000001'", (blob,))
    with pytest.raises(RotationError, match="terminals.tmk of row .*'tmk:20000001'"):
        rotate(db_path(data_dir), data_dir, env={})


# ---- the command line -------------------------------------------------------------------------
def test_cli_rotate_master(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(data_dir)
    old = MasterKey.from_file(data_dir / KEY_FILE)
    assert keys_cli.main(["rotate-master", "--data-dir", str(data_dir), "--batch-size", "64"]) == 0
    new = MasterKey.from_file(data_dir / KEY_FILE)
    out = capsys.readouterr().out
    assert f"{old.key_id} -> {new.key_id}" in out
    assert f"master.key.old.{old.key_id}" in out
    assert "journal.pan_enc" in out
    assert (data_dir / KEY_FILE).read_text().strip() not in out
    assert keys_cli.main(["rewrap", "--data-dir", str(data_dir)]) == 0
    assert "re-wrapped     0" in capsys.readouterr().out


def test_cli_rotate_master_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert keys_cli.main(["rotate-master", "--data-dir", str(tmp_path)]) == 2
    assert "switch keys rotate-master:" in capsys.readouterr().err


def test_cli_set_zpk(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(data_dir)
    zpk_hex = "A1B2C3D4E5F60718293A4B5C6D7E8F90"
    assert keys_cli.main(["set-zpk", "NEWBANK", "--data-dir", str(data_dir)],
                         stdin=io.StringIO(zpk_hex + "\n")) == 0
    out = capsys.readouterr().out
    assert "NEWBANK" in out and "KCV" in out and zpk_hex.lower() not in out.lower()
    store = SqliteStore(db_path(data_dir), MasterKeyring.load({}, data_dir))
    store.open()
    try:
        assert store.load_zone_pin_keys()["NEWBANK"] == bytes.fromhex(zpk_hex)
    finally:
        store.close()
    with sqlite3.connect(db_path(data_dir)) as db:
        blob = db.execute("SELECT zpk FROM issuer_keys WHERE issuer='NEWBANK'").fetchone()[0]
    assert bytes.fromhex(zpk_hex) not in blob
    # a rotation afterwards carries it along
    rotate(db_path(data_dir), data_dir, env={})
    store = SqliteStore(db_path(data_dir), MasterKeyring.load({}, data_dir))
    store.open()
    try:
        assert store.load_zone_pin_keys()["NEWBANK"] == bytes.fromhex(zpk_hex)
    finally:
        store.close()


@pytest.mark.parametrize("text", ["", "A1B2C3", "Z1B2C3D4E5F60718293A4B5C6D7E8F90",
                                  "A1B2C3D4E5F60718293A4B5C6D7E8F9011"])
def test_cli_set_zpk_rejects_bad_input_without_echoing_it(
    data_dir: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    seed(data_dir)
    assert keys_cli.main(["set-zpk", "NEWBANK", "--data-dir", str(data_dir)],
                         stdin=io.StringIO(text)) == 2
    err = capsys.readouterr().err
    assert "32 hex characters" in err
    if text:
        assert text not in err
    with sqlite3.connect(db_path(data_dir)) as db:
        assert db.execute("SELECT 1 FROM issuer_keys WHERE issuer='NEWBANK'").fetchone() is None


def test_cli_set_zpk_rejects_a_bad_issuer_id(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(data_dir)
    assert keys_cli.main(["set-zpk", "no such/bank", "--data-dir", str(data_dir)],
                         stdin=io.StringIO("A1" * 16)) == 2
    assert "issuer id" in capsys.readouterr().err
