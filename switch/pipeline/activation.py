"""Remote activation 0800 / 60.3 ``351`` (protocol §9.1, §9.2).

F62 = the 8 ASCII digits of the one-time activation code + the terminal's RSA public key (DER
SubjectPublicKeyInfo, 2048 bits). The code finds the terminal (F41/F42 may be spaces). The switch
generates a new TMK, answers it RSA-OAEP-wrapped under the terminal's key with its check value,
the terminal's real TID and MID in 41/42 and the shop name in 63, and activates the terminal. A
wrong, used or expired code gets ``97``; from the sixth attempt after five wrong codes from one
peer address within 10 minutes, every activation from that address gets ``75``. A secondary
terminal can be activated only while its main terminal is active.

The wrong codes are counted in the store (``activation_failures``), so every switch process
sharing one database sees the same count: behind a load balancer an attacker gets five guesses
per address in total, not five per process. Recording a wrong code is an atomic count-and-insert
in the store, so two processes answering at the same moment cannot both let a sixth guess through.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import timezone
from typing import TYPE_CHECKING, Callable

from switch.adapters.sqlite_store import legacy_code_hash, next_change_seq
from switch.crypto.activation import ActivationKeyError, wrap_tmk_for_terminal
from switch.crypto.des import generate_key
from switch.domain.codes import ResultCode
from switch.domain.model import Terminal
from switch.pipeline.context import Context, SwitchState

if TYPE_CHECKING:
    from switch.adapters.sqlite_store import SqliteStore

WINDOW_SECONDS = 600.0
MAX_WRONG = 5


class ActivationGuard:
    """The §9.1 rule (``MAX_WRONG`` wrong codes per peer address over a sliding ``WINDOW_SECONDS``)
    over the wrong codes the store records. Times are wall-clock seconds (``clock``), comparable
    between processes; a correct code does not clear the count (the window does)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    def locked(self, store: SqliteStore, peer: str, now: float) -> bool:
        return store.activation_failures_since(peer, now - WINDOW_SECONDS) >= MAX_WRONG

    def wrong(self, store: SqliteStore, peer: str, now: float) -> bool:
        """Count one wrong code. False when the limit was reached meanwhile (another process
        counted the fifth first): nothing is counted and this attempt is a lockout."""
        return store.add_activation_failure(peer, now, now - WINDOW_SECONDS, MAX_WRONG)


def activate(state: SwitchState, ctx: Context) -> None:
    assert state.store is not None
    guard: ActivationGuard = state.activation_guard
    store = state.store
    peer = ctx.request.frame.peer
    now = guard.clock()
    if guard.locked(store, peer, now):
        state.metrics.activation_failure("lockout")
        ctx.decline(ResultCode.ACTIVATION_LOCKOUT, "too many wrong activation codes from this address")
        return
    f62 = ctx.request.fields.get(62)
    if not isinstance(f62, bytes):
        ctx.decline(ResultCode.FORMAT_ERROR, "F62 (code + public key) missing")
        return
    # §9.1: a code that is not 8 digits (mistyped: too short, a letter) is a wrong code, 97 and
    # counted toward the lockout like any other guess; only a missing F62 or a key that does not
    # load is a format error
    head, public_key = f62[:8], f62[8:]
    row = None
    hashes: tuple[str, ...] = ()
    if len(head) == 8 and head.isdigit():
        hashes = (state.store.code_token(head.decode()), legacy_code_hash(head.decode()))
        rows = state.store.query(
            "SELECT t.tid, t.mid, t.role, t.main_tid, t.state, t.activation_expires, m.state AS merchant_state,"
            " m.shop_name FROM terminals t JOIN merchants m ON m.mid = t.mid WHERE t.activation_code_hash IN (?, ?)",
            hashes,
        )
        row = rows[0] if rows else None
    if row is None or row["state"] != "awaiting_activation" or (row["activation_expires"] or 0) < time.time():
        if not guard.wrong(store, peer, now):
            state.metrics.activation_failure("lockout")
            ctx.decline(ResultCode.ACTIVATION_LOCKOUT, "too many wrong activation codes from this address")
            return
        state.metrics.activation_failure("wrong_code")
        ctx.decline(ResultCode.TERMINAL_INVALID, "wrong, used or expired activation code")
        return
    if row["merchant_state"] != "active":
        ctx.decline(ResultCode.MERCHANT_INVALID, "merchant disabled")
        return
    if row["role"] == "secondary":
        main = state.terminals.get(str(row["main_tid"]))
        if main is None or not main.active:
            ctx.decline(ResultCode.TERMINAL_INVALID, "the main terminal is not active (§9.2)")
            return
    tmk = generate_key(16)
    try:
        wrapped = wrap_tmk_for_terminal(tmk, public_key)
    except ActivationKeyError:
        state.metrics.activation_failure("bad_key")
        ctx.decline(ResultCode.FORMAT_ERROR, "F62 does not hold a 2048-bit RSA public key")
        return
    tid = str(row["tid"])
    # the code is used up here, once, before the answer: another request with the same code at
    # the same moment (in this process or another on the store) finds it gone. If this request's
    # journal commit then fails, the terminal needs a new code (switch terminal new-code).
    if not state.store.claim_activation_code(tid, hashes):
        ctx.decline(ResultCode.TERMINAL_INVALID, "activation code used by a concurrent request")
        return
    terminal = state.terminals.get(tid) or Terminal(tid, str(row["mid"]), str(row["role"]), row["main_tid"], "active")
    terminal.state = "active"
    terminal.tmk = tmk
    terminal.revoke_keys()
    state.terminals[tid] = terminal
    ctx.terminal = terminal
    ctx.merchant = state.merchants.get(terminal.mid)
    blob = state.store.master_key.wrap(tmk, f"tmk:{tid}")
    activated = ctx.now.astimezone(timezone.utc).isoformat()

    def op(db: sqlite3.Connection) -> None:
        # stamped like a back-office change, so every other process sharing the store reloads
        # this terminal (state and TMK) at its next change poll instead of answering its sign-on 97
        seq = next_change_seq(db)
        db.execute(
            "UPDATE terminals SET state = 'active', tmk = ?, key_mode = NULL, pik = NULL, mak = NULL,"
            " tdk = NULL, activation_code_hash = NULL, activation_expires = NULL, activated_at = ?,"
            " change_seq = ? WHERE tid = ?",
            (blob, activated, seq, tid),
        )

    ctx.store_ops.append(op)
    ctx.resp[41] = tid
    ctx.resp[42] = str(row["mid"])
    ctx.resp[62] = wrapped
    ctx.resp[63] = str(row["shop_name"])
    ctx.note = f"terminal {tid} activated"
    ctx.rc = ResultCode.APPROVED
