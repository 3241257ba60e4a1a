"""Transfer (protocol §7): debit the source card at its issuer, then credit the destination (F48)
at its issuer. If the credit leg fails or times out, the debit is reversed before the terminal is
answered (store-and-forward finishes it if the source issuer does not acknowledge), and the
terminal gets the credit leg's code. Money is never left debited without a credit."""

from __future__ import annotations

import json

from switch.domain.codes import ResultCode, from_issuer
from switch.pipeline import issuer_leg
from switch.pipeline.context import Context, SwitchState
from switch.pipeline.financial import take_auth_code, translate_pin


def _leg(name: str, issuer: str, mti: str, sent: dict, rc: str | None, pan_enc: bytes) -> dict:  # type: ignore[type-arg]
    return {
        "leg": name, "issuer": issuer, "mti": mti, "stan": sent.get(11), "f7": sent.get(7), "rc": rc,
        "pan_enc": pan_enc.hex(),
    }


async def transfer(state: SwitchState, ctx: Context) -> None:
    assert state.store is not None and ctx.pan is not None and ctx.issuer is not None and ctx.rrn is not None
    dest = str(ctx.request.fields[48])
    dest_issuer = state.routes.route(dest)
    assert dest_issuer is not None  # checked at step 8
    pin_block = translate_pin(state, ctx)
    if ctx.rc is not None:
        return
    # debit leg
    mti, pcode = issuer_leg.ISSUER_MESSAGE["transfer_debit"]
    debit = issuer_leg.request_fields(
        state, ctx, pcode, pan=ctx.pan, amount_fen=ctx.amount_fen, rrn=ctx.rrn,
        use_track=2 not in ctx.request.fields,
    )
    debit[48] = dest
    if pin_block is not None:
        debit[52] = pin_block
    ctx.issuer_fields = debit
    reply = await issuer_leg.call(state, ctx, ctx.issuer, mti, debit, reverse_on_timeout=True)
    source_enc = state.store.wrap_pan(ctx.pan)
    ctx.legs.append(_leg("debit", ctx.issuer, mti, debit, ctx.issuer_rc, source_enc))
    if reply is None:
        return
    code = str(reply.get(39, ""))
    if code != "00":
        ctx.decline(from_issuer(code), f"source issuer answered {code}")
        return
    if not take_auth_code(ctx, reply):
        ctx.needs_reversal = True
        issuer_leg.queue_reversal(state, ctx, ctx.issuer, mti, debit, ctx.pan)
        return
    # credit leg (no PIN: it is the source card's)
    cmti, cpcode = issuer_leg.ISSUER_MESSAGE["transfer_credit"]
    credit = issuer_leg.request_fields(state, ctx, cpcode, pan=dest, amount_fen=ctx.amount_fen, rrn=ctx.rrn)
    credit.pop(14, None)
    credit[48] = ctx.pan
    credit_reply = await issuer_leg.call(
        state, ctx, dest_issuer, cmti, credit, reverse_on_timeout=True, pan=dest
    )  # a credit that timed out is queued for reversal too: it may have happened
    ctx.legs.append(_leg("credit", dest_issuer, cmti, credit, ctx.issuer_rc, state.store.wrap_pan(dest)))
    if credit_reply is not None:
        credit_code = str(credit_reply.get(39, ""))
        if credit_code == "00":
            ctx.rc = ResultCode.APPROVED
            return
        ctx.decline(from_issuer(credit_code), f"destination issuer answered {credit_code}")
    # the credit failed (ctx.rc is its code, or 91/98): reverse the debit before answering
    ctx.note = f"{ctx.note}; debit reversed"
    ctx.auth_code = None
    ctx.journal_state = "reversed"
    issuer_leg.queue_reversal(state, ctx, ctx.issuer, mti, debit, ctx.pan)
    await issuer_leg.commit_and_deliver(state, ctx, {ctx.issuer, dest_issuer})


def legs_of(row: dict) -> list[dict]:  # type: ignore[type-arg]
    return list(json.loads(row["legs"])) if row.get("legs") else []
