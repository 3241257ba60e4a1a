"""A restart keeps the journal and the working keys; SIGTERM drains and exits cleanly."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from .conftest import DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CARD = "6222029375642931684"


def journal_rows(data_dir: Path) -> list[tuple[str, str, str]]:
    db = sqlite3.connect(f"file:{data_dir / 'switch.db'}?mode=ro", uri=True)
    try:
        return list(db.execute("SELECT txn, stan, response_code FROM journal ORDER BY id"))
    finally:
        db.close()


async def test_restart_keeps_journal_and_keys(tmp_path: Path) -> None:
    sw = DemoSwitch(tmp_path)
    sw.start()
    try:
        term = sw.terminal()
        async with term.connect():
            await term.sign_on("003")
            first = await term.consume(CARD, 2500, pin="123456", expiry="3012")
        assert first.code == "00"
        assert sw.stop() == 0
        assert "draining" in sw.log_text()
        rows = journal_rows(tmp_path)
        first_stan = int(str(first.fields[11]))
        assert ("sign_on", f"{first_stan - 1:06d}", "00") in rows and ("consume", f"{first_stan:06d}", "00") in rows

        again = DemoSwitch(tmp_path)
        again.start()
        try:
            term.port = again.port
            async with term.connect():  # no new sign-on: the keys survived the restart
                r = await term.consume(CARD, 2600, pin="123456", expiry="3012")
            assert r.code == "00" and r.mac_ok
            assert r.fields[37] != first.fields[37]  # RRNs stay unique across restarts
        finally:
            again.stop()
        rows = journal_rows(tmp_path)
        assert rows[:2] == [("sign_on", f"{first_stan - 1:06d}", "00"), ("consume", f"{first_stan:06d}", "00")]
        assert ("consume", f"{first_stan + 1:06d}", "00") in rows
    finally:
        sw.kill()


async def test_sigterm_finishes_in_flight_requests(tmp_path: Path) -> None:
    """A request waiting on the slow issuer when SIGTERM arrives still gets its answer (98)."""
    sw = DemoSwitch(tmp_path)
    sw.start()
    try:
        term = sw.terminal()
        codes: list[str] = []
        async with term.connect():
            await term.sign_on("003")

            async def slow() -> None:
                r = await term.consume("6228489187204683748", 100, pin="123456", expiry="3012", timeout=15)
                codes.append(r.code)

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await anyio.sleep(0.5)  # the request is now at the slow issuer
                assert sw.proc is not None
                sw.proc.terminate()
        assert codes == ["98"]
        stan = f"{term.next_stan - 1:06d}"
        assert sw.proc is not None
        assert await anyio.to_thread.run_sync(sw.proc.wait, 20) == 0  # drained and exited by itself
        assert ("consume", stan, "98") in journal_rows(tmp_path)
    finally:
        sw.kill()
