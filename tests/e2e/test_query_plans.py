"""Every journal read and update the request path makes is an index search on a key that picks
out a handful of rows, whatever the journal's size (a lookup that reads all of a merchant's or a
day's rows gets slower every day the switch runs: the bench's realistic mix showed it first).

The statements are the ones the running switch really executes (SQLite's trace callback on the
store's connections, with bound values expanded) while a terminal drives the transaction set over
TCP; each is then planned with ``EXPLAIN QUERY PLAN``.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from switch.issuers.run import demo_mocks

from .helpers import (
    CMB_CARD,
    do,
    in_process_demo,
    pre_auth_extra,
    reverse,
    signed_on,
    terminal_client,
    void_extra,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

# The column sets a request-path lookup may search the journal by: each names a few rows at most.
SELECTIVE = {
    ("rowid",), ("dup_key",), ("rrn",), ("original_id",),
    ("tid", "batch"), ("tid", "batch", "stan"), ("mid", "batch", "stan"),
}
SEARCH = re.compile(r"SEARCH journal USING (?:INTEGER PRIMARY KEY|(?:COVERING )?INDEX \w+) \((.*)\)")


def journal_access(plan: list[tuple[int, int, int, str]]) -> list[str]:
    return [d for *_, d in plan if re.search(r"\bjournal\b", d) and not d.startswith("USE TEMP")]


def columns(detail: str) -> tuple[str, ...] | None:
    """The equality columns of a SEARCH of the journal; None for anything else (a SCAN)."""
    m = SEARCH.fullmatch(detail)
    if m is None:
        return None
    cols = []
    for term in m.group(1).split(" AND "):
        col, _, op = term.partition("=")
        if op != "?":
            return None  # a range: not a key lookup
        cols.append(col)
    return tuple(cols)


def test_the_rule_rejects_a_merchant_wide_search() -> None:
    db = sqlite3.connect(":memory:")
    from switch.adapters.sqlite_store import MIGRATIONS

    for m in MIGRATIONS[:9]:  # v1-v9, before v10: the pre-auth lookup could only use (mid, business_date)
        db.executescript(m)
    q = "SELECT * FROM journal WHERE txn = 'pre_auth' AND mid = '1' AND batch = '1' AND stan = '1'"
    details = journal_access(db.execute("EXPLAIN QUERY PLAN " + q).fetchall())
    assert [columns(d) for d in details] == [("mid",)]
    assert ("mid",) not in SELECTIVE
    assert columns("SCAN journal") is None


async def test_request_path_journal_statements_are_key_lookups(tmp_path: Path) -> None:
    statements: list[str] = []
    async with in_process_demo(tmp_path, demo_mocks()) as running:
        store = running.store
        for conn in (store.db, store._reader):
            assert conn is not None
            conn.set_trace_callback(statements.append)
        try:
            term = terminal_client("127.0.0.1", running.port, "20000001", 1)
            async with signed_on(term):
                card = CMB_CARD
                a = await do(term, "consume", card, 1_000)
                b = await do(term, "consume", card, 300)
                assert (await do(term, "void", card, 300, extra=void_extra(b))).code == "00"
                assert (await do(term, "refund", card, 200, pin=False, extra=void_extra(a))).code == "00"
                hold = await do(term, "pre_auth", card, 2_000)
                completion = await do(term, "completion", card, 1_500, extra=pre_auth_extra(hold))
                assert completion.code == "00"
                assert (await do(term, "completion_void", card, 1_500, extra=void_extra(completion))).code == "00"
                assert (await do(term, "pre_auth_void", card, 2_000, extra=pre_auth_extra(hold))).code == "00"
                c = await do(term, "consume", card, 400)
                assert (await reverse(term, c)).code == "00"
                f48 = f"{1_400:012d}{2:03d}{200:012d}{1:03d}0" + "0" * 31
                settle = {11: term.take_stan(), 41: term.tid, 42: term.mid, 48: f48, 49: "156",
                          60: f"00{term.batch}201", 63: "01 "}
                assert (await term.send_fields("0500", settle, mac=False)).mti == "0510"
        finally:
            for conn in (store.db, store._reader):
                if conn is not None:
                    conn.set_trace_callback(None)
        touching = sorted({s for s in statements if re.search(r"\bjournal\b", s)
                           and s.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE"))})
        assert len(touching) >= 8, touching  # originals, duplicates, settlement totals, state changes
        wide = {}
        for sql in touching:
            plan = store.db.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
            for detail in journal_access(plan):
                if columns(detail) not in SELECTIVE:
                    wide[sql] = detail
    assert not wide, wide
