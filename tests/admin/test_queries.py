"""The back-office queries (switch/admin/queries.py) on a real SQLite store seeded with the demo
fixture: journal search by RRN / TID / business date / response code (and together), newest
first, bounded by ``limit``; only allow-listed columns (never pan_token, pan_enc, response_blob,
request_digest) and only masked PANs; parameter validation; the store-and-forward queue view
(states, order, age, never the wrapped fields); and ``switch journal`` using the same search."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from switch.adapters.sqlite_store import JournalEntry, SqliteStore
from switch.admin import queries
from switch.admin.queries import QueryError, saf_queue, search_journal
from switch.app import seed_demo
from switch.cli import main
from switch.crypto.keystore import MasterKey

KEY_HEX = "44" * 32
CLEAR_PAN = "6222021234567890123"
MASKED = "622202*********0123"
SECRET_TOKEN = "feedc0ffee" * 3
SECRET_DIGEST = "d1ge57" * 5
SECRET_BLOB = b"RESPONSE-BLOB-SECRET"
SECRET_PAN_ENC = b"PAN-ENC-SECRET"
SECRET_FIELDS = b"SAF-FIELDS-SECRET"


def entry(n: int, tid: str = "10000001", rc: str = "00", day: str = "20240301", **kw: object) -> JournalEntry:
    args: dict[str, object] = dict(
        created_at=f"2024-03-01T02:00:{n:02d}+00:00", business_date=day, tid=tid,
        mid="898310048990001" if tid.startswith("1") else "898310058120002", mti="0200",
        txn="consume", response_code=rc, stan=f"{n:06d}", batch="000001", rrn=f"{n:012d}",
        amount_fen=1000 * n, fee_fen=6 * n, currency="156", pan_masked=MASKED,
        pan_token=SECRET_TOKEN, pan_enc=SECRET_PAN_ENC, response_blob=SECRET_BLOB,
        request_digest=SECRET_DIGEST, state="approved" if rc == "00" else "declined",
    )
    args.update(kw)
    return JournalEntry(**args)  # type: ignore[arg-type]


def insert(store: SqliteStore, *entries: JournalEntry) -> None:
    """Straight into the table with the writer's own insert op, in one transaction."""
    store.db.execute("BEGIN IMMEDIATE")
    for e in entries:
        store.op_journal(e)(store.db)
    store.db.execute("COMMIT")


def add_saf(store: SqliteStore, issuer: str, state: str, created_at: float, **kw: object) -> int:
    cur = store.db.execute(
        "INSERT INTO saf_queue (issuer, kind, mti, fields, journal_id, created_at, attempts,"
        " next_attempt, state, last_response) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (issuer, kw.get("kind", "reversal"), kw.get("mti", "0400"), SECRET_FIELDS, kw.get("journal_id"),
         created_at, kw.get("attempts", 0), kw.get("next_attempt", created_at), state,
         kw.get("last_response")),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "switch.db", MasterKey.from_hex(KEY_HEX))
    s.open()
    seed_demo(s)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def journal(store: SqliteStore) -> SqliteStore:
    insert(
        store,
        entry(1),
        entry(2, rc="51"),
        entry(3, tid="10000002"),
        entry(4, tid="20000001", rc="A0", day="20240302"),
        entry(5, day="20240302"),
        entry(6, tid="20000001", rc="00", day="20240302"),
    )
    return store


def rrns(rows: list[dict[str, object]]) -> list[object]:
    return [r["rrn"] for r in rows]


# ---- journal search --------------------------------------------------------------------------
def test_no_filter_returns_everything_newest_first(journal: SqliteStore) -> None:
    assert rrns(search_journal(journal)) == [f"{n:012d}" for n in (6, 5, 4, 3, 2, 1)]


def test_search_by_rrn(journal: SqliteStore) -> None:
    rows = search_journal(journal, rrn="000000000003")
    assert len(rows) == 1
    assert (rows[0]["tid"], rows[0]["amount_fen"], rows[0]["stan"]) == ("10000002", 3000, "000003")
    assert search_journal(journal, rrn="999999999999") == []


def test_search_by_tid(journal: SqliteStore) -> None:
    assert rrns(search_journal(journal, tid="10000001")) == [f"{n:012d}" for n in (5, 2, 1)]
    assert rrns(search_journal(journal, tid="20000001")) == [f"{n:012d}" for n in (6, 4)]


