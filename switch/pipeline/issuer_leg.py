"""Talking to an issuer for one request: building host-to-host messages from typed data
(specs/issuer.md), sending them over the issuer link, and what a timeout leaves behind.

A reversible request that times out (``98``) gets a reversal queued in store-and-forward in the
same commit as its journal row (§7, §11): the issuer may have debited the card without the
answer ever arriving.
"""

from __future__ import annotations

import os
import time

from switch.core.codec import Fields
from switch.domain.codes import ResultCode
from switch.pipeline.context import Context, SwitchState
from switch.ports import IssuerTimeout, IssuerUnavailable

# terminal transaction -> issuer (MTI, F3)
ISSUER_MESSAGE: dict[str, tuple[str, str]] = {
    "balance_inquiry": ("0100", "310000"),
    "consume": ("0200", "000000"),
    "scan_to_pay": ("0200", "000000"),
    "consume_void": ("0200", "200000"),
    "refund": ("0220", "200000"),
    "pre_auth": ("0100", "030000"),
    "pre_auth_void": ("0100", "200000"),
    "completion": ("0200", "000000"),
    "completion_advice": ("0220", "000000"),
    "completion_void": ("0200", "200000"),
    "transfer_debit": ("0200", "400000"),
    "transfer_credit": ("0200", "260000"),
}


def f90(orig_mti: str, orig_stan: str, orig_f7: str, acquirer: str) -> str:
    """Original data elements: MTI 4 + STAN 6 + F7 10 + acquirer 11 + forwarding 11 zeros."""
    return orig_mti + orig_stan + orig_f7 + acquirer.zfill(11) + "0" * 11


def request_fields(
    state: SwitchState, ctx: Context, pcode: str, *, pan: str, amount_fen: int | None, rrn: str,
    use_track: bool = False,
) -> Fields:
    """The fields every issuer request carries (specs/issuer.md)."""
    out: Fields = {3: pcode}
    if use_track and ctx.track2 is not None:
        out[35] = ctx.track2
    else:
        out[2] = pan
    if amount_fen is not None:
        out[4] = f"{amount_fen:012d}"
    out[12] = ctx.hhmmss
    out[13] = ctx.mmdd
    if ctx.expiry is not None:
        out[14] = ctx.expiry
    out[22] = str(ctx.request.fields.get(22, "000"))
    out[32] = state.settings.acquirer_id
    out[37] = rrn
    out[41] = ctx.request.tid
    out[42] = ctx.request.mid
    out[49] = "156"
    return out


def reversal_fields(state: SwitchState, orig_mti: str, sent: Fields, pan: str) -> Fields:
    """A 0400 naming an issuer request the switch sent (its F11 and F7 are in ``sent``)."""
    out: Fields = {k: v for k, v in sent.items() if k in (3, 4, 12, 13, 22, 32, 37, 41, 42, 48, 49)}
    out[2] = pan
    out[90] = f90(orig_mti, str(sent[11]), str(sent[7]), state.settings.acquirer_id)
    return out


def queue_reversal(
    state: SwitchState, ctx: Context, issuer: str, orig_mti: str, sent: Fields, pan: str,
    journal_id: int | None = None,
) -> None:
    """Queue (in this request's commit) a reversal of an issuer request, and wake the worker."""
    saf = state.saf
    if saf is None or 11 not in sent or 7 not in sent:
        return
    ctx.store_ops.append(
        saf.op_enqueue(issuer, "reversal", "0400", reversal_fields(state, orig_mti, sent, pan), journal_id)
    )
    ctx.after_commit.append(saf.wake)


def queue_advice(state: SwitchState, ctx: Context, issuer: str, mti: str, fields: Fields) -> None:
    saf = state.saf
    assert saf is not None
    ctx.store_ops.append(saf.op_enqueue(issuer, "advice", mti, fields, None))
    ctx.after_commit.append(saf.wake)


async def call(
    state: SwitchState, ctx: Context, issuer: str, mti: str, fields: Fields, *,
    reverse_on_timeout: bool, pan: str | None = None, write_ahead: bool = True,
) -> Fields | None:
    """Send one request; None when it failed (ctx carries 91 or 98). On a timeout of a reversible
    request, a reversal is queued (and the journal row marked ``needs_reversal``).

    ``write_ahead`` makes how to reverse the request durable before it leaves: if the request's
    journal row is never committed (a crash, a failed commit) it is reversed. Every request that
    moves money writes ahead, advices (refund, completion advice) too, which are not reversed on
    a timeout but delivered later; only a balance inquiry does not."""
    link = state.links.get(issuer)
    if link is None or not link.is_up:
        ctx.decline(ResultCode.ISSUER_UNAVAILABLE, f"issuer {issuer} link down")
        return None
    if write_ahead and state.saf is not None and state.store is not None:
        # write-ahead: how to reverse this request is durable before it leaves (see saf.py)
        link.stamp(fields)
        key = os.urandom(16).hex()  # 128 random bits, like uuid4 without its object
        await state.store.write(
            state.saf.op_intent(key, issuer, reversal_fields(state, mti, fields, pan or ctx.pan or ""),
                                ctx.dup_key)
        )
        ctx.intents.append(key)
        ctx.store_ops.append(state.saf.op_clear_intent(key))
        # a reload may have replaced the issuer's link while the intent was written
        link = state.links.get(issuer) or link
    t0 = time.perf_counter()
    try:
        _, reply = await link.send(mti, fields, state.settings.issuer_timeout)
    except IssuerUnavailable:
        ctx.decline(ResultCode.ISSUER_UNAVAILABLE, f"issuer {issuer} link down")
        return None
    except IssuerTimeout:
        ctx.decline(ResultCode.ISSUER_TIMEOUT, f"no answer from {issuer} in time")
        if reverse_on_timeout:
            ctx.needs_reversal = True
            queue_reversal(state, ctx, issuer, mti, fields, pan or ctx.pan or "")
        return None
    finally:
        ctx.issuer_seconds = (ctx.issuer_seconds or 0.0) + time.perf_counter() - t0
    ctx.issuer_rc = str(reply.get(39, ""))
    return reply


async def commit_and_deliver(state: SwitchState, ctx: Context, issuers: set[str]) -> None:
    """Commit what this request queued so far (durable first), then try to deliver it now, so
    the terminal is answered after the issuer has had the chance to apply it (§7, §11). Anything
    not acknowledged stays queued for the store-and-forward worker."""
    assert state.store is not None
    if ctx.store_ops:
        ops, ctx.store_ops = ctx.store_ops, []
        # the state changes committed here (an original reversed, voided...) move the monthly
        # limit now, not with the request's journal row, which may still fail to commit
        deltas, ctx.limit_deltas = ctx.limit_deltas, []
        limits = state.limits
        await state.store.write(*ops, *limits.commit_ops(None, False, deltas))
        limits.committed(None, False, deltas)
    if state.saf is not None:
        for issuer in sorted(issuers):
            await state.saf.deliver_due(issuer)
