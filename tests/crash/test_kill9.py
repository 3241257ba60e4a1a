"""Crash safety (kill -9 under load): the switch and the mock issuers run as separate processes;
the switch is killed with SIGKILL while terminals have requests in flight, then restarted on the
same store. Afterwards:
- every response a terminal received is in the journal with the same outcome;
- the terminals reverse what they never got an answer to (§11, reason 98), as real terminals do;
- requests that reached the issuer but whose outcome never reached the journal are reversed by
  store-and-forward from the write-ahead intents;
- so the issuer's books move by exactly the approved, unreversed amounts of the journal, and the
  monthly-limit usage rebuilt from the journal equals them too."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from switch.adapters.sqlite_store import SqliteStore
from switch.app import load_master_key, seed_demo
from switch.demo_fixture import TERMINALS_BY_TID
from switch.pos.client import TerminalClient, TerminalError

from procs import free_port, reap, spawn, wait_port

pytestmark = [pytest.mark.anyio, pytest.mark.crash]

CARD = "6222029375642931684"  # ICBC, 1,000,000.00
START_FEN = 100_000_000
TIDS = ("10000001", "10000002", "20000001")


def db_rows(data: Path, sql: str, params: tuple = ()) -> list[tuple]:
    db = sqlite3.connect(f"file:{data / 'switch.db'}?mode=ro", uri=True)
    try:
        return list(db.execute(sql, params))
    finally:
        db.close()


def client(port: int, tid: str, first_stan: int) -> TerminalClient:
    t = TERMINALS_BY_TID[tid]
    c = TerminalClient("127.0.0.1", port, tid, t.mid, bytes.fromhex(t.tmk_hex or ""), timeout=10)
    c.next_stan = first_stan
    return c


def seeded_switch(data: Path, issuer_timeout: float) -> tuple[int, int, int]:
    """A data directory with the §14 fixture and a switch.toml routing ICBC (622202) to a free
    port; returns (terminal port, metrics port, ICBC port)."""
    store = SqliteStore(data / "switch.db", load_master_key(data, create=True))
    store.open()
    seed_demo(store)
    store.close()
    port, metrics, icbc = free_port(), free_port(), free_port()
    (data / "switch.toml").write_text(
        f'[switch]\nport = {port}\nmetrics_port = {metrics}\ndata_dir = "{data}"\nlog_format = "text"\n'
        f'[timeouts]\nissuer = {issuer_timeout}\n[[issuers]]\nname = "ICBC"\nport = {icbc}\nprefixes = ["622202"]\n',
        encoding="utf-8",
    )
    return port, metrics, icbc


async def test_kill9_under_load_loses_nothing(tmp_path: Path) -> None:
    port, metrics, icbc = seeded_switch(tmp_path, 3.0)
    issuer = spawn("issuer", "--name", "ICBC", "--port", str(icbc))
    switch = spawn("serve", "--config", str(tmp_path / "switch.toml"))
    try:
        wait_port(icbc)
        wait_port(port)
        terms = [client(port, tid, 1 + 100_000 * i) for i, tid in enumerate(TIDS)]
        received: dict[str, tuple[str, str]] = {}  # RRN -> (code, amount)
        unanswered: list[tuple[TerminalClient, dict]] = []
        killed = anyio.Event()

        async def worker(term: TerminalClient, n: int) -> None:
            amount = 1 + n  # distinct small amounts per worker
            while not killed.is_set():
                fields = term.card_fields(processing_code="000000", type_code="22", card=CARD,
                                          amount_fen=amount, pin="123456", expiry="3012")
                try:
                    r = await term.send_fields("0200", fields)
                except (TerminalError, OSError, TimeoutError, anyio.BrokenResourceError,
                        anyio.ClosedResourceError, anyio.EndOfStream):
                    unanswered.append((term, fields))
                    return
                received[str(r.fields[37])] = (r.code, str(r.fields[4]))

        async def run_terminal(term: TerminalClient) -> None:
            try:
                async with term.connect():
                    assert (await term.sign_on("003")).code == "00"
                    async with anyio.create_task_group() as tg:
                        for n in range(4):  # four requests in flight per terminal
                            tg.start_soon(worker, term, n)
            except (TerminalError, OSError, anyio.BrokenResourceError, anyio.ClosedResourceError,
                    anyio.EndOfStream, ExceptionGroup):
                pass

        async def killer() -> None:
            await anyio.sleep(1.5)
            switch.send_signal(signal.SIGKILL)  # no drain, no flush: a real crash
            killed.set()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for term in terms:
                    tg.start_soon(run_terminal, term)
                tg.start_soon(killer)
        switch.wait(10)
        assert len(received) > 20, "the load did not get going before the kill"

        # restart on the same store
        switch = spawn("serve", "--config", str(tmp_path / "switch.toml"))
        wait_port(port)
        # the terminals reverse what they never got an answer to (reason 98)
        for term, fields in unanswered:
            async with term.connect():
                rev = await term.reversal(fields, "98")
            assert rev.code in ("00", "25"), rev.code
        # store-and-forward delivers every queued reversal
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not db_rows(tmp_path, "SELECT 1 FROM saf_queue WHERE state = 'pending'") and \
                    not db_rows(tmp_path, "SELECT 1 FROM intents"):
                break
            await anyio.sleep(0.2)
        assert not db_rows(tmp_path, "SELECT id, last_response FROM saf_queue WHERE state != 'done'")

        # 1. every response a terminal received is in the journal with the same outcome
        journal = {rrn: (rc, amount) for rrn, rc, amount in db_rows(
            tmp_path, "SELECT rrn, response_code, amount_fen FROM journal WHERE txn = 'consume'")}
        for rrn, (code, amount) in received.items():
            assert rrn in journal, f"RRN {rrn} answered but not journaled"
            assert journal[rrn][0] == code and journal[rrn][1] == int(amount)

        # 2. the issuer moved by exactly the approved, unreversed amounts
        approved = sum(a for (a,) in db_rows(
            tmp_path, "SELECT amount_fen FROM journal WHERE txn = 'consume' AND state = 'approved'"))
        probe = client(port, "10000001", 900_000)
        async with probe.connect():
            assert (await probe.sign_on("003")).code == "00"
            bal = await probe.balance(CARD, pin="123456", expiry="3012")
        assert bal.code == "00"
        assert START_FEN - int(str(bal.fields[54])[8:]) == approved

        # 3. limits rebuilt from the journal count each approved amount once
        rebuilt = SqliteStore(tmp_path / "switch.db", load_master_key(tmp_path, create=False))
        rebuilt.open()
        try:
            from switch.pipeline.limits import MonthlyLimits

            limits = MonthlyLimits()
            limits.load(rebuilt)
            assert sum(limits.used.values()) == approved
        finally:
            rebuilt.close()
    finally:
        reap(switch)
        reap(issuer)