@pytest.mark.parametrize("day", ["2024-03-02", "20240302", " 2024-03-02 "])
def test_search_by_business_date_in_either_form(journal: SqliteStore, day: str) -> None:
    assert rrns(search_journal(journal, date=day)) == [f"{n:012d}" for n in (6, 5, 4)]


def test_search_by_response_code_case_insensitive(journal: SqliteStore) -> None:
    assert rrns(search_journal(journal, response_code="51")) == ["000000000002"]
    assert rrns(search_journal(journal, response_code="a0")) == ["000000000004"]
    assert rrns(search_journal(journal, response_code="00")) == [f"{n:012d}" for n in (6, 5, 3, 1)]


def test_filters_combine(journal: SqliteStore) -> None:
    assert rrns(search_journal(journal, tid="10000001", date="20240301", response_code="00")) == [
        "000000000001"
    ]
    assert search_journal(journal, tid="10000002", date="20240302") == []


def test_limit_keeps_the_newest(journal: SqliteStore) -> None:
    assert rrns(search_journal(journal, limit=2)) == ["000000000006", "000000000005"]
    assert len(search_journal(journal, limit=queries.MAX_LIMIT)) == 6


def test_rows_show_only_allowed_columns_and_no_secret(journal: SqliteStore) -> None:
    rows = search_journal(journal)
    assert rows and all(tuple(r) == queries.JOURNAL_COLUMNS for r in rows)
    for hidden in ("pan_token", "pan_enc", "response_blob", "request_digest"):
        assert hidden not in queries.JOURNAL_COLUMNS
    text = json.dumps(rows)  # every value is JSON-able: no bytes left in a row
    for secret in (SECRET_TOKEN, SECRET_DIGEST, SECRET_BLOB.decode(), SECRET_PAN_ENC.decode(), CLEAR_PAN):
        assert secret not in text
    assert rows[0]["pan_masked"] == MASKED
    assert rows[0]["needs_reversal"] is False


def test_a_clear_pan_in_the_masked_column_is_masked_on_the_way_out(store: SqliteStore) -> None:
    insert(store, entry(7, pan_masked=CLEAR_PAN, needs_reversal=True))
    (row,) = search_journal(store)
    assert row["pan_masked"] == MASKED
    assert row["needs_reversal"] is True


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"rrn": "12345"}, "rrn"),
        ({"rrn": "00000000000x"}, "rrn"),
        ({"rrn": "００００００００００１２"}, "rrn"),  # fullwidth digits are not ASCII digits
        ({"tid": "1000000"}, "tid"),
        ({"tid": "1000000a"}, "tid"),
        ({"date": "2024-02-30"}, "date"),
        ({"date": "2024/03/01"}, "date"),
        ({"date": "2024-0301"}, "date"),
        ({"date": "20240301x"}, "date"),
        ({"date": ""}, "date"),
        ({"response_code": "0"}, "response code"),
        ({"response_code": "000"}, "response code"),
        ({"response_code": "0'"}, "response code"),
        ({"limit": 0}, "limit"),
        ({"limit": queries.MAX_LIMIT + 1}, "limit"),
        ({"limit": True}, "limit"),
    ],
)
def test_bad_parameters_raise_query_error_naming_them(
    journal: SqliteStore, kwargs: dict[str, object], word: str
) -> None:
    with pytest.raises(QueryError, match=word):
        search_journal(journal, **kwargs)  # type: ignore[arg-type]


def test_normalise_date() -> None:
    assert queries.normalise_date("2024-02-29") == "20240229"
    assert queries.normalise_date("20240229") == "20240229"
    with pytest.raises(QueryError):
        queries.normalise_date("20230229")


@pytest.mark.anyio
async def test_rows_written_by_the_group_commit_writer_are_found(store: SqliteStore) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(store.run_writer)
        await store.write(store.op_journal(entry(41, tid="20000001", rc="05")))
        await store.write(store.op_journal(entry(42, tid="20000001", rc="00")))
        rows = search_journal(store, tid="20000001", response_code="05")
        tg.cancel_scope.cancel()
    assert rrns(rows) == ["000000000041"]


