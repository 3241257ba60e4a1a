"""Duplicate-key claims on PostgreSQL (several processes): what a settlement waits for. A live
claim of a financial request or reversal of the terminal and batch is "held"; other batches, other
terminals, a settlement's own claim, released and stale claims are not."""

from __future__ import annotations

import psycopg
import pytest

from switch.pipeline.duplicates import DatabaseClaims
from switch.pipeline.settlement import BATCH_MTIS

from tests.adapters.pg_cluster import pg_cluster, pg_database  # noqa: F401  (fixtures)

pytestmark = pytest.mark.postgres


def test_a_batch_is_held_while_a_request_of_it_is_claimed(pg_database: str) -> None:  # noqa: F811
    with psycopg.connect(pg_database, autocommit=True) as db:
        db.execute("CREATE TABLE dup_claims (dup_key TEXT PRIMARY KEY, digest TEXT NOT NULL,"
                   " created_at DOUBLE PRECISION NOT NULL)")
    now = [1_000.0]
    claims = DatabaseClaims(lambda: psycopg.connect(pg_database, autocommit=True), stale_after=60.0,
                            clock=lambda: now[0])
    prefix = "10000001|000001|"
    try:
        check(claims, prefix, now)
    finally:
        claims.close()


def check(claims: DatabaseClaims, prefix: str, now: list[float]) -> None:
    assert not claims.held(prefix, BATCH_MTIS)
    assert claims.claim("10000001|000001|000009|0500", "s") is None  # the settlement itself
    assert claims.claim("10000001|000002|000005|0200", "a") is None  # the next batch
    assert claims.claim("10000002|000001|000005|0200", "b") is None  # another terminal
    assert not claims.held(prefix, BATCH_MTIS)
    assert claims.claim("10000001|000001|000005|0200", "c") is None
    assert claims.held(prefix, BATCH_MTIS)
    claims.release("10000001|000001|000005|0200")
    assert not claims.held(prefix, BATCH_MTIS)
    assert claims.claim("10000001|000001|000006|0400", "d") is None  # a reversal in the batch
    assert claims.held(prefix, BATCH_MTIS)
    now[0] += 61.0  # its process died: the claim is stale, nobody will finish it
    assert not claims.held(prefix, BATCH_MTIS)


class _ReleasedBeforeRead:
    """A connection on which the holder of the key releases it (commits its journal row, another
    process) right after our insert met its claim and before we read the holder's digest."""

    def __init__(self, conn: psycopg.Connection, other: psycopg.Connection, key: str) -> None:
        self._conn, self._other, self._key = conn, other, key
        self.releases = 0

    def transaction(self) -> object:
        return self._conn.transaction()

    def execute(self, sql: str, args: tuple[object, ...] = ()) -> object:
        if sql.startswith("SELECT digest") and self.releases == 0:
            self._other.execute("DELETE FROM dup_claims WHERE dup_key = %s", (self._key,))
            self.releases += 1
        return self._conn.execute(sql, args)

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def close(self) -> None:
        self._conn.close()


def test_a_claim_released_while_we_look_is_taken_not_reported_as_a_holder(pg_database: str) -> None:  # noqa: F811
    """Two processes got the same request (the same bytes): the first's journal commit released
    the key just after the second's insert met its claim. The key is free: the second claims it
    (and then finds the journal row, see check_duplicate) instead of answering 94 for a holder
    that is gone. Seen under load in the two-process settlement test: ['00', '94']."""
    key = "10000001|000001|000007|0500"
    with psycopg.connect(pg_database, autocommit=True) as db:
        db.execute("CREATE TABLE dup_claims (dup_key TEXT PRIMARY KEY, digest TEXT NOT NULL,"
                   " created_at DOUBLE PRECISION NOT NULL)")
        db.execute("INSERT INTO dup_claims VALUES (%s, 'same-bytes', 1000.0)", (key,))
        other = psycopg.connect(pg_database, autocommit=True)
        racing = _ReleasedBeforeRead(psycopg.connect(pg_database, autocommit=True), other, key)
        claims = DatabaseClaims(lambda: racing, stale_after=60.0, clock=lambda: 1_001.0)
        try:
            assert claims.claim(key, "same-bytes") is None
            assert racing.releases == 1
            held = db.execute("SELECT digest FROM dup_claims WHERE dup_key = %s", (key,)).fetchall()
            assert held == [("same-bytes",)]
        finally:
            claims.close()
            other.close()
