"""Pre-auth void, completion request and completion advice (protocol §7). The pre-auth itself is
authorised like a consume (``financial.authorize``); these three name it by F38 = its auth code
and F61 = its batch, STAN and date, and it must be approved, not voided, not completed and at
most 30 days old (``25`` missing or expired, ``12`` wrong state)."""

from __future__ import annotations

from switch.domain.codes import ResultCode
from switch.pipeline import issuer_leg, originals
from switch.pipeline.context import Context, SwitchState
from switch.pipeline.financial import approve, reserve_limit, take_auth_code, translate_pin
from switch.pipeline.originals import Row

COMPLETION_CAP_PERCENT = 115


def _find_pre_auth(state: SwitchState, ctx: Context) -> Row | None:
    """The merchant's pre-auth with this batch, STAN, auth code and date; this terminal's first."""
    assert state.store is not None and ctx.merchant is not None and ctx.terminal is not None
    f = ctx.request.fields
    f61 = str(f[61])
    rows = state.store.query(
        "SELECT * FROM journal WHERE txn = 'pre_auth' AND mid = ? AND batch = ? AND stan = ?"
        " AND auth_code = ? AND dup_key IS NOT NULL ORDER BY (tid = ?) DESC, id LIMIT 1",
        (ctx.merchant.mid, f61[:6], f61[6:12], str(f[38]), ctx.terminal.tid),
    )
    if not rows or str(rows[0]["business_date"])[4:] != f61[12:16]:
        return None
    return rows[0]


async def pre_auth_follow_up(state: SwitchState, ctx: Context) -> None:
    txn = ctx.txn
    assert txn is not None and ctx.pan is not None and ctx.amount_fen is not None
    row = _find_pre_auth(state, ctx)
    if row is None or originals.age_days(row, ctx) > originals.MAX_AGE_DAYS:
        ctx.decline(ResultCode.ORIGINAL_NOT_FOUND, "no such pre-auth, or older than 30 days")
        return
    row = await originals.hold(state, ctx, row)
    if row["state"] == "declined":
        ctx.decline(ResultCode.ORIGINAL_NOT_FOUND, "the pre-auth was declined")
        return
    if row["state"] != "approved":
        ctx.decline(ResultCode.INVALID_STATE, f"the pre-auth is {row['state']}")
        return
    if not originals.same_card(state, ctx, row):
        ctx.decline(ResultCode.MISMATCH, "another card than the pre-auth")
        return
    held = int(row["amount_fen"])
    if txn.name == "pre_auth_void" and ctx.amount_fen != held:
        ctx.decline(ResultCode.MISMATCH, "a pre-auth void carries the pre-auth amount")
        return
    if txn.name != "pre_auth_void" and ctx.amount_fen * 100 > held * COMPLETION_CAP_PERCENT:
        ctx.decline(ResultCode.MISMATCH, "completion above 115% of the pre-auth")
        return
    issuer = str(row["issuer"])
    ctx.issuer = issuer
    if not reserve_limit(state, ctx):
        return
    pin_block = translate_pin(state, ctx)
    if ctx.rc is not None:
        return
    assert ctx.rrn is not None
    mti, pcode = issuer_leg.ISSUER_MESSAGE[txn.name]
    out = issuer_leg.request_fields(state, ctx, pcode, pan=ctx.pan, amount_fen=ctx.amount_fen, rrn=ctx.rrn)
    out[38] = str(row["auth_code"])
    out[90] = issuer_leg.f90("0100", row["issuer_stan"], row["issuer_f7"], state.settings.acquirer_id)
    if pin_block is not None:
        out[52] = pin_block
    ctx.issuer_fields = out
    advice = txn.name == "completion_advice"
    reply = await issuer_leg.call(state, ctx, issuer, mti, out, reverse_on_timeout=txn.reversible)
    if reply is None:
        if advice and ctx.rc in (ResultCode.ISSUER_UNAVAILABLE, ResultCode.ISSUER_TIMEOUT):
            ctx.note = f"completion advice queued for {issuer} ({ctx.rc.value})"
            ctx.rc = None
            issuer_leg.queue_advice(state, ctx, issuer, mti, out)
            approve(state, ctx, {39: "00"})
            ctx.auth_code = str(row["auth_code"])
            originals.set_state(ctx, row, "completed")
        return
    if not approve(state, ctx, reply):
        return
    if advice or txn.name == "pre_auth_void":
        # issuers approve a pre-auth void (and may approve an advice) without a new code; the
        # terminal's 0110/0230 still carries one (§4): the pre-auth's
        auth = reply.get(38)
        ctx.auth_code = auth if isinstance(auth, str) and len(auth.strip()) == 6 else str(row["auth_code"])
    elif not take_auth_code(ctx, reply):
        ctx.needs_reversal = True
        ctx.fee_fen = None
        issuer_leg.queue_reversal(state, ctx, issuer, mti, out, ctx.pan)
        return
    originals.set_state(ctx, row, "voided" if txn.name == "pre_auth_void" else "completed")
