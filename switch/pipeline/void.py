"""Consume void and completion void (protocol §7): the original is this terminal's request in
its open batch, named by 61.1 batch + 61.2 STAN and by its RRN in F37."""

from __future__ import annotations

from switch.domain.codes import ResultCode
from switch.pipeline import issuer_leg, originals
from switch.pipeline.context import Context, SwitchState
from switch.pipeline.financial import approve, take_auth_code, translate_pin

VOIDABLE = {
    "consume_void": ("consume", "scan_to_pay"),
    "completion_void": ("completion", "completion_advice"),
}


async def void(state: SwitchState, ctx: Context) -> None:
    txn, terminal = ctx.txn, ctx.terminal
    assert txn is not None and terminal is not None and ctx.rrn is not None and ctx.pan is not None
    f = ctx.request.fields
    f61 = str(f[61])
    row = originals.by_terminal_batch_stan(state, terminal.tid, f61[:6], f61[6:12], VOIDABLE[txn.name])
    if row is None or row["rrn"] != f[37] or row["batch"] != terminal.batch:
        ctx.decline(ResultCode.ORIGINAL_NOT_FOUND, "no such original in the open batch")
        return
    row = await originals.hold(state, ctx, row)
    if row["state"] in ("declined", "reversed"):
        ctx.decline(ResultCode.ORIGINAL_NOT_FOUND, f"original is {row['state']}")
        return
    if row["state"] == "voided":
        ctx.decline(ResultCode.INVALID_STATE, "original already voided")
        return
    if row["state"] != "approved":
        ctx.decline(ResultCode.INVALID_STATE, f"original is {row['state']}")
        return
    if not originals.same_card(state, ctx, row) or row["amount_fen"] != ctx.amount_fen:
        ctx.decline(ResultCode.MISMATCH, "another card or another amount than the original")
        return
    if int(row["refunded_fen"] or 0) > 0:
        # a void returns the whole amount: after a refund that would pay some of it back twice
        # (a refund of a voided sale is 12 too, §7); after the 64 checks, which §7 lists for voids
        ctx.decline(ResultCode.INVALID_STATE, "original already (partly) refunded")
        return
    ctx.issuer = row["issuer"]
    pin_block = translate_pin(state, ctx)
    if ctx.rc is not None:
        return
    mti, pcode = issuer_leg.ISSUER_MESSAGE[txn.name]
    out = issuer_leg.request_fields(state, ctx, pcode, pan=ctx.pan, amount_fen=ctx.amount_fen, rrn=row["rrn"])
    orig_mti = issuer_leg.ISSUER_MESSAGE[row["txn"]][0]
    out[90] = issuer_leg.f90(orig_mti, row["issuer_stan"], row["issuer_f7"], state.settings.acquirer_id)
    if pin_block is not None:
        out[52] = pin_block
    ctx.issuer_fields = out
    reply = await issuer_leg.call(state, ctx, row["issuer"], mti, out, reverse_on_timeout=True)
    if reply is None or not approve(state, ctx, reply):
        return
    if not take_auth_code(ctx, reply):
        ctx.needs_reversal = True
        issuer_leg.queue_reversal(state, ctx, row["issuer"], mti, out, ctx.pan)
        return
    originals.set_state(ctx, row, "voided")
    if txn.name == "completion_void" and row["original_id"] is not None:
        # the pre-auth is open again: it can be completed or voided (§7)
        originals.set_state_by_id(state, ctx, int(row["original_id"]), "approved")
