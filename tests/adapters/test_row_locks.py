"""Advisory row locks on PostgreSQL (several processes): a second holder of the same journal row
waits until the first releases it; other rows do not wait. (The e2e money outcome is also
protected by the issuers' own checks, so the lock is tested where its effect is visible.)"""

from __future__ import annotations

import threading

import psycopg
import pytest

from switch.pipeline.originals import AdvisoryRowLocks

from tests.adapters.pg_cluster import pg_cluster, pg_database  # noqa: F401  (fixtures)

pytestmark = pytest.mark.postgres


def test_a_second_holder_waits_for_the_first(pg_database: str) -> None:  # noqa: F811
    locks = AdvisoryRowLocks(lambda: psycopg.connect(pg_database, autocommit=True))
    release_first = locks.acquire(42)
    got_it = threading.Event()
    released_second: list = []

    def second() -> None:
        released_second.append(locks.acquire(42))
        got_it.set()

    t = threading.Thread(target=second, daemon=True)
    t.start()
    assert not got_it.wait(0.5), "the second holder got the lock while the first held it"
    other = locks.acquire(43)  # another row is not blocked
    other()
    release_first()
    assert got_it.wait(10), "the second holder never got the lock after the release"
    t.join(5)
    released_second[0]()
