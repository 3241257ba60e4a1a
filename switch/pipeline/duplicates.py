"""Duplicates (protocol §11, §12.1 step 5).

Key = TID | batch (60.2) | STAN | MTI. A request whose bytes (MTI to the end) equal those of one
already answered gets that answer again without touching the issuer; a copy arriving while the
first is in flight waits for it. The same key with different bytes gets ``94``. The first request
stays registered in ``SwitchState.inflight`` until its journal row (holding its response) is
committed, so a copy always finds it either there or in the journal.
"""

from __future__ import annotations

import hashlib

import anyio

from switch.core.framing import ENVELOPE_LEN, TPDU_LEN, response_header
from switch.crypto.working_keys import KeyCheckError, parse_f62
from switch.domain.codes import ResultCode
from switch.pipeline.context import Context, InFlight, SwitchState

WAIT_LIMIT = 120.0  # a copy never waits longer than this for the first (bounded by issuer timeouts)


def dup_key(ctx: Context) -> str | None:
    req = ctx.request
    if not req.stan:
        return None  # an echo test may come without F11: nothing to match it on
    batch = ctx.f60.batch if ctx.f60 else ""
    if ctx.txn is not None and ctx.txn.name == "activation":
        # F41 may be spaces and factory-fresh terminals all start at the same trace number: the
        # terminal is the one its code names (§9.1, §12.1 step 2), so the code stands for the TID
        f62 = req.fields.get(62)
        code = f62[:8] if isinstance(f62, bytes) else b""
        return f"activation:{hashlib.sha256(code).hexdigest()[:16]}|{batch}|{req.stan}|{req.mti}"
    return f"{req.tid}|{batch}|{req.stan}|{req.mti}"


async def check_duplicate(state: SwitchState, ctx: Context) -> None:
    key = dup_key(ctx)
    if key is None:
        return
    digest = hashlib.sha256(ctx.request.frame.body).hexdigest()
    ctx.digest = digest
    while True:
        first = state.inflight.get(key)
        if first is None:
            break
        with anyio.move_on_after(WAIT_LIMIT):
            await first.done.wait()
        if first.digest != digest:
            _clash(state, ctx)
            return
        if first.response is not None:
            _resend(state, ctx, first.response, key)
            return
        if state.inflight.get(key) is first:  # waited too long: answer as a system error
            ctx.decline(ResultCode.SYSTEM_ERROR, "duplicate still in flight")
            return
        # the first one failed without an answer: look again
    assert state.store is not None
    rows = state.store.query(
        "SELECT request_digest, response_blob FROM journal WHERE dup_key = ? ORDER BY id LIMIT 1", (key,)
    )
    if rows:
        row = rows[0]
        if row["request_digest"] != digest or row["response_blob"] is None:
            _clash(state, ctx)
            return
        _resend(state, ctx, state.store.unwrap_response(row["response_blob"], key), key)
        return
    state.inflight[key] = InFlight(digest)
    ctx.dup_key = key


def finish(state: SwitchState, ctx: Context, response: bytes | None) -> None:
    """After the journal commit: release copies waiting on this request."""
    if ctx.dup_key is None:
        return
    entry = state.inflight.pop(ctx.dup_key, None)
    if entry is not None:
        entry.response = response
        entry.done.set()


def _clash(state: SwitchState, ctx: Context) -> None:
    state.metrics.duplicate("94")
    ctx.decline(ResultCode.DUPLICATE, "same TID, batch, STAN and MTI with different content")


def _resend(state: SwitchState, ctx: Context, response: bytes, key: str) -> None:
    """The stored answer again (§11), framed for this copy: its TPDU and header are echoed as
    §2 requires (a copy may come by another route), with the stored header digit 6."""
    state.metrics.duplicate("resent")
    frame = ctx.request.frame
    digit6 = response[2 + TPDU_LEN + 2] & 0x0F
    response = response[:2] + frame.tpdu + response_header(frame.header, digit6) + response[2 + ENVELOPE_LEN:]
    ctx.resend = response
    ctx.journal_state = "duplicate"
    ctx.note = "retransmission answered from the journal"
    if ctx.txn is not None and ctx.txn.name == "sign_on":
        _reinstall_sign_on_keys(state, ctx, response)


def _reinstall_sign_on_keys(state: SwitchState, ctx: Context, response: bytes) -> None:
    """The terminal takes the keys of the response it gets: a resent sign-on answer makes its
    keys current again, so terminal and switch agree (§8, §11)."""
    terminal = ctx.terminal
    if terminal is None or terminal.tmk is None or ctx.f60 is None:
        return
    try:
        _, fields = state.codec.decode(response[13:])
    except Exception:
        return
    f62 = fields.get(62)
    if fields.get(39) != "00" or not isinstance(f62, bytes):
        return
    try:
        keys = parse_f62(terminal.tmk, ctx.f60.nmc, f62)
    except KeyCheckError:
        return
    terminal.key_mode = ctx.f60.nmc
    terminal.pik, terminal.mak, terminal.tdk = keys.pik, keys.mak, keys.tdk
    terminal.mac_failures.clear()
    ctx.ops.append(("terminal_keys", terminal))
