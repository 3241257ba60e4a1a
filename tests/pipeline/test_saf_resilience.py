"""Store-and-forward outlives what it reads: a queued message that cannot be read (damaged at
rest) is set aside as ``refused`` / ``unreadable`` for reconciliation while the rest of the queue
is delivered, and a delivery pass that fails on the store itself is retried; neither stops the
worker, nor (as it did) the switch with it, at every start."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from switch.adapters.sqlite_store import SqliteStore
from switch.core.codec import Fields
from switch.crypto.keystore import MasterKey
from switch.pipeline import saf as saf_module
from switch.pipeline.saf import StoreAndForward
from switch.ports import NullMetrics

from test_saf_claims import SlowLink

pytestmark = pytest.mark.anyio

REVERSAL: Fields = {3: "000000", 4: "000000000100", 90: "0" * 42}


def open_store(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(tmp_path / "switch.db", MasterKey(bytes(range(32))), NullMetrics())
    store.open()
    return store


async def test_an_unreadable_message_is_set_aside_and_the_queue_goes_on(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    link = SlowLink(delay=0.0)
    saf = StoreAndForward(store, {"ICBC": link}, NullMetrics(), timeout=2.0)  # type: ignore[dict-item]
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(store.run_writer)
            await store.write(saf.op_enqueue("ICBC", "reversal", "0400", REVERSAL, None))
            await store.write(saf.op_enqueue("ICBC", "reversal", "0400", {**REVERSAL, 4: "000000000200"}, None))
            db = sqlite3.connect(tmp_path / "switch.db")
            db.execute("UPDATE saf_queue SET fields = x'00112233' WHERE id = 1")  # damaged at rest
            db.commit()
            db.close()
            await saf.deliver_due()
            rows = store.query("SELECT id, state, attempts, last_response FROM saf_queue ORDER BY id")
            tg.cancel_scope.cancel()
    finally:
        store.close()
    assert rows == [
        {"id": 1, "state": "refused", "attempts": 0, "last_response": "unreadable"},
        {"id": 2, "state": "done", "attempts": 1, "last_response": "00"},
    ]
    assert [f[4] for f in link.fields] == ["000000000200"]  # only the readable one went out


async def test_the_worker_survives_a_failing_read_and_delivers_afterwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(saf_module, "IDLE_POLL", 0.05)
    store = open_store(tmp_path)
    link = SlowLink(delay=0.0)
    saf = StoreAndForward(store, {"ICBC": link}, NullMetrics(), timeout=2.0)  # type: ignore[dict-item]
    real_query = store.query
    failures = []

    def flaky_query(sql: str, params: object = ()) -> list[dict[str, object]]:
        if "saf_queue" in sql and len(failures) < 3:
            failures.append(sql)
            raise sqlite3.OperationalError("disk I/O error")
        return real_query(sql, params)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "query", flaky_query)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(store.run_writer)
            await tg.start(saf.run)
            await store.write(saf.op_enqueue("ICBC", "reversal", "0400", REVERSAL, None))
            saf.wake()
            with anyio.fail_after(10):
                while not link.sent:  # bounded by fail_after
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    finally:
        store.close()
    assert len(failures) == 3 and len(link.sent) == 1
