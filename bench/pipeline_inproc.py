"""The pipeline in memory: consumes through TransactionManager.handle with in-memory issuer links
(the mock issuers' handlers, no sockets) and a real SQLite journal, 32 requests in flight.
Reports µs per request and the ratio to one terminal-codec decode measured in the same run.

    .venv/bin/python -m bench.pipeline_inproc [--requests 3000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import anyio

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
from switch.pipeline.saf import StoreAndForward
from switch.pos.client import TerminalClient
from switch.ports import NullMetrics

CARD = "6222029375642931684"


async def run(requests: int, profile: bool) -> None:
    data = Path(tempfile.mkdtemp(prefix="bench-inproc-"))
    store = SqliteStore(data / "switch.db", MasterKey(bytes(range(32))), NullMetrics())
    store.open()
    seed_demo(store)
    fixture = demo_issuers()
    mocks = {n: mock_from_demo(d) for n, d in fixture.items()}
    links = {n: InMemoryIssuerLink(n, mocks[n]) for n in fixture}
    state = SwitchState(
        codec=Codec(load_dialect("terminal")), issuer_codec=Codec(load_dialect("issuer")),
        terminals=store.load_terminals(), merchants=store.load_merchants(),
        routes=RoutingTable([IssuerRoute(p, n) for n, d in fixture.items() if d.kind == "card" for p in d.prefixes]),
        links=dict(links), zone_pin_keys=store.load_zone_pin_keys(), metrics=NullMetrics(),
        settings=Settings(issuer_timeout=1.0),
    )
    manager = TransactionManager(state, store)
    state.saf = StoreAndForward(store, state.links, NullMetrics())
    t = TERMINALS_BY_TID["20000001"]
    assert t.tmk_hex is not None
    client = TerminalClient("127.0.0.1", 1, t.tid, t.mid, bytes.fromhex(t.tmk_hex))

    async def handle(raw: bytes) -> bytes | None:
        reader = FrameReader(4096)
        reader.receive_data(raw)
        frame = reader.next_frame()
        assert frame is not None
        return await manager.handle(frame)

    async with anyio.create_task_group() as tg:
        await tg.start(store.run_writer)
        raw, _ = client.build_frame("0800", {11: client.take_stan(), 41: t.tid, 42: t.mid, 60: "00000001003"}, mac=False)
        resp = await handle(raw)
        assert resp is not None
        _, fields = state.codec.decode(resp[13:])
        f62 = fields[62]
        assert isinstance(f62, bytes)
        client.keys = parse_f62(bytes.fromhex(t.tmk_hex), "003", f62)
        frames = [
            client.build_frame("0200", client.card_fields(processing_code="000000", type_code="22", card=CARD,
                                                           amount_fen=1, pin="123456", expiry="3012"), mac=True)[0]
            for _ in range(requests)
        ]
        body = frames[0][13:]
        t0 = time.perf_counter()
        for _ in range(2000):
            state.codec.decode(body)
        decode_us = (time.perf_counter() - t0) / 2000 * 1e6
        prof = cProfile.Profile() if profile else None

        async def worker(k: int) -> None:
            for i in range(k, len(frames), 32):
                out = await handle(frames[i])
                assert out is not None

        t0 = time.perf_counter()
        if prof:
            prof.enable()
        async with anyio.create_task_group() as workers:
            for k in range(32):
                workers.start_soon(worker, k)
        if prof:
            prof.disable()
        per = (time.perf_counter() - t0) / len(frames) * 1e6
        approved = store.query("SELECT COUNT(*) AS n FROM journal WHERE txn = 'consume' AND response_code = '00'")
        print(f"pipeline in memory: {per:.0f} us/request ({1e6 / per:.0f}/s), decode {decode_us:.1f} us, "
              f"ratio {per / decode_us:.1f} x decode; approved {approved[0]['n']} of {len(frames)}")
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        tg.cancel_scope.cancel()
    store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:  # pragma: no cover
        options = {}
    anyio.run(run, a.requests, a.profile, backend_options=options)


if __name__ == "__main__":
    main()
