"""Scale-out soak (docs/scale-out.md): two ``switch serve`` processes on one PostgreSQL behind a
round-robin TCP balancer (tests/e2e/tcp_lb.py), driven with the bench generator (bench/loadgen.py,
consumes from several terminals, bounded in count and time), one process killed with SIGKILL in the
middle of the run.

Phase 1 runs until the kill and on (the terminals whose connections the dead process held lose
them); phase 2 reconnects every terminal through the balancer, which now lands them all on the
survivor (terminals moving between processes: it signs them on and serves them); then the killed
process is restarted, as a release or a supervisor would, and reverses through store-and-forward
what reached an issuer without an outcome in the journal. Afterwards:

* every answered request matches its journal row (response code, amount, RRN) — an answer never
  exists without its row, even from the process that was killed;
* the journal holds no row for a request that was not sent, and its approvals beyond the answered
  ones are at most the requests that were in flight on the killed process;
* the mock issuers' books (card balances asked through the balancer) moved by exactly the approved
  amounts in the journal;
* the monthly-limit usage the database keeps equals the approved amounts in the journal (nothing
  counted twice), and reservations left behind are at most the requests lost with the process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

import bench.loadgen as loadgen
from bench.harness import Books, _activate
from bench.wire import CARDS
from switch.adapters.pg_store import open_store_for
from switch.admin import open_store
from switch.admin.onboarding import add_terminal, set_terminal_state
from switch.app import load_master_key, seed_demo
from switch.crypto.activation import generate_terminal_key
from switch.demo_fixture import TERMINALS_BY_TID
from switch.issuers.cards import demo_issuers
from switch.pipeline.limits import COUNTED
from switch.pos.client import TerminalClient
from switch.pos.receipt import mask_pan

from procs import free_port, reap, wait_port
from tests.adapters.pg_cluster import pg_cluster, pg_database  # noqa: F401  (fixtures)

from .tcp_lb import TcpBalancer

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.postgres, pytest.mark.crash]

TERMINALS = 4
KILL_AFTER = 40  # answers in phase 1 before process A is killed
PHASE1 = ["--duration", "5", "--max-requests", "600", "--stan-base", "100", "--stan-span", "5000"]
PHASE2 = ["--duration", "2", "--max-requests", "200", "--stan-base", "10000", "--stan-span", "5000"]
SETTLE_S = 20.0  # bound on waiting for store-and-forward to finish after the restart
M2 = "898310058120002"


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("SWITCH_MASTER_KEY", "SWITCH_STORE_DSN")}


@dataclass
class Cluster:
    """Mock issuers and the switch processes of one test; logs go to files (a pipe would fill)."""

    tmp: Path
    dsn: str
    issuers: dict[str, int] = field(default_factory=dict)
    configs: list[Path] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)
    log_of: dict[str, Path] = field(default_factory=dict)

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.{len(self.logs)}.log"
        self.logs.append(log)
        self.log_of[name] = log
        with open(log, "wb") as err:
            p = subprocess.Popen([sys.executable, "-m", "switch.cli", *args], env=env(),
                                 stdout=subprocess.DEVNULL, stderr=err)
        self.procs[name] = p
        return p

    def write_config(self, i: int) -> None:
        port, metrics = free_port(), free_port()
        fixture = demo_issuers()
        routes = "".join(
            f'[[issuers]]\nname = "{n}"\nport = {p}\nprefixes = [{", ".join(repr(x) for x in fixture[n].prefixes)}]\n'
            for n, p in self.issuers.items()
        ).replace("'", '"')
        cfg = self.tmp / f"switch-{i}.toml"
        cfg.write_text(
            f'[switch]\nport = {port}\nmetrics_port = {metrics}\nadmin_port = 0\nportal_port = 0\n'
            f'data_dir = "{self.tmp}"\nlog_format = "text"\nlog_level = "INFO"\n'
            f'[store]\ndsn = "{self.dsn}"\n[timeouts]\nissuer = 2.0\norphan_intent = 5.0\n{routes}',
            encoding="utf-8",
        )
        self.configs.append(cfg)
        self.ports.append(port)

    def start_switch(self, i: int) -> None:
        self.spawn(f"switch-{i}", "serve", "--config", str(self.configs[i]))

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            reap(p)

    def tracebacks(self) -> list[str]:
        return [f"{log.name}: {log.read_text(errors='replace')[-2000:]}" for log in self.logs
                if "Traceback" in log.read_text(errors="replace")]


@contextmanager
def cluster(tmp: Path, dsn: str) -> Iterator[Cluster]:
    store = open_store_for(dsn, load_master_key(tmp, create=True))
    try:
        seed_demo(store)
    finally:
        store.close()
    c = Cluster(tmp, dsn)
    try:
        for name in ("ICBC", "CMB"):
            c.issuers[name] = free_port()
            c.spawn(name, "issuer", "--name", name, "--port", str(c.issuers[name]))
        for i in (0, 1):
            c.write_config(i)
        for port in c.issuers.values():
            wait_port(port)
        for i in (0, 1):
            c.start_switch(i)
        for port in c.ports:
            wait_port(port, timeout=30)
        yield c
    finally:
        c.stop()


@dataclass
class Recorder:
    """Wraps bench.loadgen.call: every request sent and every answer, by (TID, STAN)."""

    kill: Any = None  # called once after KILL_AFTER answers
    sent: dict[tuple[str, str], tuple[str, int | None]] = field(default_factory=dict)
    answered: dict[tuple[str, str], dict[int, str]] = field(default_factory=dict)
    answered_after_kill: int = 0
    killed: bool = False

    def wrap(self, original: Any) -> Any:
        async def call(run: Any, term: Any, txn: str, stan: int, frame: bytes, t_sched: float | None,
                       amount_fen: int | None) -> dict[int, str] | None:
            key = (term.spec.tid, f"{stan:06d}")
            self.sent[key] = (txn, amount_fen)
            fields: dict[int, str] | None = await original(run, term, txn, stan, frame, t_sched, amount_fen)
            if fields is not None:
                self.answered[key] = fields
                if self.killed:
                    self.answered_after_kill += 1
                elif len(self.answered) >= KILL_AFTER and self.kill is not None:
                    self.killed = True
                    self.kill()
            return fields

        return call


async def wait_loaded(log: Path, dsn: str, timeout: float = 10.0) -> None:
    """Until the process writing ``log`` loaded the back-office changes made so far. (An activation
    racing a process's reload of that terminal's row can be undone in that process's memory: the
    reload reads the row before the activation's commit — a switch/pipeline race not covered here.)"""
    with psycopg.connect(dsn) as db:
        seq = int(db.execute("SELECT value FROM meta WHERE key = 'change_seq'").fetchone()[0])  # type: ignore[index]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        loaded = re.findall(r"back-office changes up to #(\d+) loaded", log.read_text(errors="replace"))
        if any(int(n) >= seq for n in loaded):
            return
        await anyio.sleep(0.1)
    raise AssertionError(f"{log.name}: change #{seq} not loaded")


async def onboard(c: Cluster, n: int) -> list[dict[str, str]]:
    """bench.harness.onboard_terminals in two steps: the back office adds n - 1 secondaries of M2
    on the database, then (once process 0 loaded them) they activate on process 0 (§9.1)."""
    main = TERMINALS_BY_TID["20000001"]
    with open_store(c.tmp) as store:  # SWITCH_STORE_DSN names the database
        codes = [add_terminal(store, mid=M2, role="secondary", main_tid=main.tid, device_serial=f"SOAK-{i}")[1]
                 for i in range(n - 1)]
    await wait_loaded(c.log_of["switch-0"], c.dsn)
    key = generate_terminal_key()
    out = [{"tid": main.tid, "mid": main.mid, "tmk": main.tmk_hex or ""}]
    for i, code in enumerate(codes):
        tid, mid, tmk = await _activate(c.ports[0], code, i + 1, key)
        out.append({"tid": tid, "mid": mid, "tmk": tmk.hex().upper()})
    return out


async def generate(port: int, terminals_file: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    args = loadgen.parse_args(["--port", str(port), "--terminals", str(TERMINALS), "--terminals-file",
                               str(terminals_file), "--mode", "closed", "--mix", "consume", "--drain", "5",
                               "--out", str(out), *extra])
    result: dict[str, Any] = await loadgen.generate(args)
    return result


def journal(dsn: str, tids: list[str], after_id: int) -> dict[tuple[str, str], dict[str, Any]]:
    with psycopg.connect(dsn) as db:
        cur = db.execute(
            "SELECT tid, stan, txn, response_code, amount_fen, rrn, pan_masked, state FROM journal"
            " WHERE id > %s AND tid = ANY(%s) AND dup_key IS NOT NULL AND mti = '0200'", (after_id, tids))
        names = [d.name for d in cur.description or ()]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        assert (r["tid"], r["stan"]) not in out, f"two journal rows for {r['tid']}/{r['stan']}"
        out[(r["tid"], r["stan"])] = r
    return out


def settled(dsn: str) -> bool:
    with psycopg.connect(dsn) as db:
        pending = db.execute("SELECT COUNT(*) FROM saf_queue WHERE state = 'pending'").fetchone()
        intents = db.execute("SELECT COUNT(*) FROM intents").fetchone()
    return pending == (0,) and intents == (0,)


async def test_two_processes_behind_a_balancer_one_killed(tmp_path: Path, pg_database: str,  # noqa: F811
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    monkeypatch.setattr(loadgen, "call", recorder.wrap(loadgen.call))
    with ExitStack() as stack:
        c = stack.enter_context(cluster(tmp_path, pg_database))
        async with TcpBalancer([("127.0.0.1", p) for p in c.ports]) as lb:
            # terminals onboarded through the back office on the database and activated (§9.1) on
            # process 0 (process 1 learns them at its change poll: test_an_activation_reaches_the_other_process)
            monkeypatch.setenv("SWITCH_STORE_DSN", pg_database)
            monkeypatch.delenv("SWITCH_MASTER_KEY", raising=False)
            terminals = await onboard(c, TERMINALS)
            # ... which is a release of process 1: drained at the balancer, SIGTERM (it finishes what
            # it has in flight and exits 0), started again, back in the balancer
            one = ("127.0.0.1", c.ports[1])
            lb.drain(one)
            assert reap(c.procs["switch-1"]) == b"" and c.procs["switch-1"].returncode == 0
            c.start_switch(1)
            wait_port(c.ports[1], timeout=30)
            lb.undrain(one)
            tids = [t["tid"] for t in terminals]
            terminals_file = tmp_path / "terminals.json"
            terminals_file.write_text(json.dumps(terminals))
            with psycopg.connect(pg_database) as db:
                start_id = int(db.execute("SELECT COALESCE(MAX(id), 0) FROM journal").fetchone()[0])  # type: ignore[index]
            books = Books(tmp_path, lb.port)
            before = await books.balances()

            victim = c.procs["switch-0"]
            recorder.kill = lambda: os.kill(victim.pid, signal.SIGKILL)
            phase1 = await generate(lb.port, terminals_file, tmp_path / "phase1.json", PHASE1)
            assert recorder.killed and victim.wait(10) == -signal.SIGKILL
            phase2 = await generate(lb.port, terminals_file, tmp_path / "phase2.json", PHASE2)

            # the killed process comes back (a supervisor, a release) and settles what it left
            c.start_switch(0)
            wait_port(c.ports[0], timeout=30)
            deadline = time.monotonic() + SETTLE_S
            while not settled(pg_database) and time.monotonic() < deadline:
                await anyio.sleep(0.2)
            assert settled(pg_database), "store-and-forward did not finish"
            after = await books.balances()
        c.stop()
        assert not c.tracebacks(), c.tracebacks()

    # traffic went on after the kill, on the surviving process, for every terminal
    assert recorder.answered_after_kill > 0
    assert phase2["answered"] > 0 and phase2["connection_failures"] == 0 and phase2["lost"] == 0
    served_in_phase2 = {tid for (tid, stan) in recorder.answered if int(stan) >= 10000}
    assert served_in_phase2 == set(tids)
    lost_to_the_kill = len(recorder.sent) - len(recorder.answered)
    assert lost_to_the_kill <= TERMINALS  # one in flight per terminal at most (closed loop)
    assert lb.stats.connect_failures[("127.0.0.1", c.ports[0])] >= 1  # phase 2 skipped the dead one

    rows = journal(pg_database, tids, start_id)
    # every answer has its journal row, with the same outcome
    for key, fields in recorder.answered.items():
        row = rows.get(key)
        assert row is not None, f"answered {key} without a journal row"
        txn, amount = recorder.sent[key]
        assert (row["txn"], row["response_code"], row["amount_fen"]) == (txn, fields.get(39), amount), key
        if fields.get(39) == "00":
            assert row["rrn"] == fields.get(37)
    # no phantom rows; approvals beyond the answered ones only from requests lost with the process
    assert set(rows) <= set(recorder.sent)
    unanswered_approved = [k for k, r in rows.items() if k not in recorder.answered and r["response_code"] == "00"]
    assert len(unanswered_approved) <= lost_to_the_kill
    approved = [r for r in rows.values() if r["response_code"] == "00"]
    assert len(approved) >= len(recorder.answered) * 9 // 10 and len(approved) > KILL_AFTER

    # the issuers' books: each card moved by exactly the approved amounts the journal holds
    def card(masked: str) -> tuple[str, str]:  # the slip and the journal mask with different widths
        return masked[:6], masked[-4:]

    expected: dict[tuple[str, str], int] = {card(mask_pan(c.pan)): 0 for c in CARDS}
    for r in approved:
        expected[card(r["pan_masked"])] -= int(r["amount_fen"])
    moved = {card(pan): after[pan] - before[pan] for pan in before}
    assert moved == expected, (moved, expected, phase1["by_txn"], phase2["by_txn"])

    # the limit usage: the journal's approved amounts, once
    with psycopg.connect(pg_database) as db:
        months = db.execute("SELECT DISTINCT substr(business_date, 1, 6) FROM journal WHERE id > %s AND mid = %s",
                            (start_id, M2)).fetchall()
        assert len(months) == 1, months
        journal_fen = db.execute(
            "SELECT COALESCE(SUM(amount_fen), 0) FROM journal WHERE mid = %s AND substr(business_date, 1, 6) = %s"
            " AND txn = ANY(%s) AND state = 'approved' AND dup_key IS NOT NULL",
            (M2, months[0][0], sorted(COUNTED))).fetchone()
        usage = db.execute("SELECT used_fen FROM limit_usage WHERE mid = %s AND month = %s",
                           (M2, months[0][0])).fetchone()
        left = db.execute("SELECT COUNT(*) FROM limit_reservations WHERE mid = %s", (M2,)).fetchone()
    assert usage is not None and journal_fen is not None and int(usage[0]) == int(journal_fen[0])
    assert left is not None and int(left[0]) <= lost_to_the_kill


async def test_an_activation_reaches_the_other_process(tmp_path: Path, pg_database: str,  # noqa: F811
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminal the back office added (and the other process loaded, awaiting activation)
    activates through one process, and its sign-on lands on the other: the other process must
    accept it (within a few of its 0.5 s change polls)."""
    monkeypatch.setenv("SWITCH_STORE_DSN", pg_database)
    monkeypatch.delenv("SWITCH_MASTER_KEY", raising=False)
    marker = TERMINALS_BY_TID["10000002"]  # disabled after the add: once process 1 refuses it, it loaded the add
    with cluster(tmp_path, pg_database) as c:
        with open_store(tmp_path) as store:
            _, code = add_terminal(store, mid=M2, role="secondary", main_tid="20000001", device_serial="SN-X")
            set_terminal_state(store, marker.tid, "disabled")
        probe = TerminalClient("127.0.0.1", c.ports[1], marker.tid, marker.mid, bytes.fromhex(marker.tmk_hex or ""))
        probe.next_stan = 900
        deadline = time.monotonic() + 5.0
        seen = ""
        while seen != "97" and time.monotonic() < deadline:
            async with probe.connect():
                seen = (await probe.echo_test()).code
            await anyio.sleep(0.1)
        assert seen == "97", "process 1 did not load the back-office changes"
        tid, mid, tmk = await _activate(c.ports[0], code, 1, generate_terminal_key())
        client = TerminalClient("127.0.0.1", c.ports[1], tid, mid, tmk)
        client.next_stan = 500
        codes: list[str] = []
        deadline = time.monotonic() + 3.0  # six change polls of process 1
        while time.monotonic() < deadline:
            async with client.connect():
                codes.append((await client.sign_on("003")).code)
            if codes[-1] == "00":
                break
            await anyio.sleep(0.25)
        c.stop()
        assert not c.tracebacks(), c.tracebacks()
    assert codes[-1] == "00", codes
