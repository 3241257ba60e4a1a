"""Pipeline test harness: the switch's state built as ``switch.app.run_switch`` builds it, but with
``InMemoryIssuerLink``s in front of the §14 mock issuers (no sockets), a real SqliteStore in
``tmp_path`` seeded with ``seed_demo`` whose group-commit writer runs in a task group for the
test's lifetime, and ``TransactionManager.handle`` fed whole frames.

Requests are built with the POS client's own ``card_fields`` / ``build_frame`` (valid MAC and PIN
block, no network); responses are decoded with the terminal codec. Fixtures only: test modules
do not import this file.
"""

from __future__ import annotations

import itertools

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from switch.adapters.issuer_link import InMemoryIssuerLink
from switch.adapters.sqlite_store import SqliteStore
from switch.ports import NullMetrics
from switch.app import seed_demo
from switch.core.codec import Codec, Fields, FieldValue, load_dialect
from switch.core.framing import FrameReader
from switch.crypto.keystore import MasterKey
from switch.crypto.working_keys import parse_f62
from switch.demo_fixture import TERMINALS_BY_TID
from switch.domain.cards import IssuerRoute, RoutingTable
from switch.issuers.cards import demo_issuers
from switch.issuers.mock import MockIssuer, mock_from_demo
from switch.pipeline.context import Settings, SwitchState
from switch.pipeline.manager import TransactionManager
from switch.pos.client import TerminalClient

HANDLE_LIMIT = 5.0  # seconds one manager.handle() may take before the test fails
ISSUER_TIMEOUT = 0.2  # the SLOW issuer never answers: keep 98s quick



STAN_BLOCKS = itertools.count(1, 1000)

@dataclass
class Decoded:
    """One response frame as a terminal would read it."""

    mti: str
    fields: Fields
    tpdu: bytes
    header: bytes
    body: bytes

    @property
    def code(self) -> str:
        v = self.fields.get(39)
        return v if isinstance(v, str) else ""

    @property
    def digit6(self) -> int:
        """Header digit 6 (§2): the low nibble of the third header byte."""
        return self.header[2] & 0x0F


@dataclass
class RecordingMetrics(NullMetrics):
    """A Metrics that keeps what it was told (the rest it ignores, as NullMetrics does)."""

    requests: list[tuple[str, str]] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    mac_failures: int = 0
    in_flight_now: int = 0
    issuer: list[tuple[str, str]] = field(default_factory=list)

    def request_completed(self, transaction: str, response_code: str, seconds: float) -> None:
        self.requests.append((transaction, response_code))

    def issuer_request(self, issuer: str, outcome: str, seconds: float) -> None:
        self.issuer.append((issuer, outcome))

    def malformed_frame(self, reason: str) -> None:
        self.malformed.append(reason)

    def mac_failure(self) -> None:
        self.mac_failures += 1

    def journal_commit(self, batch_size: int, seconds: float) -> None:
        pass

    def in_flight(self, delta: int) -> None:
        self.in_flight_now += delta


