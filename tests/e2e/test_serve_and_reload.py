"""`switch serve --config FILE` with mock issuers in their own processes: the store must exist
and the master key must be readable; SIGHUP moves an issuer to a new address while a load runs,
without dropping a terminal connection or an in-flight request; a broken file on SIGHUP keeps
the running configuration."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import anyio
import pytest

from switch.adapters.sqlite_store import SqliteStore
from switch.app import load_master_key, seed_demo
from switch.demo_fixture import TERMINALS_BY_TID
from switch.pos.client import TerminalClient

from procs import free_port, reap, spawn, wait_port

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CARD = "6222029375642931684"


def config(path: Path, data: Path, port: int, metrics: int, icbc: int) -> None:
    path.write_text(
        f"""
[switch]
port = {port}
metrics_port = {metrics}
admin_port = 0
data_dir = "{data}"
log_format = "text"

[timeouts]
issuer = 2.0

[[issuers]]
name = "ICBC"
port = {icbc}
prefixes = ["622202"]
""",
        encoding="utf-8",
    )


def seed(data: Path) -> None:
    store = SqliteStore(data / "switch.db", load_master_key(data, create=True))
    store.open()
    try:
        seed_demo(store)
    finally:
        store.close()


async def test_serve_refuses_to_start_without_its_master_key(tmp_path: Path) -> None:
    seed(tmp_path)
    (tmp_path / "master.key").chmod(0o644)  # group/world readable: refused
    cfg = tmp_path / "switch.toml"
    config(cfg, tmp_path, free_port(), free_port(), free_port())
    p = spawn("serve", "--config", str(cfg), stderr=subprocess.PIPE)
    assert p.wait(30) == 2
    assert b"master" in reap(p).lower()


async def test_sighup_moves_an_issuer_under_load(tmp_path: Path) -> None:
    seed(tmp_path)
    port, metrics, icbc1, icbc2 = free_port(), free_port(), free_port(), free_port()
    cfg = tmp_path / "switch.toml"
    config(cfg, tmp_path, port, metrics, icbc1)
    procs = [spawn("issuer", "--name", "ICBC", "--port", str(icbc1), stderr=subprocess.PIPE),
             spawn("issuer", "--name", "ICBC", "--port", str(icbc2), stderr=subprocess.PIPE)]
    wait_port(icbc1)
    wait_port(icbc2)
    procs.append(spawn("serve", "--config", str(cfg), stderr=subprocess.PIPE))
    serve = procs[-1]
    try:
        wait_port(port)
        t = TERMINALS_BY_TID["10000001"]
        term = TerminalClient("127.0.0.1", port, t.tid, t.mid, bytes.fromhex(t.tmk_hex or ""))
        codes: list[str] = []
        async with term.connect():
            assert (await term.sign_on("003")).code == "00"
            before = await term.balance(CARD, pin="123456", expiry="3012")
            assert before.code == "00"

            async def load() -> None:
                for _ in range(60):  # bounded: 60 purchases of 1 fen, one connection
                    codes.append((await term.consume(CARD, 1, pin="123456", expiry="3012")).code)

            async with anyio.create_task_group() as tg:
                tg.start_soon(load)
                await anyio.sleep(0.2)
                config(cfg, tmp_path, port, metrics, icbc2)
                serve.send_signal(signal.SIGHUP)
                await anyio.sleep(0.5)
                # a broken file on the next SIGHUP is logged and the running configuration kept
                cfg.write_text("[switch]\nport = \"broken\"\n", encoding="utf-8")
                serve.send_signal(signal.SIGHUP)
            after = await term.balance(CARD, pin="123456", expiry="3012")
        notes = [r[0] for r in __import__("sqlite3").connect(str(tmp_path / "switch.db")).execute("SELECT note FROM journal WHERE response_code != '00'")]
        assert codes == ["00"] * 60, (sorted(set(codes)), notes)  # nothing dropped while the issuer moved
        assert after.code == "00"
        # the second issuer process has its own books: after the move, the balance comes from it
        moved = 100_000_000 - int(str(after.fields[54])[8:])
        assert moved < 100_000_000 - int(str(before.fields[54])[8:]) + 60
        assert serve.poll() is None
    finally:
        errs = [reap(p) for p in reversed(procs)]
    log = errs[0].decode()
    assert "reloaded" in log and "not reloaded" in log
