"""Picking up back-office changes in a running switch (merchants and terminals added, disabled,
enabled, upgraded by ``switch merchant`` / ``switch terminal``).

The back office bumps ``meta.change_seq`` and stamps the rows it changed; the switch polls that
number and reloads only those rows. Working keys are taken from the store when another process
issued or revoked them (their commit stamps the row too), never over this process's own change
still in flight; the batch and parameters downloaded are kept from memory; what the back office
owns (state, merchant, role, limits, fee, name) is taken from the store. A change to what
parameter download reports makes the merchant's terminals see header digit 6 = ``1`` (§9.3).
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from switch.pipeline.context import SwitchState

log = logging.getLogger("switch.reload")

POLL_SECONDS = 0.5


def reload_changes(state: SwitchState, seen: int) -> int:
    store = state.store
    assert store is not None
    rows = store.query("SELECT value FROM meta WHERE key = 'change_seq'")
    seq = int(rows[0]["value"]) if rows else 0
    if seq == seen:
        return seen
    changed_merchants = store.load_merchants("change_seq > ?", (seen,), reader=True)
    if changed_merchants and state.outbox is not None:
        state.outbox.refresh()  # webhook URLs may have changed
    for mid, m in changed_merchants.items():
        cur = state.merchants.get(mid)
        if cur is None:
            state.merchants[mid] = m
            continue
        if (cur.shop_name, cur.fee_rate, cur.monthly_limit_fen) != (m.shop_name, m.fee_rate, m.monthly_limit_fen):
            cur.params_version = max(cur.params_version, m.params_version) + 1
        cur.kind, cur.shop_name, cur.state = m.kind, m.shop_name, m.state
        cur.fee_rate, cur.monthly_limit_fen = m.fee_rate, m.monthly_limit_fen
    for tid, t in store.load_terminals("change_seq > ?", (seen,), reader=True).items():
        cur_t = state.terminals.get(tid)
        if cur_t is None:
            state.terminals[tid] = t
            continue
        cur_t.mid, cur_t.role, cur_t.main_tid = t.mid, t.role, t.main_tid
        # Activation (awaiting -> active) is the switch's own one-way step, and its row is written
        # by the group commit after memory changed: a row read in between still says awaiting.
        # The back office never sends an active terminal back to awaiting (only to disabled).
        if not (cur_t.state == "active" and t.state == "awaiting_activation"):
            cur_t.state = t.state
        if t.tmk is not None and t.tmk != cur_t.tmk:  # an operator loaded a new TMK
            cur_t.tmk = t.tmk
        # working keys another process issued or revoked (a sign-on, sign-off, MAC failure limit):
        # the old ones stop working here too (§8), unless this process's own change is in flight
        if not cur_t.keys_pending and (t.key_mode, t.pik, t.mak, t.tdk) != (
            cur_t.key_mode, cur_t.pik, cur_t.mak, cur_t.tdk
        ):
            cur_t.key_mode, cur_t.pik, cur_t.mak, cur_t.tdk = t.key_mode, t.pik, t.mak, t.tdk
            cur_t.mac_failures.clear()
    log.info("back-office changes up to #%d loaded", seq)
    return seq


async def watch_changes(state: SwitchState, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    seen = _current(state)  # everything up to now was loaded at start-up
    task_status.started()
    while True:
        await anyio.sleep(POLL_SECONDS)
        try:
            seen = reload_changes(state, seen)
            assert state.store is not None
            state.store.refresh_master_key()
        except Exception:
            log.exception("reloading back-office changes failed; will retry")


def _current(state: SwitchState) -> int:
    assert state.store is not None
    rows = state.store.query("SELECT value FROM meta WHERE key = 'change_seq'")
    return int(rows[0]["value"]) if rows else 0