@dataclass
class Harness:
    state: SwitchState
    store: SqliteStore
    manager: TransactionManager
    mocks: dict[str, MockIssuer]
    links: dict[str, InMemoryIssuerLink]
    metrics: RecordingMetrics
    codec: Codec

    # ---- terminals ---------------------------------------------------------------------------
    def terminal(self, tid: str = "10000001", *, mid: str | None = None) -> TerminalClient:
        """A POS client for a §14 terminal (or any TID: unknown ones get a throwaway TMK).
        Used only to build frames; it never connects."""
        demo = TERMINALS_BY_TID.get(tid)
        tmk = bytes.fromhex(demo.tmk_hex) if demo is not None and demo.tmk_hex else bytes(range(16))
        real_mid = mid if mid is not None else (demo.mid if demo is not None else "898310048990001")
        client = TerminalClient("127.0.0.1", 1, tid, real_mid, tmk)
        client.next_stan = next(STAN_BLOCKS)  # never repeat a trace number: that is a duplicate (§11)
        return client

    @staticmethod
    def tmk_of(tid: str) -> bytes:
        hex_ = TERMINALS_BY_TID[tid].tmk_hex
        assert hex_ is not None
        return bytes.fromhex(hex_)

    # ---- exchanges ---------------------------------------------------------------------------
    async def exchange(self, raw: bytes) -> Decoded | None:
        """One whole frame (with LEN) through the manager; None when it says: close."""
        reader = FrameReader(4096)
        reader.receive_data(raw)
        frame = reader.next_frame()
        assert frame is not None and not reader.mid_frame
        with anyio.fail_after(HANDLE_LIMIT):
            data = await self.manager.handle(frame)
        if data is None:
            return None
        out = FrameReader(4096)
        out.receive_data(data)
        resp = out.next_frame()
        assert resp is not None and not out.mid_frame, "a response is exactly one frame"
        mti, fields = self.codec.decode(resp.body)
        return Decoded(mti, fields, resp.tpdu, resp.header, resp.body)

    async def send(
        self, client: TerminalClient, mti: str, fields: Mapping[int, FieldValue], *, mac: bool
    ) -> Decoded:
        raw, _ = client.build_frame(mti, fields, mac=mac)
        resp = await self.exchange(raw)
        assert resp is not None, "the manager closed instead of answering"
        return resp

    def management_fields(self, client: TerminalClient, nmc: str) -> Fields:
        return {11: client.take_stan(), 41: client.tid, 42: client.mid, 60: f"00{client.batch}{nmc}"}

    async def sign_on(self, client: TerminalClient, mode: str = "003") -> Decoded:
        """0800 sign-on; on 00 the client takes the batch and the working keys (checked CVs)."""
        resp = await self.send(client, "0800", self.management_fields(client, mode), mac=False)
        if resp.code == "00":
            f62 = resp.fields[62]
            assert isinstance(f62, bytes)
            client.keys = parse_f62(self.tmk_of(client.tid), mode, f62)
            client.key_mode = mode
            f60 = resp.fields[60]
            assert isinstance(f60, str)
            client.batch = f60[2:8]
        return resp

    async def parameter_download(self, client: TerminalClient) -> Decoded:
        return await self.send(client, "0800", self.management_fields(client, "360"), mac=False)

    async def ready(self, tid: str = "10000001", mode: str = "003") -> TerminalClient:
        """A terminal signed on and with its parameters downloaded (header digit 6 = 0)."""
        client = self.terminal(tid)
        assert (await self.sign_on(client, mode)).code == "00"
        assert (await self.parameter_download(client)).code == "00"
        return client

    def journal(self) -> list[dict[str, object]]:
        return self.store.journal()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    metrics = RecordingMetrics()
    store = SqliteStore(tmp_path / "switch.db", MasterKey(bytes(range(32))), metrics)
    store.open()
    try:
        seed_demo(store)
        fixture = demo_issuers()
        mocks = {name: mock_from_demo(d) for name, d in fixture.items()}
        links = {name: InMemoryIssuerLink(name, mocks[name]) for name in fixture}
        for name, d in fixture.items():
            links[name].up = d.listens  # BOC: a route, but nothing listens (§14)
        routes = RoutingTable([IssuerRoute(p, name) for name, d in fixture.items() for p in d.prefixes])
        state = SwitchState(
            codec=Codec(load_dialect("terminal")),
            issuer_codec=Codec(load_dialect("issuer")),
            terminals=store.load_terminals(),
            merchants=store.load_merchants(),
            routes=routes,
            links=dict(links),
            zone_pin_keys=store.load_zone_pin_keys(),
            metrics=metrics,
            settings=Settings(issuer_timeout=ISSUER_TIMEOUT),
        )
        manager = TransactionManager(state, store)
        async with anyio.create_task_group() as tg:
            await tg.start(store.run_writer)
            yield Harness(state, store, manager, mocks, links, metrics, Codec(load_dialect("terminal")))
            tg.cancel_scope.cancel()
    finally:
        store.close()
