"""Requests that go to the card's issuer on their own: consume, scan-to-pay, balance inquiry and
pre-auth (protocol §7, §10.2, §12.1 step 10). The PIN block is translated to the issuer's zone
PIN key, the issuer message is built from typed data, and the issuer's answer becomes the
terminal's code.
"""

from __future__ import annotations

from switch.core.codec import Fields
from switch.crypto.pin import PinBlockError, translate_pin_block
from switch.domain.codes import ResultCode, from_issuer
from switch.domain.money import fee_fen
from switch.pipeline import issuer_leg, limits
from switch.pipeline.context import Context, SwitchState

FEE_BEARING = frozenset({"consume", "scan_to_pay", "completion", "completion_advice"})


def translate_pin(state: SwitchState, ctx: Context) -> bytes | None:
    """Step 10a: F52 under the terminal's PIK → the issuer's ZPK (99 when it does not decode).
    None with no decline: no PIN was entered."""
    f = ctx.request.fields
    terminal = ctx.terminal
    assert terminal is not None
    f53 = f.get(53)
    if isinstance(f53, str):  # §4: digit 2 must match the sign-on's key length, PIN or not
        expected = "0" if terminal.key_mode == "001" else "6"
        if f53[1:2] != expected:
            ctx.decline(ResultCode.PIN_BLOCK_ERROR, "F53 key length does not match the sign-on mode")
            return None
    block = f.get(52)
    if not isinstance(block, bytes):
        return None
    assert terminal.pik is not None and ctx.pan is not None
    zpk = state.zone_pin_keys.get(ctx.issuer or "")
    if zpk is None:
        ctx.decline(ResultCode.ISSUER_UNAVAILABLE, "no zone PIN key for issuer")
        return None
    try:
        return translate_pin_block(terminal.pik, zpk, ctx.pan, block)
    except PinBlockError:
        ctx.decline(ResultCode.PIN_BLOCK_ERROR, "PIN block does not decode")
        return None


def reserve_limit(state: SwitchState, ctx: Context) -> bool:
    """Step 9: take monthly-limit headroom for a counted request (61 when it would exceed it)."""
    txn, merchant = ctx.txn, ctx.merchant
    if txn is None or txn.name not in limits.COUNTED or ctx.amount_fen is None:
        return True
    assert merchant is not None
    month = limits.month_of(ctx.business_date)
    reservation = state.limits.reserve(merchant.mid, month, ctx.amount_fen, merchant.monthly_limit_fen)
    if reservation is None:
        state.metrics.limit_rejection()
        ctx.decline(ResultCode.EXCEEDS_LIMIT, "exceeds the merchant's monthly limit")
        return False
    ctx.limit_reservation = reservation
    return True


def approve(state: SwitchState, ctx: Context, reply: Fields) -> bool:
    """Turn the issuer's answer into the terminal's code; True when approved."""
    code = str(reply.get(39, ""))
    rc = from_issuer(code)
    if rc is not ResultCode.APPROVED:
        ctx.decline(rc, f"issuer answered {code}")
        return False
    ctx.rc = ResultCode.APPROVED
    if ctx.txn is not None and ctx.txn.name in FEE_BEARING and ctx.amount_fen is not None:
        assert ctx.merchant is not None
        ctx.fee_fen = fee_fen(ctx.amount_fen, ctx.merchant.fee_rate)
    return True


def take_auth_code(ctx: Context, reply: Fields) -> bool:
    """Every approved 0110/0210 except a balance inquiry carries a 6-character F38 (§4)."""
    auth = reply.get(38)
    if not isinstance(auth, str) or len(auth.strip()) != 6:
        ctx.decline(ResultCode.SYSTEM_ERROR, "issuer approval without auth code")
        return False
    ctx.auth_code = auth
    return True


async def authorize(state: SwitchState, ctx: Context) -> None:
    """Consume, scan-to-pay, balance inquiry and pre-auth at the card's issuer (or wallet)."""
    txn = ctx.txn
    assert txn is not None and ctx.issuer is not None and ctx.pan is not None and ctx.rrn is not None
    if not reserve_limit(state, ctx):
        return
    pin_block = translate_pin(state, ctx)  # step 10: the PIN block (99) before the issuer (91/98)
    if ctx.rc is not None:
        return
    mti, pcode = issuer_leg.ISSUER_MESSAGE[txn.name]
    out = issuer_leg.request_fields(
        state, ctx, pcode, pan=ctx.pan, amount_fen=ctx.amount_fen, rrn=ctx.rrn,
        use_track=2 not in ctx.request.fields,
    )
    if pin_block is not None:
        out[52] = pin_block
    ctx.issuer_fields = out
    reply = await issuer_leg.call(state, ctx, ctx.issuer, mti, out, reverse_on_timeout=txn.reversible,
                                  write_ahead=txn.reversible)  # a balance inquiry moves no money
    if reply is None or not approve(state, ctx, reply):
        return
    if txn.name == "balance_inquiry":
        balance = reply.get(54)
        if not isinstance(balance, str) or len(balance) != 20:
            ctx.decline(ResultCode.SYSTEM_ERROR, "issuer balance missing")
            return
        ctx.resp[54] = balance
        return
    if not take_auth_code(ctx, reply):
        # an approval we cannot present to the terminal: reverse it rather than keep the money
        ctx.needs_reversal = True
        issuer_leg.queue_reversal(state, ctx, ctx.issuer, mti, out, ctx.pan)
        ctx.fee_fen = None
