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
