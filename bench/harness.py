"""The system under test and its books, as the bench orchestrator drives them.

Owns:
- ``ServerProcess``: a subprocess (``switch demo`` or ``bench.echo_server``) on free 127.0.0.1
  ports, ready once it prints its ready line, stopped with SIGTERM (killed if it hangs);
- ``onboard_terminals``: N terminals of the enterprise merchant M2 (§14; its 5,000,000.00 limit
  is never reached with fen-sized amounts): the fixture's main terminal 20000001 plus N - 1
  secondaries added through the back-office API (``switch.admin.onboarding.add_terminal``) on the
  data directory's store and activated over TCP with their one-time codes (§9.1), exactly as a
  new terminal would be. Each has its own TID, TMK, working keys and batch;
- the books: approvals and approved amounts per transaction type from the journal (the SQLite
  file of the data directory, opened read-only), and the cards' available balances (F54) asked
  through the switch with a balance inquiry from terminal 10000001 (M1, not used by the load).

Must not: write to the journal, print keys, PINs or full PANs (balances are keyed by masked PAN),
or leave a process running (``ServerProcess.stop`` always ends it).
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from bench.wire import CARDS, balance_fen
from switch.admin import open_store
from switch.core.codec import Fields
from switch.admin.onboarding import add_terminal
from switch.crypto.activation import generate_terminal_key, public_key_der, unwrap_tmk
from switch.demo_fixture import TERMINALS_BY_TID
from switch.pos.client import TerminalClient
from switch.pos.receipt import mask_pan

SWITCH_READY = re.compile(r"switch ready: terminal port (\d+), metrics port (\d+)")
ECHO_READY = re.compile(r"echo ready: port (\d+)")
MAIN_TID = "20000001"
BALANCE_TID = "10000001"
# journal txn name -> the generator's name for it (they are the same; listed to be explicit)
FINANCIAL_TXNS = ("balance_inquiry", "consume", "consume_void", "refund", "pre_auth", "completion")


@dataclass
class ServerProcess:
    """One server subprocess; ``ports`` are the numbers its ready line named."""

    argv: list[str]
    ready: re.Pattern[str]
    proc: subprocess.Popen[str] | None = None
    ports: tuple[int, ...] = ()
    output: list[str] = field(default_factory=list)
    _pump: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> tuple[int, ...]:
        env = dict(os.environ)
        env.pop("SWITCH_MASTER_KEY", None)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        got = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                if len(self.output) < 2000:
                    self.output.append(line)
                m = self.ready.search(line)
                if m and not got.is_set():
                    self.ports = tuple(int(g) for g in m.groups())
                    got.set()
            got.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not got.wait(timeout) or not self.ports:
            self.stop()
            raise RuntimeError(f"{self.argv[2:4]} did not become ready:\n" + "".join(self.output[-30:]))
        return self.ports

    def stop(self, timeout: float = 20.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._pump is not None:
            self._pump.join(5)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode


def switch_process(data_dir: Path) -> ServerProcess:
    return ServerProcess(
        [sys.executable, "-m", "switch.cli", "demo", "--port", "0", "--metrics-port", "0", "--portal-port", "-1",
         "--data-dir", str(data_dir), "--log-level", "WARNING"],
        SWITCH_READY,
    )


@dataclass
class SwitchWithIssuers:
    """``switch serve`` with the mock issuers it routes to in their own processes (the
    deployment shape: the switch process does only the switch's work), on a data directory seeded
    with the §14 fixture. Same ``start``/``stop``/``proc``/``output`` surface as ServerProcess."""

    data_dir: Path
    issuers: tuple[str, ...] = ("ICBC", "CMB")
    server: ServerProcess | None = None
    issuer_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    wrapper: tuple[str, ...] = ()  # a command the switch runs under (bench.instructions: valgrind)

    @property
    def proc(self) -> subprocess.Popen[str] | None:
        return self.server.proc if self.server else None

    @property
    def output(self) -> list[str]:
        return self.server.output if self.server else []

    def start(self, timeout: float = 60.0) -> tuple[int, ...]:
        import socket

        from switch.adapters.sqlite_store import SqliteStore
        from switch.app import load_master_key, seed_demo
        from switch.issuers.cards import demo_issuers

        def free_port() -> int:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                return int(sock.getsockname()[1])

        self.data_dir.mkdir(parents=True, exist_ok=True)
        store = SqliteStore(self.data_dir / "switch.db", load_master_key(self.data_dir, create=True))
        store.open()
        try:
            seed_demo(store)
        finally:
            store.close()
        fixture = demo_issuers()
        env = {k: v for k, v in os.environ.items() if k != "SWITCH_MASTER_KEY"}
        issuer_cfg = ""
        for name in self.issuers:
            port = free_port()
            self.issuer_procs.append(subprocess.Popen(
                [sys.executable, "-m", "switch.cli", "issuer", "--name", name, "--port", str(port)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            prefixes = ", ".join(f'"{p}"' for p in fixture[name].prefixes)
            issuer_cfg += f'[[issuers]]\nname = "{name}"\nport = {port}\nprefixes = [{prefixes}]\n'
        config = self.data_dir / "switch.toml"
        config.write_text(
            f'[switch]\nport = 0\nmetrics_port = 0\nadmin_port = 0\nportal_port = 0\n'
            f'data_dir = "{self.data_dir}"\nlog_level = "INFO"\nlog_format = "json"\n'
            f'[timeouts]\nissuer = 2.0\n{issuer_cfg}',
            encoding="utf-8",
        )
        self.server = ServerProcess([*self.wrapper, sys.executable, "-m", "switch.cli", "serve", "--config", str(config)],
                                    SWITCH_READY)
        return self.server.start(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        code = self.server.stop(timeout) if self.server else None
        for p in self.issuer_procs:
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        return code


def echo_process(mode: str) -> ServerProcess:
    return ServerProcess([sys.executable, "-m", "bench.echo_server", "--mode", mode, "--port", "0"], ECHO_READY)


async def _activate(port: int, code: str, stan: int, key: Any) -> tuple[str, str, bytes]:
    client = TerminalClient("127.0.0.1", port, " " * 8, " " * 15, bytes(16), timeout=30.0)
    fields: Fields = {11: f"{stan:06d}", 41: " " * 8, 42: " " * 15, 60: "00000000351",
              62: code.encode() + public_key_der(key)}
    async with client.connect():
        r = await client.send_fields("0800", fields, mac=False)
    blob = r.fields.get(62)
    if r.code != "00" or not isinstance(blob, bytes) or len(blob) != 260:
        raise RuntimeError(f"activation answered {r.code!r}")
    tmk = unwrap_tmk(key, blob)  # verifies the check value
    return str(r.fields[41]), str(r.fields[42]), tmk


async def onboard_terminals(data_dir: Path, port: int, n: int) -> list[dict[str, str]]:
    """``n`` active terminals of M2 with their TMKs: 20000001 and n - 1 new secondaries."""
    main = TERMINALS_BY_TID[MAIN_TID]
    assert main.tmk_hex is not None
    out = [{"tid": main.tid, "mid": main.mid, "tmk": main.tmk_hex}]
    codes: list[str] = []
    with open_store(data_dir) as store:
        for i in range(n - 1):
            _, code = add_terminal(store, mid=main.mid, role="secondary", main_tid=main.tid,
                                   device_serial=f"BENCH-{i:05d}")
            codes.append(code)
    key = generate_terminal_key()  # one RSA key for all: the terminals' key pairs are not under test
    for i, code in enumerate(codes):
        tid, mid, tmk = await _activate(port, code, i + 1, key)
        out.append({"tid": tid, "mid": mid, "tmk": tmk.hex().upper()})
    return out


class Books:
    """The journal (read-only) and the issuers' balances, before and after each phase."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.db_path = data_dir / "switch.db"
        t = TERMINALS_BY_TID[BALANCE_TID]
        assert t.tmk_hex is not None
        self.client = TerminalClient("127.0.0.1", port, t.tid, t.mid, bytes.fromhex(t.tmk_hex), timeout=30.0)
        self.client.next_stan = 1

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30.0)

    def journal_max_id(self) -> int:
        with self._db() as db:
            row = db.execute("SELECT COALESCE(MAX(id), 0) FROM journal").fetchone()
        return int(row[0])

    def journal_approvals(self, after_id: int, tids: list[str]) -> dict[str, dict[str, int]]:
        """Per financial transaction type: rows, approvals and approved fen of ``tids`` after
        ``after_id`` (duplicate-answer rows excluded; the bench sends no duplicates)."""
        marks = ",".join("?" * len(tids))
        sql = (
            "SELECT txn, COUNT(*), SUM(response_code = '00'),"
            " COALESCE(SUM(CASE WHEN response_code = '00' THEN amount_fen END), 0)"
            f" FROM journal WHERE id > ? AND tid IN ({marks}) AND COALESCE(state, '') != 'duplicate'"
            " GROUP BY txn"
        )
        with self._db() as db:
            rows = db.execute(sql, (after_id, *tids)).fetchall()
        return {str(txn): {"rows": int(c), "approved": int(a or 0), "approved_fen": int(f or 0)}
                for txn, c, a, f in rows if txn in FINANCIAL_TXNS}

    async def balances(self) -> dict[str, int]:
        """Available balance (fen) of each bench card, asked through the switch (F54)."""
        out: dict[str, int] = {}
        async with self.client.connect():
            r = await self.client.sign_on("003")
            if r.code != "00":
                raise RuntimeError(f"balance terminal sign-on answered {r.code!r}")
            for card in CARDS:
                resp = await self.client.balance(card.pan, pin=card.pin, expiry=card.expiry)
                fen = balance_fen(resp.fields.get(54))
                if resp.code != "00" or fen is None:
                    raise RuntimeError(f"balance inquiry for {mask_pan(card.pan)} answered {resp.code!r}")
                out[mask_pan(card.pan)] = fen
        return out


