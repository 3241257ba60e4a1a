"""Test helpers shared by the pipeline and store tests: one whole frame through a
TransactionManager (no sockets), and a second "process" on the same SQLite file (its own store,
group-commit writer and state), for what several processes share through the store.

Helpers only: no fixtures, no assertions about behaviour beyond "an answer came back".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from switch.adapters.sqlite_store import SqliteStore
from switch.core.codec import Codec, Fields, load_dialect
from switch.core.framing import FrameReader
from switch.crypto.keystore import MasterKey
from switch.pipeline.context import SwitchState
from switch.pipeline.manager import TransactionManager
from switch.ports import Metrics

TERMINAL_CODEC = Codec(load_dialect("terminal"))
HANDLE_LIMIT = 10.0  # seconds one request may take before the test fails


async def round_trip(manager: TransactionManager, raw: bytes, peer: str = "") -> tuple[str, Fields]:
    """``raw`` (LEN + TPDU + header + body, as a terminal sends it) through ``manager``; the
    response's MTI and fields. Fails when the manager closes instead of answering."""
    reader = FrameReader(4096, peer)
    reader.receive_data(raw)
    frame = reader.next_frame()
    assert frame is not None
    with anyio.fail_after(HANDLE_LIMIT):
        data = await manager.handle(frame)
    assert data is not None, "closed instead of answering"
    out = FrameReader(4096)
    out.receive_data(data)
    resp = out.next_frame()
    assert resp is not None
    return TERMINAL_CODEC.decode(resp.body)


@asynccontextmanager
async def second_process(
    like: SwitchState, db_path: Path, metrics: Metrics
) -> AsyncIterator[tuple[TransactionManager, SwitchState]]:
    """Another switch process on ``db_path``: its own store and writer, state loaded from the
    file, the rest (codecs, routes, issuer links, settings) as ``like``'s."""
    store = SqliteStore(db_path, MasterKey(bytes(range(32))), metrics)
    store.open()
    try:
        state = SwitchState(codec=like.codec, issuer_codec=like.issuer_codec, terminals=store.load_terminals(),
                            merchants=store.load_merchants(), routes=like.routes, links=like.links,
                            zone_pin_keys=store.load_zone_pin_keys(), metrics=metrics, settings=like.settings)
        manager = TransactionManager(state, store)
        async with anyio.create_task_group() as tg:
            await tg.start(store.run_writer)
            yield manager, state
            tg.cancel_scope.cancel()
    finally:
        store.close()
