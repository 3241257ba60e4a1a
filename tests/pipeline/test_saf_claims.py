"""Store-and-forward claims: two workers sharing one queue (two switch processes on one database)
send a pending reversal once — the row is claimed with a conditional update before the attempt."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from switch.adapters.sqlite_store import SqliteStore
from switch.core.codec import Fields
from switch.crypto.keystore import MasterKey
from switch.pipeline.saf import StoreAndForward
from switch.ports import NullMetrics

pytestmark = pytest.mark.anyio


class SlowLink:
    """An issuer link that answers 00 after ``delay`` and records what it was sent."""

    name = "ICBC"

    def __init__(self, delay: float = 0.2) -> None:
        self.delay = delay
        self.sent: list[str] = []
        self.fields: list[Fields] = []

    @property
    def is_up(self) -> bool:
        return True

    async def wait_up(self, timeout: float) -> bool:
        return True

    def stamp(self, fields: Fields) -> None:
        fields.setdefault(11, "000001")
        fields.setdefault(7, "1126120000")

    async def send(self, mti: str, fields: Fields, timeout: float) -> tuple[str, Fields]:
        self.sent.append(mti)
        self.fields.append(dict(fields))
        await anyio.sleep(self.delay)  # both workers are now between reading the row and recording it
        return "0410", {39: "00"}


async def test_two_workers_send_a_queued_reversal_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "switch.db", MasterKey(bytes(range(32))), NullMetrics())
    store.open()
    link = SlowLink()
    links = {"ICBC": link}
    a = StoreAndForward(store, links, NullMetrics(), timeout=2.0)  # type: ignore[arg-type]
    b = StoreAndForward(store, links, NullMetrics(), timeout=2.0)  # type: ignore[arg-type]
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(store.run_writer)
            await store.write(a.op_enqueue("ICBC", "reversal", "0400", {3: "000000", 4: "000000000100",
                                                                        90: "0" * 42}, None))
            async with anyio.create_task_group() as workers:
                workers.start_soon(a.deliver_due)
                workers.start_soon(b.deliver_due)
            rows = store.query("SELECT state, attempts FROM saf_queue")
            tg.cancel_scope.cancel()
        assert link.sent == ["0400"]  # once, not once per worker
        assert rows == [{"state": "done", "attempts": 1}]
    finally:
        store.close()
