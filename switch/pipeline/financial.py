"""Card transactions that go to an issuer: consume and balance inquiry (protocol §7, §10.2,
§12.1 step 10). The issuer request is built from typed data (specs/issuer.md), the PIN block is
translated to the issuer's zone PIN key, and the issuer's answer becomes the terminal's code.
"""

from __future__ import annotations

import logging
import time

from switch.core.codec import Fields
from switch.crypto.pin import PinBlockError, translate_pin_block
from switch.domain.codes import ResultCode, from_issuer
from switch.domain.money import fee_fen
from switch.pipeline.context import Context, SwitchState
from switch.ports import IssuerTimeout, IssuerUnavailable

log = logging.getLogger("switch.pipeline")

# terminal transaction -> issuer (MTI, F3), see specs/issuer.md
ISSUER_MESSAGE = {
    "consume": ("0200", "000000"),
    "balance_inquiry": ("0100", "310000"),
}


def _translate_pin(state: SwitchState, ctx: Context) -> bytes | None:
    """Step 10a: F52 under the terminal's PIK → the issuer's ZPK (99 when it does not decode)."""
    f = ctx.request.fields
    block = f.get(52)
    if not isinstance(block, bytes):
        return None
    terminal = ctx.terminal
    assert terminal is not None and terminal.pik is not None and ctx.pan is not None
    f53 = str(f.get(53, ""))
    expected = "0" if terminal.key_mode == "001" else "6"
    if f53[1:2] != expected:
        ctx.decline(ResultCode.PIN_BLOCK_ERROR, "F53 key length does not match the sign-on mode")
        return None
    zpk = state.zone_pin_keys.get(ctx.issuer or "")
    if zpk is None:
        ctx.decline(ResultCode.ISSUER_UNAVAILABLE, "no zone PIN key for issuer")
        return None
    try:
        return translate_pin_block(terminal.pik, zpk, ctx.pan, block)
    except PinBlockError:
        ctx.decline(ResultCode.PIN_BLOCK_ERROR, "PIN block does not decode")
        return None


async def authorize(state: SwitchState, ctx: Context) -> None:
    """Consume and balance inquiry at the issuer."""
    txn = ctx.txn
    assert txn is not None and ctx.issuer is not None and ctx.pan is not None
    link = state.links.get(ctx.issuer)
    if link is None or not link.is_up:
        ctx.decline(ResultCode.ISSUER_UNAVAILABLE, "issuer link down")
        return
    pin_block = _translate_pin(state, ctx)
    if ctx.rc is not None:
        return
    f = ctx.request.fields
    mti, pcode = ISSUER_MESSAGE[txn.name]
    out: Fields = {3: pcode}
    if ctx.track2 is not None and 2 not in f:
        out[35] = ctx.track2
    else:
        out[2] = ctx.pan
    if ctx.amount_fen is not None:
        out[4] = f"{ctx.amount_fen:012d}"
    out[12] = ctx.now.strftime("%H%M%S")
    out[13] = ctx.now.strftime("%m%d")
    if ctx.expiry is not None:
        out[14] = ctx.expiry
    out[22] = str(f.get(22, "000"))
    out[32] = state.settings.acquirer_id
    assert ctx.rrn is not None
    out[37] = ctx.rrn
    out[41] = ctx.request.tid
    out[42] = ctx.request.mid
    out[49] = "156"
    if pin_block is not None:
        out[52] = pin_block
    ctx.issuer_fields = out
    t0 = time.perf_counter()
    try:
        _, reply = await link.send(mti, out, state.settings.issuer_timeout)
    except IssuerUnavailable:
        ctx.decline(ResultCode.ISSUER_UNAVAILABLE, "issuer link down")
        return
    except IssuerTimeout:
        ctx.decline(ResultCode.ISSUER_TIMEOUT, "no issuer answer in time")
        # a debit may have happened at the issuer: it must be reversed (store-and-forward, §11)
        ctx.needs_reversal = txn.reversible
        return
    finally:
        ctx.issuer_seconds = time.perf_counter() - t0
    code = str(reply.get(39, ""))
    ctx.issuer_rc = code
    rc = from_issuer(code)
    if rc is not ResultCode.APPROVED:
        ctx.decline(rc, f"issuer answered {code}")
        return
    if txn.name == "balance_inquiry":
        balance = reply.get(54)
        if not isinstance(balance, str) or len(balance) != 20:
            ctx.decline(ResultCode.SYSTEM_ERROR, "issuer balance missing")
            return
        ctx.resp[54] = balance
    else:
        auth = reply.get(38)
        if not isinstance(auth, str) or len(auth.strip()) != 6:
            # an approval we cannot present to the terminal: reverse it rather than keep the money
            ctx.decline(ResultCode.SYSTEM_ERROR, "issuer approval without auth code")
            ctx.needs_reversal = txn.reversible
            return
        ctx.auth_code = auth
        assert ctx.merchant is not None and ctx.amount_fen is not None
        ctx.fee_fen = fee_fen(ctx.amount_fen, ctx.merchant.fee_rate)
    ctx.rc = ResultCode.APPROVED
