"""Batch settlement (§9.4) when one batch's settlement reaches the switch more than once at the
same time — two requests (different STANs) at one process, or at two processes sharing the store
(issue 7): the first recorded answer is every request's answer (39 ``00``, the same F48, as a
retransmission is answered, §11), there is one settlements row and the batch closes once.

A second "process" is a second SwitchState and TransactionManager on a second SqliteStore on the
same database file, with its own group-commit writer.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from switch.adapters.sqlite_store import SqliteStore
from switch.pipeline.context import SwitchState
from switch.pipeline.manager import TransactionManager
from switch.pos.client import TerminalClient
from tests.manager_io import round_trip
from tests.manager_io import second_process as shared_second_process

if TYPE_CHECKING:  # fixtures come from conftest.py; its classes are imported for typing only
    from conftest import Harness

pytestmark = pytest.mark.anyio

CARD = "6222029375642931684"  # ICBC (§14)


def settlement(client: TerminalClient, debit: int, dn: int, batch: str | None = None) -> dict:
    f48 = f"{debit:012d}{dn:03d}{0:012d}{0:03d}0" + "0" * 31
    return {11: client.take_stan(), 41: client.tid, 42: client.mid, 48: f48, 49: "156",
            60: f"00{batch or client.batch}201"}


async def through(manager: TransactionManager, raw: bytes) -> tuple[str, str]:
    """One frame through ``manager``: (F39, F48) of the 0510."""
    mti, fields = await round_trip(manager, raw)
    assert mti == "0510"
    return str(fields[39]), str(fields.get(48, ""))


def second_process(h: Harness, tmp_path: Path) -> AbstractAsyncContextManager[tuple[TransactionManager, SwitchState]]:
    return shared_second_process(h.state, tmp_path / "switch.db", h.metrics)


async def consume(h: Harness, client: TerminalClient, amount: int) -> None:
    f = client.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=amount,
                           pin="123456", expiry="3012")
    assert (await h.send(client, "0200", f, mac=True)).code == "00"


async def test_two_settlements_of_one_batch_at_once_get_the_first_answer(harness: Harness) -> None:
    """Two 0500s for the open batch (the terminal retried with a new STAN) handled concurrently
    by one process: both 00 with one F48, one settlements row, the batch closed once."""
    t = await harness.ready()
    await consume(harness, t, 700)
    frames = [t.build_frame("0500", settlement(t, 700, 1), mac=False)[0],
              t.build_frame("0500", settlement(t, 999, 9), mac=False)[0]]  # unbalanced: would answer 2
    got: list[tuple[str, str]] = []

    async def send(raw: bytes) -> None:
        got.append(await through(harness.manager, raw))

    async with anyio.create_task_group() as tg:
        for raw in frames:
            tg.start_soon(send, raw)
    assert [code for code, _ in got] == ["00", "00"]
    assert got[0][1] == got[1][1]
    rows = harness.store.query("SELECT response_f48 FROM settlements WHERE tid = ?", (t.tid,))
    assert [r["response_f48"] for r in rows] == [got[0][1]]
    assert harness.store.load_terminals()[t.tid].batch_no == 2


async def test_a_batch_settled_at_another_process_is_answered_as_recorded(harness: Harness, tmp_path: Path) -> None:
    """Process A settles batch 1 (balanced); process B, which still holds batch 1 open in memory,
    gets another settlement of batch 1 with other totals: it answers A's recorded F48 (not its own
    computation, not an error), writes no second row, and its terminal moves to batch 2."""
    t = await harness.ready()
    await consume(harness, t, 700)
    async with second_process(harness, tmp_path) as (other, other_state):
        assert other_state.terminals[t.tid].batch == "000001"
        first = await through(harness.manager, t.build_frame("0500", settlement(t, 700, 1), mac=False)[0])
        assert first[0] == "00" and first[1][30] == "1"  # balanced
        assert other_state.terminals[t.tid].batch == "000001"  # B has not heard of it
        second = await through(other, t.build_frame("0500", settlement(t, 123, 4), mac=False)[0])
        assert second == first
        assert other_state.terminals[t.tid].batch == "000002"
    assert harness.store.query("SELECT COUNT(*) AS n FROM settlements")[0]["n"] == 1


async def test_a_settlement_recorded_without_its_commit_closes_the_batch_on_the_retry(harness: Harness) -> None:
    """The settlement row is recorded before the answer; if the process died before the journal
    commit that closes the batch, the terminal's retry gets the recorded answer and closes it."""
    t = await harness.ready()
    recorded = "000000000000000000000000000000" + "1" + "0" * 30 + "1"
    harness.store.record_settlement(t.tid, t.batch, "20250301", "0" * 62, recorded, "1", "earlier")
    assert harness.state.terminals[t.tid].batch == "000001"
    code, f48 = await through(harness.manager, t.build_frame("0500", settlement(t, 5, 1), mac=False)[0])
    assert (code, f48) == ("00", recorded)
    assert harness.store.load_terminals()[t.tid].batch_no == 2
    assert (await harness.sign_on(t)).fields[60] == "00000002003"
