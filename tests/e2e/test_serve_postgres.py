"""`switch serve` on the PostgreSQL store, selected by the DSN in the configuration: a terminal signs
on and buys over TCP, and the journal row is in PostgreSQL. Skipped (with the reason) when the
machine has no initdb/pg_ctl."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg
import pytest

from switch.adapters.pg_store import open_store_for
from switch.app import load_master_key, seed_demo
from switch.demo_fixture import TERMINALS_BY_TID
from switch.pos.client import TerminalClient

from procs import free_port, reap, spawn, wait_port
from tests.adapters.pg_cluster import pg_cluster, pg_database  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.postgres]

CARD = "6222029375642931684"


async def test_serve_on_postgresql(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    store = open_store_for(pg_database, load_master_key(tmp_path, create=True))
    try:
        seed_demo(store)
    finally:
        store.close()
    port, metrics, icbc = free_port(), free_port(), free_port()
    cfg = tmp_path / "switch.toml"
    cfg.write_text(
        f'[switch]\nport = {port}\nmetrics_port = {metrics}\ndata_dir = "{tmp_path}"\nlog_format = "text"\n'
        f'[store]\ndsn = "{pg_database}"\n'
        f'[[issuers]]\nname = "ICBC"\nport = {icbc}\nprefixes = ["622202"]\n',
        encoding="utf-8",
    )
    issuer = spawn("issuer", "--name", "ICBC", "--port", str(icbc))
    switch = spawn("serve", "--config", str(cfg), stderr=subprocess.PIPE)
    try:
        wait_port(icbc)
        wait_port(port)
        t = TERMINALS_BY_TID["10000001"]
        term = TerminalClient("127.0.0.1", port, t.tid, t.mid, bytes.fromhex(t.tmk_hex or ""))
        async with term.connect():
            assert (await term.sign_on("003")).code == "00"
            r = await term.consume(CARD, 4321, pin="123456", expiry="3012")
        assert r.code == "00" and r.mac_ok
        with psycopg.connect(pg_database) as db:
            row = db.execute("SELECT response_code, amount_fen, pan_masked FROM journal WHERE rrn = %s",
                             (r.fields[37],)).fetchone()
        assert row == ("00", 4321, "622202*********1684")
    finally:
        err = reap(switch)
        reap(issuer)
    assert b"Traceback" not in err, err.decode()[-2000:]
