"""Fixtures for the fuzz tests.

``open_pipeline`` / ``pipeline``: the switch's state built as ``switch.app.run_switch`` builds it (mirroring
tests/pipeline/conftest.py), with ``InMemoryIssuerLink``s in front of the §14 mock issuers, a
real SqliteStore in a temporary directory seeded with ``seed_demo`` whose group-commit writer runs for the
test's lifetime, and a signed-on terminal whose valid requests seed the mutations.

``demo_switch``: the real ``switch demo`` subprocess (the e2e harness's DemoSwitch), one per module.

Fixtures only: no assertions about the switch here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from e2e.conftest import DemoSwitch
from switch.adapters.issuer_link import InMemoryIssuerLink
from switch.adapters.sqlite_store import SqliteStore
from switch.app import seed_demo
from switch.core.codec import Codec, load_dialect
from switch.core.framing import FrameReader
from switch.crypto.keystore import MasterKey
from switch.crypto.working_keys import parse_f62
from switch.demo_fixture import TERMINALS_BY_TID
from switch.domain.cards import IssuerRoute, RoutingTable
from switch.issuers.cards import demo_issuers
from switch.issuers.mock import mock_from_demo
from switch.pipeline.context import Settings, SwitchState
from switch.pipeline.manager import TransactionManager
from switch.pos.client import TerminalClient
from switch.ports import NullMetrics

ISSUER_TIMEOUT = 0.2  # the SLOW issuer never answers: keep 98s quick
ICBC_CARD = "6222029375642931684"  # §14: 1,000,000.00, PIN 123456, expiry 3012


@dataclass
class Pipeline:
    manager: TransactionManager
    store: SqliteStore
    db_path: Path
    seeds: list[bytes]  # valid requests of a signed-on terminal (MACs under its MAK)
    answered: dict[bytes, set[bytes]] = field(default_factory=dict)  # request body -> response bodies

    def journal_rows(self) -> int:
        """Counted on a separate connection: what is durably committed, not what is cached."""
        with sqlite3.connect(self.db_path) as db:
            (n,) = db.execute("SELECT COUNT(*) FROM journal").fetchone()
        assert isinstance(n, int)
        return n


async def _handle_whole(manager: TransactionManager, raw: bytes) -> bytes | None:
    reader = FrameReader(4096)
    reader.receive_data(raw)
    frame = reader.next_frame()
    assert frame is not None
    return await manager.handle(frame)


@asynccontextmanager
async def open_pipeline(directory: Path) -> AsyncIterator[Pipeline]:
    """A fresh switch state and store in ``directory`` (cheap: ~20 ms), so that each Hypothesis
    example starts from the same state and its failures replay."""
    db_path = directory / "switch.db"
    store = SqliteStore(db_path, MasterKey(bytes(range(32))), NullMetrics())
    store.open()
    try:
        seed_demo(store)
        fixture = demo_issuers()
        mocks = {name: mock_from_demo(d) for name, d in fixture.items()}
        links = {name: InMemoryIssuerLink(name, mocks[name]) for name in fixture}
        for name, d in fixture.items():
            links[name].up = d.listens
        routes = RoutingTable([IssuerRoute(p, name) for name, d in fixture.items() for p in d.prefixes])
        state = SwitchState(
            codec=Codec(load_dialect("terminal")),
            issuer_codec=Codec(load_dialect("issuer")),
            terminals=store.load_terminals(),
            merchants=store.load_merchants(),
            routes=routes,
            links=dict(links),
            zone_pin_keys=store.load_zone_pin_keys(),
            metrics=NullMetrics(),
            settings=Settings(issuer_timeout=ISSUER_TIMEOUT),
        )
        manager = TransactionManager(state, store)
        async with anyio.create_task_group() as tg:
            await tg.start(store.run_writer)
            seeds = await _signed_on_seeds(manager)
            yield Pipeline(manager, store, db_path, seeds)
            tg.cancel_scope.cancel()
    finally:
        store.close()


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[Pipeline]:
    async with open_pipeline(tmp_path) as p:
        yield p


async def _signed_on_seeds(manager: TransactionManager) -> list[bytes]:
    """Sign terminal 10000001 on (003) and build valid requests with its keys: a consume, a
    balance inquiry, a parameter download and an echo test."""
    demo = TERMINALS_BY_TID["10000001"]
    assert demo.tmk_hex is not None
    tmk = bytes.fromhex(demo.tmk_hex)
    client = TerminalClient("127.0.0.1", 1, demo.tid, demo.mid, tmk)
    client.next_stan = 500_000
    codec = client.codec
    sign_on, _ = client.build_frame(
        "0800", {11: client.take_stan(), 41: client.tid, 42: client.mid, 60: f"00{client.batch}003"},
        mac=False,
    )
    data = await _handle_whole(manager, sign_on)
    assert data is not None
    _, resp = codec.decode(data[13:])
    assert resp[39] == "00", resp[39]
    f62, f60 = resp[62], resp[60]
    assert isinstance(f62, bytes) and isinstance(f60, str)
    client.keys = parse_f62(tmk, "003", f62)
    client.key_mode = "003"
    client.batch = f60[2:8]
    consume = client.card_fields(processing_code="000000", type_code="22", card=ICBC_CARD,
                                 amount_fen=1234, pin="123456", expiry="3012")
    balance = client.card_fields(processing_code="310000", type_code="01", card=ICBC_CARD,
                                 amount_fen=None, pin="123456", expiry="3012")
    mgmt = {41: client.tid, 42: client.mid}
    return [
        client.build_frame("0200", consume, mac=True)[0],
        client.build_frame("0200", balance, mac=True)[0],
        client.build_frame("0800", {11: client.take_stan(), **mgmt, 60: f"00{client.batch}360"},
                           mac=False)[0],
        client.build_frame("0820", {11: client.take_stan(), **mgmt, 60: f"00{client.batch}301"},
                           mac=False)[0],
    ]


@pytest.fixture(scope="module")
def demo_switch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoSwitch]:
    sw = DemoSwitch(tmp_path_factory.mktemp("fuzzdemo"))
    sw.start()
    try:
        yield sw
    finally:
        sw.kill()