def check_books(gen: dict[str, Any], journal: dict[str, dict[str, int]], before: dict[str, int],
                after: dict[str, int]) -> dict[str, Any]:
    """Compare the generator's approvals with the journal's, per type (count and fen), and the
    cards' balance movement with what the approvals imply. ``ok`` only when all agree and no
    request was left unanswered (an unanswered request may have been approved)."""
    mismatches: list[str] = []
    by_txn: dict[str, Any] = {}
    names = sorted(set(gen["by_txn"]) | set(journal))
    for name in names:
        g = gen["by_txn"].get(name, {"approved": 0, "approved_fen": 0})
        j = journal.get(name, {"approved": 0, "approved_fen": 0, "rows": 0})
        by_txn[name] = {"generator_approved": g["approved"], "journal_approved": j["approved"],
                        "generator_fen": g["approved_fen"], "journal_fen": j["approved_fen"]}
        if g["approved"] != j["approved"] or g["approved_fen"] != j["approved_fen"]:
            mismatches.append(f"{name}: generator {g['approved']} approvals / {g['approved_fen']} fen,"
                              f" journal {j['approved']} / {j['approved_fen']}")
    cards: dict[str, Any] = {}
    for pan in sorted(set(before) | set(after)):
        moved = after.get(pan, 0) - before.get(pan, 0)
        expected = int(gen["expected_delta_fen"].get(pan, 0))
        cards[pan] = {"before_fen": before.get(pan), "after_fen": after.get(pan), "moved_fen": moved,
                      "expected_fen": expected}
        if moved != expected:
            mismatches.append(f"{pan}: balance moved {moved} fen, approvals imply {expected}")
    if gen["lost"] or gen["connection_failures"]:
        mismatches.append(f"{gen['lost']} unanswered and {gen['connection_failures']} failed requests")
    gen_total = sum(int(v["approved"]) for v in gen["by_txn"].values())
    journal_total = sum(v["approved"] for v in journal.values())
    return {"ok": not mismatches, "mismatches": mismatches, "generator_approvals": gen_total,
            "journal_approvals": journal_total, "by_txn": by_txn, "cards": cards}


def run_async(fn: Any, *args: Any) -> Any:
    return anyio.run(fn, *args)
