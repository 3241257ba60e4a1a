"""Refund (0220, protocol §7): the original is an approved consume, scan-to-pay or completion of
the same merchant, found by its RRN (F37) and the F13 of its response (61.3), at most 30 days
old. Refunds of one original never exceed its amount; they return the amount, not the fee.
An advice the issuer cannot take now is answered ``00`` once durably queued."""

from __future__ import annotations

from switch.domain.codes import ResultCode
from switch.pipeline import issuer_leg, originals
from switch.pipeline.context import Context, SwitchState
from switch.pipeline.financial import approve, translate_pin

REFUNDABLE = ("consume", "scan_to_pay", "completion", "completion_advice")


async def refund(state: SwitchState, ctx: Context) -> None:
    merchant = ctx.merchant
    assert merchant is not None and ctx.rrn is not None and ctx.pan is not None and ctx.amount_fen is not None
    f = ctx.request.fields
    row = originals.by_rrn(state, str(f[37]), REFUNDABLE)
    if row is None or str(row["business_date"])[4:] != str(f[61])[12:16]:
        ctx.decline(ResultCode.ORIGINAL_NOT_FOUND, "no original with this RRN and date")
        return
    if row["mid"] != merchant.mid or originals.age_days(row, ctx) > originals.MAX_AGE_DAYS:
        ctx.decline(ResultCode.ORIGINAL_NOT_FOUND, "original of another merchant or older than 30 days")
        return
    row = await originals.hold(state, ctx, row)
    if row["state"] == "declined":
        ctx.decline(ResultCode.ORIGINAL_NOT_FOUND, "original was declined")
        return
    if row["state"] in ("voided", "reversed"):
        ctx.decline(ResultCode.INVALID_STATE, f"original is {row['state']}")
        return
    if not originals.same_card(state, ctx, row):
        ctx.decline(ResultCode.MISMATCH, "another card than the original")
        return
    if int(row["refunded_fen"]) + ctx.amount_fen > int(row["amount_fen"]):
        ctx.decline(ResultCode.MISMATCH, "refunds would exceed the original amount")
        return
    issuer = str(row["issuer"])
    ctx.issuer = issuer
    pin_block = translate_pin(state, ctx)  # a refund may carry a PIN: 99 when it does not decode
    if ctx.rc is not None:
        return
    mti, pcode = issuer_leg.ISSUER_MESSAGE["refund"]
    out = issuer_leg.request_fields(state, ctx, pcode, pan=ctx.pan, amount_fen=ctx.amount_fen, rrn=row["rrn"])
    if pin_block is not None:
        out[52] = pin_block
    orig_mti = issuer_leg.ISSUER_MESSAGE[row["txn"]][0]
    out[90] = issuer_leg.f90(orig_mti, row["issuer_stan"], row["issuer_f7"], state.settings.acquirer_id)
    ctx.issuer_fields = out
    reply = await issuer_leg.call(state, ctx, issuer, mti, out, reverse_on_timeout=False)
    if reply is None:
        if ctx.rc in (ResultCode.ISSUER_UNAVAILABLE, ResultCode.ISSUER_TIMEOUT):
            # an advice: durably queued is as good as delivered for the terminal (§7)
            ctx.note = f"refund advice queued for {issuer} ({ctx.rc.value})"
            ctx.rc = None
            issuer_leg.queue_advice(state, ctx, issuer, mti, out)
            ctx.rc = ResultCode.APPROVED
            ctx.store_ops.append(originals.op_add_refund(int(row["id"]), ctx.amount_fen))
        return
    if approve(state, ctx, reply):
        auth = reply.get(38)
        if isinstance(auth, str) and len(auth.strip()) == 6:
            ctx.auth_code = auth
        ctx.store_ops.append(originals.op_add_refund(int(row["id"]), ctx.amount_fen))
