"""Crash safety on the issuer side: the mock issuer process is killed with SIGKILL while terminals
have requests in flight, then restarted on the same port. Every terminal request gets an answer
(approved before the kill, 98/91 during the outage) on a connection that stays usable; what timed out
is queued for reversal and store-and-forward drains once the issuer is back; the link reconnects and
new purchases are approved; every answer the terminals got is in the journal with the same code.
(The mock keeps its books in memory, so a restarted issuer starts from the fixture: the books
check against the issuer is the switch-kill test's job.)"""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from switch.demo_fixture import TERMINALS_BY_TID
from switch.pos.client import TerminalClient

from procs import reap, spawn, wait_port
from tests.crash.test_kill9 import seeded_switch

pytestmark = [pytest.mark.anyio, pytest.mark.crash]

CARD = "6222029375642931684"


def rows(data: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(f"file:{data / 'switch.db'}?mode=ro", uri=True)
    try:
        return list(db.execute(sql))
    finally:
        db.close()


async def test_issuer_killed_and_restarted_mid_load(tmp_path: Path) -> None:
    port, metrics, icbc = seeded_switch(tmp_path, 1.0)
    issuer = spawn("issuer", "--name", "ICBC", "--port", str(icbc))
    switch = spawn("serve", "--config", str(tmp_path / "switch.toml"))
    try:
        wait_port(icbc)
        wait_port(port)
        t = TERMINALS_BY_TID["10000001"]
        term = TerminalClient("127.0.0.1", port, t.tid, t.mid, bytes.fromhex(t.tmk_hex or ""), timeout=10)
        answers: dict[str, str] = {}
        stop = anyio.Event()

        async def worker() -> None:
            while not stop.is_set():
                r = await term.consume(CARD, 1, pin="123456", expiry="3012")
                answers[str(r.fields[37])] = r.code

        async with term.connect():
            assert (await term.sign_on("003")).code == "00"
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for _ in range(4):
                        tg.start_soon(worker)
                    await anyio.sleep(1.0)
                    issuer.send_signal(signal.SIGKILL)
                    issuer.wait(10)
                    await anyio.sleep(2.5)  # an outage longer than the issuer timeout
                    issuer = spawn("issuer", "--name", "ICBC", "--port", str(icbc))
                    wait_port(icbc)
                    await anyio.sleep(2.0)  # the link reconnects, traffic flows again
                    stop.set()
            codes = set(answers.values())
            assert "00" in codes and codes <= {"00", "91", "98"}, codes
            assert codes & {"91", "98"}, "the outage was not seen"
            # the link is back: a new purchase is approved
            assert (await term.consume(CARD, 1, pin="123456", expiry="3012")).code == "00"

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and rows(tmp_path, "SELECT 1 FROM saf_queue WHERE state = 'pending'"):
            await anyio.sleep(0.2)
        assert not rows(tmp_path, "SELECT id FROM saf_queue WHERE state = 'pending'")
        journal = dict(rows(tmp_path, "SELECT rrn, response_code FROM journal WHERE txn = 'consume'"))
        for rrn, code in answers.items():
            assert journal.get(rrn) == code, rrn
        timed_out = rows(tmp_path, "SELECT COUNT(*) FROM journal WHERE txn = 'consume' AND response_code = '98'")[0][0]
        queued = rows(tmp_path, "SELECT COUNT(*) FROM saf_queue WHERE kind = 'reversal'")[0][0]
        assert queued >= timed_out  # every 98 was queued for reversal (and delivered: nothing pending)
    finally:
        reap(switch)
        reap(issuer)
