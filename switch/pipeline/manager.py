"""The transaction manager: one request in, one response (or a close) out.

A Context flows through the ordered participants of protocol §12.1; the first decline stops
the checks. Then the response is built (§6.1), the journal row and any terminal-state change
are committed durably in one group commit, and only then are the response bytes returned.
After any failure inside a participant the terminal still gets an answer (``96``) and the
attempt is journaled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from typing import Awaitable, Callable, Union

from switch.adapters.sqlite_store import JournalEntry, SqliteStore, StoreError
from switch.adapters.webhooks import event_from_journal
from switch.core.codec import Fields
from switch.core.framing import Frame
from switch.core.messages import (
    Malformed,
    Request,
    echo,
    encode_response,
    format_error_response,
    read_request,
    response_mti,
)
from switch.crypto.mac import cup_mac
from switch.crypto.track import TrackError, decrypt_track
from switch.domain.cards import mask_pan, pan_from_track2
from switch.domain.codes import ResultCode
from switch.pipeline import (
    activation,
    checks,
    duplicates,
    financial,
    management,
    preauth,
    refund,
    reversal,
    settlement,
    transfer,
    void,
)
from switch.pipeline.context import SHANGHAI, Context, SwitchState

log = logging.getLogger("switch.txn")

Participant = Callable[[SwitchState, Context], Union[None, Awaitable[None]]]

CHECKS: list[Participant] = [
    checks.check_terminal,  # 2
    checks.check_transaction_key,  # 3
    checks.check_signed_on_and_mac,  # 4
    duplicates.check_duplicate,  # 5
    checks.check_batch_and_day,  # 6
    checks.check_mandatory,  # 7
    checks.check_card_and_route,  # 8
]

SYNC_HANDLERS: dict[str, Callable[[SwitchState, Context], None]] = {
    "sign_on": management.sign_on,
    "sign_off": management.sign_off,
    "echo_test": management.echo_test,
    "parameter_download": management.parameter_download,
    "activation": activation.activate,
    "batch_upload": settlement.upload,
}
ASYNC_HANDLERS: dict[str, Callable[[SwitchState, Context], Awaitable[None]]] = {
    "consume": financial.authorize,
    "scan_to_pay": financial.authorize,
    "balance_inquiry": financial.authorize,
    "pre_auth": financial.authorize,
    "consume_void": void.void,
    "completion_void": void.void,
    "refund": refund.refund,
    "pre_auth_void": preauth.pre_auth_follow_up,
    "completion": preauth.pre_auth_follow_up,
    "completion_advice": preauth.pre_auth_follow_up,
    "transfer": transfer.transfer,
    "reversal": reversal.reversal,
    "batch_settlement": settlement.settle,
}

CLOSE = None  # handle() returns None when the connection must be closed


class TransactionManager:
    def __init__(self, state: SwitchState, store: SqliteStore) -> None:
        self.state = state
        self.store = store
        state.store = store

    async def handle(self, frame: Frame) -> bytes | None:
        """Process one frame. Returns response bytes, or None: close the connection (counted)."""
        state = self.state
        parsed = read_request(state.codec, frame)
        if isinstance(parsed, Malformed):
            state.metrics.malformed_frame(parsed.reason)
            if parsed.close:
                log.warning("closing connection: %s", parsed.reason)
                return CLOSE
            return await self._format_error(parsed)
        ctx = Context(parsed, datetime.now(SHANGHAI))
        state.metrics.in_flight(1)
        data: bytes | None = None
        try:
            try:
                await self._run(ctx)
            except Exception:
                log.exception("participant failed; answering 96")
                ctx.rc = ResultCode.SYSTEM_ERROR
                ctx.note = "internal error"
                ctx.store_ops.clear()
                ctx.after_commit.clear()
                if ctx.intents and state.saf is not None:
                    # whatever reached an issuer is reversed: the terminal gets 96
                    ctx.store_ops.append(state.saf.op_promote_intents(list(ctx.intents)))
                    ctx.after_commit.append(state.saf.wake)
            if ctx.resend is not None:
                code = self._resent_code(ctx.resend)
                await self._journal(ctx, ResultCode(code))
                # §15: every answered request is counted, a retransmission's stored answer too
                state.metrics.request_completed(ctx.txn.name if ctx.txn else "unknown", code,
                                                time.perf_counter() - ctx.started)
                data = ctx.resend
            else:
                try:
                    data = await self._respond(ctx)
                except StoreError:
                    await self._reverse_unjournaled(ctx)
                    raise  # no answer without its journal row: the connection is closed, counted
            return data
        finally:
            # release the original's lock and any copies waiting on this request (§11), only now
            # that its journal row is durable (or the attempt failed and nothing was answered)
            await ctx.held.aclose()
            if ctx.limit_reservation is not None:  # not committed: free the headroom
                state.limits.release(ctx.limit_reservation)
            duplicates.finish(state, ctx, data)
            _release_terminals(ctx)  # when the request ended before its journal commit
            state.metrics.in_flight(-1)

    async def _reverse_unjournaled(self, ctx: Context) -> None:
        """The journal commit failed (a full disk, an I/O error): whatever this request did at an
        issuer must be undone. Its write-ahead intents become queued reversals now if the store
        takes that write; if it does not, the orphan-intent sweep does it later."""
        saf = self.state.saf
        if not ctx.intents or saf is None:
            return
        try:
            await self.store.write(saf.op_promote_intents(list(ctx.intents)))
        except StoreError:
            log.error("journal commit failed and its %d intent(s) could not be queued for reversal;"
                      " the orphan-intent sweep will", len(ctx.intents))
            return
        saf.wake()

    def _resent_code(self, frame: bytes) -> str:
        try:
            _, fields = self.state.codec.decode(frame[13:])
        except Exception:
            return ResultCode.SYSTEM_ERROR.value
        code = fields.get(39)
        return code if isinstance(code, str) and code in ResultCode._value2member_map_ else "96"

    async def _run(self, ctx: Context) -> None:
        state = self.state
        t0 = time.perf_counter()
        checks.classify_request(ctx)
        for check in CHECKS:
            result = check(state, ctx)
            if result is not None:
                await result
            if ctx.rc is not None or ctx.resend is not None:
                state.metrics.stage("checks", time.perf_counter() - t0)
                return
        state.metrics.stage("checks", time.perf_counter() - t0)
        t0 = time.perf_counter()
        txn = ctx.txn
        assert txn is not None
        if txn.financial:
            ctx.rrn = await self.store.next_rrn()
        sync = SYNC_HANDLERS.get(txn.name)
        if sync is not None:
            sync(state, ctx)
        else:
            await ASYNC_HANDLERS[txn.name](state, ctx)
        state.metrics.stage("handler", time.perf_counter() - t0)
        if ctx.rc is None:  # a handler must decide
            ctx.rc = ResultCode.SYSTEM_ERROR

    # ---- responses (§6.1) ---------------------------------------------------------------
    def _digit6(self, ctx: Context) -> int:
        t = ctx.terminal
        if t is None and ctx.rc is ResultCode.FORMAT_ERROR:
            # a 30 follows the terminal its F41 names, whatever the type (decisions.md): an
            # activation's too, although the activation itself finds its terminal by the code
            t = self.state.terminals.get(ctx.request.tid)
        if t is None:
            return 0
        if not t.signed_on:
            return 3
        m = self.state.merchants.get(t.mid)
        if m is not None and t.params_version < m.params_version:
            return 1
        return 0

    def _response_fields(self, ctx: Context) -> Fields:
        req = ctx.request
        f = req.fields
        rc = ctx.rc or ResultCode.SYSTEM_ERROR
        mti = req.mti
        out: Fields = {39: rc.value}
        txn_name = ctx.txn.name if ctx.txn else None
        echoed = echo(f)
        if txn_name in checks.NO_AMOUNT:
            echoed.pop(4, None)  # §6.1: a field not listed for the type (F4 of a balance inquiry) is never echoed
        if rc is ResultCode.FORMAT_ERROR:  # §6.1: a 30 carries 11, 39, 41 and what it echoes, any MTI
            out.update(echoed)
            return out
        if txn_name == "activation":  # §6.1: 11, 39, 60; on 00 also the real 41/42, 62, 63
            out.update({k: f[k] for k in (11, 60) if k in f})
            if rc is ResultCode.APPROVED:
                out.update({k: ctx.resp[k] for k in (41, 42, 62, 63)})
            return out
        if mti in ("0800", "0820"):
            for k in (11, 41, 42, 60):
                if k in f:
                    out[k] = f[k]
            if txn_name != "parameter_download":
                out[12] = ctx.hhmmss
                out[13] = ctx.mmdd
            if txn_name == "sign_on":
                out[32] = self.state.settings.acquirer_id
                out[37] = ctx.rrn or ""
                if ctx.terminal is not None and ctx.f60 is not None:
                    out[60] = ctx.f60.with_batch(ctx.terminal.batch)
            if rc is ResultCode.APPROVED and 62 in ctx.resp:
                out[62] = ctx.resp[62]
            return out
        if mti == "0320":  # 0330: 11, 39, 41, 42, 60
            out.update({k: f[k] for k in (11, 41, 42, 60) if k in f})
            return out
        if mti == "0500":  # 0510: 11, 12, 13, 15, 32, 37, 39, 41, 42, 48, 49, 60
            out.update({k: f[k] for k in (11, 41, 42, 49, 60) if k in f})
            out[12] = ctx.hhmmss
            out[13] = ctx.mmdd
            out[15] = ctx.mmdd
            out[32] = self.state.settings.acquirer_id
            out[37] = ctx.rrn or ""
            out[48] = ctx.resp.get(48, f.get(48, "0" * 62))
            return out
        # financial (0110, 0210, 0230, 0410)
        out.update(echoed)
        out[12] = ctx.hhmmss
        out[13] = ctx.mmdd
        out[15] = ctx.mmdd
        out[32] = self.state.settings.acquirer_id
        out[37] = ctx.rrn or ""
        out[44] = (ctx.issuer or "").ljust(11) + self.state.settings.acquirer_id.ljust(11)
        out[63] = "CUP"
        swipe = str(f.get(22, ""))[:2] == "02"
        if 35 in f and (swipe or 2 not in f):
            # §6.1: for a swiped card, F2 = the PAN from track 2, declines too (an F2 the swipe
            # also carried is not its field: ignored, never echoed)
            pan = ctx.pan if ctx.track2 is not None else _pan_of_track(ctx)
            if pan is not None:
                out[2] = pan
            else:
                out.pop(2, None)
        if rc is ResultCode.APPROVED:
            if ctx.auth_code:
                out[38] = ctx.auth_code
            if 54 in ctx.resp:
                out[54] = ctx.resp[54]
        return out

    async def _respond(self, ctx: Context) -> bytes:
        state = self.state
        req = ctx.request
        t0 = time.perf_counter()
        needs_rrn = req.mti not in ("0800", "0820", "0320") or (
            ctx.txn is not None and ctx.txn.name == "sign_on"
        )
        if ctx.rrn is None and needs_rrn:  # §6.1: financial responses and 0810 sign-on carry 37
            ctx.rrn = await self.store.next_rrn()
        fields = self._response_fields(ctx)
        rc = ctx.rc or ResultCode.SYSTEM_ERROR
        mac = None
        # the key the request verified under, not the terminal's current one: a sign-off or a new
        # sign-on served while this request was at its issuer must not leave its answer unsigned
        mak = ctx.mak
        if rc is ResultCode.APPROVED and ctx.txn is not None and ctx.txn.mac and mak is not None:
            mac = lambda mab: cup_mac(mak, mab)  # noqa: E731
        data = encode_response(state.codec, req, fields, self._digit6(ctx), mac)
        t1 = time.perf_counter()
        state.metrics.stage("respond", t1 - t0)
        await self._journal(ctx, rc, data)
        state.metrics.stage("journal", time.perf_counter() - t1)
        seconds = time.perf_counter() - ctx.started
        txn_label = ctx.txn.name if ctx.txn else "unknown"
        state.metrics.request_completed(txn_label, rc.value, seconds)
        event = {
            "event": "transaction", "txn": txn_label, "tid": req.tid, "mid": req.mid, "mti": req.mti,
            "stan": req.stan, "rc": rc.value, "pan": mask_pan(ctx.pan) if ctx.pan else None,
            "amount_fen": ctx.amount_fen, "fee_fen": ctx.fee_fen, "issuer": ctx.issuer, "rrn": ctx.rrn,
            "auth_code": ctx.auth_code, "ms": round(seconds * 1000, 3), "note": ctx.note,
        }
        log.info(
            "txn=%s tid=%s stan=%s rc=%s pan=%s amount_fen=%s issuer=%s rrn=%s ms=%.2f%s",
            txn_label, req.tid, req.stan, rc.value, event["pan"] or "-", ctx.amount_fen, ctx.issuer or "-",
            ctx.rrn or "-", seconds * 1000, f" note={ctx.note}" if ctx.note else "",
            extra={"event": event},
        )
        return data

    def _journal_state(self, ctx: Context, rc: ResultCode) -> str | None:
        """The state of this row as an original for later requests (see pipeline/originals.py)."""
        if ctx.journal_state is not None:
            return ctx.journal_state
        if ctx.txn is None or not ctx.txn.financial:
            return None
        if ctx.needs_reversal:
            return "reversed"  # reversed by the switch after a timeout (§11)
        return "approved" if rc is ResultCode.APPROVED else "declined"

    async def _journal(self, ctx: Context, rc: ResultCode, response: bytes | None = None) -> None:
        """Commit the journal row with every state change of this request, durably, then run
        what waits for that commit (store-and-forward wake-ups)."""
        req = ctx.request
        f = req.fields
        store = self.store
        ops = []
        for kind, terminal in ctx.ops:
            if kind == "terminal_keys":
                ops.append(store.op_terminal_keys(terminal))
            else:
                ops.append(store.op_terminal_batch(terminal))
        ops.extend(ctx.store_ops)
        resent = ctx.resend is not None
        financial_row = ctx.txn is not None and ctx.txn.financial
        entry = JournalEntry(
            created_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            business_date=ctx.business_date,
            tid=req.tid,
            mid=req.mid,
            mti=req.mti,
            txn=ctx.txn.name if ctx.txn else "unknown",
            response_code=rc.value,
            pcode=_s(f.get(3)),
            stan=req.stan or None,
            batch=ctx.f60.batch if ctx.f60 else None,
            rrn=None if resent else ctx.rrn,
            auth_code=ctx.auth_code,
            amount_fen=ctx.amount_fen,
            fee_fen=ctx.fee_fen if rc is ResultCode.APPROVED and not resent else None,
            currency=_s(f.get(49)),
            pan_masked=mask_pan(ctx.pan) if ctx.pan else None,
            pan_token=store.pan_token(ctx.pan) if ctx.pan else None,
            entry_mode=_s(f.get(22)),
            issuer=ctx.issuer,
            issuer_stan=_s(ctx.issuer_fields.get(11)),
            issuer_f7=_s(ctx.issuer_fields.get(7)),
            issuer_response_code=ctx.issuer_rc,
            needs_reversal=ctx.needs_reversal,
            request_digest=ctx.digest or hashlib.sha256(req.frame.body).hexdigest(),
            latency_us=int((time.perf_counter() - ctx.started) * 1e6),
            issuer_latency_us=int(ctx.issuer_seconds * 1e6) if ctx.issuer_seconds is not None else None,
            note=ctx.note,
            dup_key=None if resent else ctx.dup_key,
            response_blob=store.wrap_response(response, ctx.dup_key) if response and ctx.dup_key else None,
            state=self._journal_state(ctx, rc),
            original_id=int(ctx.original["id"]) if ctx.original is not None else None,
            pan_enc=store.wrap_pan(ctx.pan) if ctx.pan and financial_row and not resent else None,
            legs=json.dumps(ctx.legs) if ctx.legs else None,
        )
        outbox = self.state.outbox
        notify = (
            outbox is not None and financial_row and not resent and ctx.txn is not None
            and outbox.wants(entry.mid)
        )
        if notify:
            assert outbox is not None
            # the merchant's notification is queued in the same commit; delivery never waits here
            ops.append(outbox.op_enqueue(entry.mid, event_from_journal(entry)))
        limits = self.state.limits
        approved = entry.state == "approved"
        ops.extend(limits.commit_ops(ctx.limit_reservation, approved, ctx.limit_deltas))
        if ctx.claimed and ctx.dup_key is not None and self.state.dup_claims is not None:
            ops.append(self.state.dup_claims.op_release(ctx.dup_key))  # the journal row answers now
        changed = [terminal for _, terminal in ctx.ops]
        try:
            await store.write(*ops, store.op_journal(entry))
        except StoreError:
            _release_terminals(ctx)
            for terminal in changed:  # memory moved ahead of a commit that failed
                try:
                    checks.restore_terminal(self.state, terminal)
                except Exception:  # the store cannot be read either: the next refresh will
                    log.exception("terminal %s could not be re-read after a failed commit", terminal.tid)
            raise
        finally:
            _release_terminals(ctx)  # committed (or failed): the store's row is the truth again
        if notify:
            assert outbox is not None
            outbox.wake()
        limits.committed(ctx.limit_reservation, approved, ctx.limit_deltas)
        ctx.limit_reservation = None
        for callback in ctx.after_commit:
            callback()

    async def _format_error(self, bad: Malformed) -> bytes:
        p = bad.partial
        tid = p.get(41)
        terminal = self.state.terminals.get(tid) if isinstance(tid, str) else None
        probe = Context(Request(bad.frame, bad.mti or "", p), datetime.now(SHANGHAI), terminal=terminal)
        data = format_error_response(self.state.codec, bad, self._digit6(probe))
        entry = JournalEntry(
            created_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            business_date=datetime.now(SHANGHAI).strftime("%Y%m%d"),
            tid=_s(p.get(41)) or "",
            mid=_s(p.get(42)) or "",
            mti=bad.mti or "",
            txn="malformed",
            response_code=ResultCode.FORMAT_ERROR.value,
            stan=_s(p.get(11)),
            request_digest=hashlib.sha256(bad.frame.body).hexdigest(),
            note=bad.reason,
        )
        await self.store.write(self.store.op_journal(entry))
        self.state.metrics.request_completed("malformed", "30", 0.0)
        return data


def _release_terminals(ctx: Context) -> None:
    """The terminal changes of this request (Context.change_terminal) are no longer pending."""
    for _, terminal in ctx.ops:
        terminal.keys_pending -= 1
    ctx.ops = []


def _pan_of_track(ctx: Context) -> str | None:
    """The PAN of a request declined before its track was read (steps 2-6)."""
    track = ctx.request.fields.get(35)
    if not isinstance(track, str):
        return None
    f53 = ctx.request.fields.get(53)
    if isinstance(f53, str) and f53[2:3] == "1":  # TDK-encrypted: only with the terminal's TDK
        t = ctx.terminal
        if t is None or t.tdk is None:
            return None
        try:
            track = decrypt_track(t.tdk, track)
        except TrackError:
            return None
    return pan_from_track2(track)


def _s(v: object) -> str | None:
    return v if isinstance(v, str) else None


__all__ = ["TransactionManager", "response_mti", "Request"]
