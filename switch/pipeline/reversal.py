"""Reversal 0400 (protocol §11): the original is the request with the same TID, batch (60.2) and
STAN whose type has the 0400's F3/F25/60.1. The switch reverses it at the issuer and answers
``00``; an original that was declined, already reversed, or reversed by the switch after a
timeout also gets ``00`` with nothing more to do; an original still at the issuer is reversed
as soon as the issuer answers. Not found ``25``, non-reversible ``12``, another amount or none ``64``.
Reversals are accepted until the end of the original's business day, after settlement too;
later ones get ``12`` (specs/decisions.md).

What a reversal undoes besides the issuer's effect: a reversed void makes its original approved
again; a reversed completion re-opens its pre-auth; a reversed completion void makes the
completion approved and the pre-auth completed again; a reversed pre-auth void re-opens the
pre-auth; a reversed transfer reverses both legs.
"""

from __future__ import annotations

import json

import anyio

from switch.core.transactions import original_type
from switch.domain.codes import ResultCode
from switch.pipeline import issuer_leg, originals
from switch.pipeline.context import Context, SwitchState
from switch.pipeline.originals import Row

WAIT_FOR_ORIGINAL = 60.0


async def reversal(state: SwitchState, ctx: Context) -> None:
    assert ctx.terminal is not None and ctx.f60 is not None and state.store is not None
    orig = original_type(ctx.request.fields)
    assert orig is not None
    key = f"{ctx.terminal.tid}|{ctx.f60.batch}|{ctx.request.stan}|{orig.mti}"
    first = state.inflight.get(key)
    if first is not None:  # still at the issuer: wait for its answer, then reverse it
        with anyio.move_on_after(WAIT_FOR_ORIGINAL):
            await first.done.wait()
    row = originals.by_key(state, ctx.terminal.tid, ctx.f60.batch, ctx.request.stan, orig.mti)
    if row is None and _reversed_unjournaled(state, key):
        # its journal commit failed after the issuer was asked (a full disk, an I/O error): no
        # answer went out and the switch queued the reversal itself: "reversed by the switch"
        ctx.rc = ResultCode.APPROVED
        ctx.note = "original never journaled (its commit failed): the switch reverses it"
        return
    if row is None or row["txn"] != orig.name:
        ctx.decline(ResultCode.ORIGINAL_NOT_FOUND, "no original with this TID, batch and STAN")
        return
    if not orig.reversible:
        ctx.decline(ResultCode.INVALID_STATE, f"a {orig.name} cannot be reversed")
        return
    if row["amount_fen"] is not None and ctx.amount_fen != row["amount_fen"]:
        # §11: the 0400 repeats the original's F4; one without it does not repeat an original
        # that carried one, so it reverses nothing (specs/decisions.md)
        ctx.decline(ResultCode.MISMATCH, "F4 missing or not the original's amount")
        return
    row = await originals.hold(state, ctx, row)
    ctx.issuer = row["issuer"]
    ctx.amount_fen = row["amount_fen"]
    if row["state"] in ("declined", "reversed"):
        ctx.rc = ResultCode.APPROVED
        ctx.note = f"original {row['state']}: nothing to reverse"
        return
    if str(row["business_date"]) != ctx.business_date:
        ctx.decline(ResultCode.INVALID_STATE, "the original's business day is over")
        return
    if row["state"] != "approved":
        ctx.decline(ResultCode.INVALID_STATE, f"original is {row['state']}: reverse that first")
        return
    if int(row["refunded_fen"] or 0) > 0:
        ctx.decline(ResultCode.INVALID_STATE, "original already (partly) refunded")
        return
    issuers = _queue_issuer_reversals(state, ctx, row)
    _undo_side_effects(state, ctx, row)
    originals.set_state(ctx, row, "reversed")
    await issuer_leg.commit_and_deliver(state, ctx, issuers)
    ctx.rc = ResultCode.APPROVED


def _reversed_unjournaled(state: SwitchState, key: str) -> bool:
    """Whether the switch queued the reversal of the request ``key`` from its write-ahead intent
    (the request's journal row was never written). A live intent is not enough: on a shared
    database it may be another process's request still at its issuer."""
    assert state.store is not None
    return bool(state.store.query(
        "SELECT 1 FROM saf_queue WHERE origin = ? AND kind = 'reversal' LIMIT 1", (key,)))


def _queue_issuer_reversals(state: SwitchState, ctx: Context, row: Row) -> set[str]:
    """Queue the 0400s that undo the original at its issuer(s)."""
    issuers: set[str] = set()
    if row["txn"] == "transfer":
        for leg in json.loads(row["legs"] or "[]"):
            if leg.get("stan") and leg.get("f7"):
                pan = state.store.master_key.unwrap(bytes.fromhex(leg["pan_enc"]), "pan").decode() \
                    if state.store is not None else ""
                sent = {3: "400000" if leg["leg"] == "debit" else "260000", 4: f"{int(row['amount_fen']):012d}",
                        11: leg["stan"], 7: leg["f7"], 37: row["rrn"], 41: row["tid"], 42: row["mid"], 49: "156",
                        32: state.settings.acquirer_id}
                issuer_leg.queue_reversal(state, ctx, leg["issuer"], leg["mti"], sent, pan, int(row["id"]))
                issuers.add(leg["issuer"])
        return issuers
    if not row["issuer_stan"] or not row["issuer_f7"] or not row["issuer"]:
        return issuers  # never reached an issuer: nothing to undo there
    pan = originals.original_pan(state, row) or ""
    mti, pcode = issuer_leg.ISSUER_MESSAGE[row["txn"]]
    sent = {3: pcode, 11: row["issuer_stan"], 7: row["issuer_f7"], 37: row["rrn"], 41: row["tid"],
            42: row["mid"], 49: "156", 32: state.settings.acquirer_id}
    if row["amount_fen"] is not None:
        sent[4] = f"{int(row['amount_fen']):012d}"
    issuer_leg.queue_reversal(state, ctx, str(row["issuer"]), mti, sent, pan, int(row["id"]))
    issuers.add(str(row["issuer"]))
    return issuers


def _undo_side_effects(state: SwitchState, ctx: Context, row: Row) -> None:
    parent = row["original_id"]
    if parent is None:
        return
    # a void's original, a completion's pre-auth, a pre-auth void's pre-auth: approved (open) again
    originals.set_state_by_id(state, ctx, int(parent), "approved")
    if row["txn"] == "completion_void":
        # the completion is approved again, so its pre-auth is completed again
        completion = originals.by_id(state, int(parent))
        if completion["original_id"] is not None:
            originals.set_state_by_id(state, ctx, int(completion["original_id"]), "completed")