# ---- store-and-forward queue ------------------------------------------------------------------
def test_saf_queue_pending_oldest_first_with_age_and_no_fields(store: SqliteStore) -> None:
    a = add_saf(store, "ICBC", "pending", 1_700_000_000.0, attempts=2, last_response="timeout",
                next_attempt=1_700_000_030.0, journal_id=7)
    add_saf(store, "ICBC", "done", 1_700_000_001.0, attempts=1, last_response="00")
    b = add_saf(store, "BOC", "pending", 1_700_000_050.0, kind="advice", mti="0220")
    rows = saf_queue(store, now=1_700_000_100.0)
    assert [r["id"] for r in rows] == [a, b]
    first = rows[0]
    assert tuple(first) == queries.SAF_COLUMNS
    assert first == {
        "id": a, "issuer": "ICBC", "kind": "reversal", "mti": "0400", "journal_id": 7,
        "attempts": 2, "state": "pending", "created_at": "2023-11-14T22:13:20+00:00",
        "next_attempt": "2023-11-14T22:13:50+00:00", "last_response": "timeout", "age_s": 100,
    }
    assert rows[1]["age_s"] == 50 and rows[1]["kind"] == "advice"
    assert SECRET_FIELDS.decode() not in json.dumps(rows)


def test_saf_queue_other_states_and_limit(store: SqliteStore) -> None:
    ids = [add_saf(store, "ICBC", s, 1_700_000_000.0 + i) for i, s in
           enumerate(("pending", "done", "refused", "done"))]
    assert [r["id"] for r in saf_queue(store, state="done", now=1_700_000_010.0)] == [ids[1], ids[3]]
    assert [r["id"] for r in saf_queue(store, state="refused")] == [ids[2]]
    assert [r["id"] for r in saf_queue(store, state="all")] == ids
    assert [r["id"] for r in saf_queue(store, state="all", limit=2)] == ids[:2]
    assert saf_queue(store, state="pending", now=1_699_999_000.0)[0]["age_s"] == 0  # clock behind


@pytest.mark.parametrize("kwargs", [{"state": "queued"}, {"state": ""}, {"limit": 0}, {"limit": 5000}])
def test_saf_queue_bad_parameters(store: SqliteStore, kwargs: dict[str, object]) -> None:
    with pytest.raises(QueryError):
        saf_queue(store, **kwargs)  # type: ignore[arg-type]


# ---- the CLI uses the same search -------------------------------------------------------------
@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SWITCH_MASTER_KEY", KEY_HEX)
    d = tmp_path / "data"
    s = SqliteStore(d / "switch.db", MasterKey.from_hex(KEY_HEX))
    s.open()
    try:
        seed_demo(s)
        insert(s, entry(1), entry(2, rc="51"), entry(4, tid="20000001", rc="A0", day="20240302"),
               entry(5, day="20240302"))
    finally:
        s.close()
    return d


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, object]], str]:
    code = main(["journal", *argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_cli_journal_filters_by_date_and_rc(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, rows, err = cli(capsys, "--data-dir", str(data_dir), "--date", "2024-03-02")
    assert (code, err) == (0, "")
    assert rrns(rows) == ["000000000005", "000000000004"]
    code, rows, _ = cli(capsys, "--data-dir", str(data_dir), "--rc", "51")
    assert rrns(rows) == ["000000000002"]
    code, rows, _ = cli(capsys, "--data-dir", str(data_dir), "--tid", "10000001", "--date", "20240301",
                        "--rc", "00")
    assert rrns(rows) == ["000000000001"]
    code, rows, _ = cli(capsys, "--data-dir", str(data_dir), "--limit", "1")
    assert rrns(rows) == ["000000000005"]


def test_cli_journal_shows_no_secret(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["journal", "--data-dir", str(data_dir)])
    out, _ = capsys.readouterr()
    assert code == 0 and out.count("\n") == 4
    for secret in (SECRET_TOKEN, SECRET_DIGEST, "pan_token", "response_blob", "pan_enc", CLEAR_PAN):
        assert secret not in out
    assert MASKED in out


def test_cli_journal_bad_date_exits_2(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["journal", "--data-dir", str(data_dir), "--date", "2024-13-01"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.startswith("switch journal:") and "date" in err

