"""Back-office changes picked up by a running switch (switch/pipeline/reload.py), against a real
SQLite store: what the back office owns is taken from the store, what the switch owns is kept."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from switch.adapters.sqlite_store import SqliteStore
from switch.admin.onboarding import add_terminal, set_terminal_state
from switch.pipeline.reload import reload_changes

if TYPE_CHECKING:  # fixtures come from conftest.py; its classes are imported for typing only
    from conftest import Harness

pytestmark = pytest.mark.anyio

MID = "898310058120002"  # §14 enterprise merchant M2, main terminal 20000001


def _seq(h: Harness) -> int:
    return int(h.store.query("SELECT value FROM meta WHERE key = 'change_seq'")[0]["value"])


async def test_a_new_terminal_is_picked_up_awaiting_activation(harness: Harness) -> None:
    seen = _seq(harness)
    tid, _code = add_terminal(harness.store, mid=MID, role="secondary", main_tid="20000001", device_serial="SN-R1")
    assert tid not in harness.state.terminals
    assert reload_changes(harness.state, seen) > seen
    assert harness.state.terminals[tid].state == "awaiting_activation"


async def test_an_activation_not_yet_committed_is_not_undone_by_a_reload(harness: Harness) -> None:
    # The race the bench hit: the back office adds a terminal, the switch activates it (memory
    # first, the row at the next group commit), and the poll reads the row in between.
    seen = _seq(harness)
    tid, _code = add_terminal(harness.store, mid=MID, role="secondary", main_tid="20000001", device_serial="SN-R2")
    reload_changes(harness.state, seen)
    harness.state.terminals[tid].state = "active"  # what activate() does before its row commits
    reload_changes(harness.state, seen)  # the poll re-reads the (still awaiting) row
    assert harness.state.terminals[tid].state == "active"


async def test_the_back_office_still_disables_an_active_terminal(harness: Harness) -> None:
    seen = _seq(harness)
    assert harness.state.terminals["20000001"].state == "active"
    assert set_terminal_state(harness.store, "20000001", "disabled")
    reload_changes(harness.state, seen)
    assert harness.state.terminals["20000001"].state == "disabled"


def _other_process_writes_keys(h: Harness, tid: str, *, revoke: bool) -> None:
    """What another process sharing the store commits for a sign-on (new keys) or a revocation."""
    other = SqliteStore(h.store.path, h.store.master_key)
    other.open()
    try:
        t = other.load_terminals("tid = ?", (tid,))[tid]
        if revoke:
            t.revoke_keys()
        else:
            t.key_mode, t.pik, t.mak, t.tdk = "003", bytes(range(16)), bytes(range(8)), bytes(range(16))
        other.db.execute("BEGIN IMMEDIATE")
        other.op_terminal_keys(t)(other.db)
        other.db.execute("COMMIT")
    finally:
        other.close()


async def test_keys_revoked_by_another_process_stop_working_here(harness: Harness) -> None:
    client = await harness.ready("10000001")
    seen = _seq(harness)
    _other_process_writes_keys(harness, "10000001", revoke=True)  # e.g. its MAC failure limit
    reload_changes(harness.state, seen)
    assert harness.state.terminals["10000001"].mak is None
    fields = client.card_fields(processing_code="000000", type_code="22", card="6222029375642931684",
                                amount_fen=100, pin="123456", expiry="3012")
    assert (await harness.send(client, "0200", fields, mac=True)).code == "77"  # sign on first


async def test_a_reload_never_puts_older_keys_over_this_process_s_own_change(harness: Harness) -> None:
    await harness.ready("10000001")
    terminal = harness.state.terminals["10000001"]
    seen = _seq(harness)
    _other_process_writes_keys(harness, "10000001", revoke=False)
    mine = terminal.mak
    terminal.keys_pending = True  # a sign-on of ours whose row is still in the group commit
    reload_changes(harness.state, seen)
    assert terminal.mak == mine
    terminal.keys_pending = False  # committed: the store's row is now the truth
    reload_changes(harness.state, seen)
    assert terminal.mak == bytes(range(8))


async def test_a_reload_while_a_sign_on_awaits_its_rrn_keeps_the_new_keys(harness: Harness,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The race CI hit once (a consume right after a sign-on answered 77): the sign-on sets the
    # new keys in memory, then awaits a store write for its RRN block; the poll ran in that
    # await and put the row's (older) keys back before the journal commit. The change counts
    # as pending from the moment it is made.
    await harness.ready("10000001")
    terminal = harness.state.terminals["10000001"]
    seen = _seq(harness)
    _other_process_writes_keys(harness, "10000001", revoke=True)  # a row stamped after `seen`
    real_next_rrn = harness.store.next_rrn

    async def next_rrn_with_a_poll() -> str:
        reload_changes(harness.state, seen)  # the poll, run while the sign-on awaits
        return await real_next_rrn()

    monkeypatch.setattr(harness.store, "next_rrn", next_rrn_with_a_poll)
    client = harness.terminal("10000001")
    assert (await harness.sign_on(client)).code == "00"
    assert terminal.signed_on and terminal.keys_pending == 0
    fields = client.card_fields(processing_code="000000", type_code="22", card="6222029375642931684",
                                amount_fen=100, pin="123456", expiry="3012")
    assert (await harness.send(client, "0200", fields, mac=True)).code == "00"
