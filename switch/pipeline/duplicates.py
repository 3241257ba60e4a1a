"""Duplicates (protocol §11, §12.1 step 5).

Key = TID | batch (60.2) | STAN | MTI. A request whose bytes (MTI to the end) equal those of one
already answered gets that answer again without touching the issuer; a copy arriving while the
first is in flight waits for it. The same key with different bytes gets ``94``. The first request
stays registered in ``SwitchState.inflight`` until its journal row (holding its response) is
committed, so a copy always finds it either there or in the journal.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, Callable

import anyio

from switch.core.framing import ENVELOPE_LEN, TPDU_LEN, response_header
from switch.crypto.working_keys import KeyCheckError, parse_f62
from switch.domain.codes import ResultCode
from switch.pipeline.context import Context, InFlight, SwitchState

if TYPE_CHECKING:
    from switch.adapters.sqlite_store import Op

WAIT_LIMIT = 120.0  # a copy never waits longer than this for the first (bounded by issuer timeouts)
CLAIM_ATTEMPTS = 5  # a claim met, then found released, is tried again this many times in all


def dup_key(state: SwitchState, ctx: Context) -> str | None:
    req = ctx.request
    if not req.stan:
        return None  # an echo test may come without F11: nothing to match it on
    batch = ctx.f60.batch if ctx.f60 else ""
    if ctx.txn is not None and ctx.txn.name == "activation":
        # F41 may be spaces and factory-fresh terminals all start at the same trace number: the
        # terminal is the one its code names (§9.1, §12.1 step 2), so the code stands for the TID
        # keyed (the journal shows dup keys: an unkeyed hash of 8 digits gave the code away)
        f62 = req.fields.get(62)
        code = f62[:8].decode("latin-1") if isinstance(f62, bytes) else ""
        assert state.store is not None
        return f"activation:{state.store.code_token(code)[3:19]}|{batch}|{req.stan}|{req.mti}"
    return f"{req.tid}|{batch}|{req.stan}|{req.mti}"


async def check_duplicate(state: SwitchState, ctx: Context) -> None:
    key = dup_key(state, ctx)
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
    if _answered(state, ctx, key, digest):
        return
    claims = state.dup_claims
    if claims is not None:
        # several processes share the store: the first to claim the key processes the request,
        # a copy on another process waits for its journal row (bounded), as a local copy would
        deadline = anyio.current_time() + WAIT_LIMIT
        while True:
            holder = claims.claim(key, digest)
            if holder is None:
                break  # ours
            if holder != digest:
                _clash(state, ctx)
                return
            await anyio.sleep(0.02)
            if _answered(state, ctx, key, digest):
                return
            if anyio.current_time() > deadline:
                ctx.decline(ResultCode.SYSTEM_ERROR, "duplicate still in flight on another process")
                return
        # The holder releases the key in its journal commit: if that happened between our last
        # look at the journal and the claim, the answer is there now and nobody else can take the
        # key, so look once more (else the copy would reach the issuer a second time).
        if _answered(state, ctx, key, digest):
            claims.release(key)
            return
        ctx.claimed = True
    state.inflight[key] = InFlight(digest)
    ctx.dup_key = key


def _answered(state: SwitchState, ctx: Context, key: str, digest: str) -> bool:
    """The journal already holds the answer to this key: resend it, or 94 for other bytes."""
    assert state.store is not None
    rows = state.store.query(
        "SELECT request_digest, response_blob FROM journal WHERE dup_key = ? ORDER BY id LIMIT 1", (key,)
    )
    if not rows:
        return False
    row = rows[0]
    if row["request_digest"] != digest or row["response_blob"] is None:
        _clash(state, ctx)
    else:
        _resend(state, ctx, state.store.unwrap_response(row["response_blob"], key), key)
    return True


class DatabaseClaims:
    """Claims on duplicate keys in the database, for several processes on one PostgreSQL: a key is
    claimed (with the request's digest) before the request is processed and released in the
    request's journal commit; a claim older than ``stale_after`` (a crashed process's) is taken over."""

    def __init__(self, connect: Callable[[], Any], stale_after: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._connect = connect
        self._conn: Any = None
        self.stale_after = stale_after
        self.clock = clock

    def _db(self) -> Any:
        if self._conn is None or getattr(self._conn, "closed", False):
            self._conn = self._connect()
        return self._conn

    def claim(self, key: str, digest: str) -> str | None:
        """None when the key is now ours; else the digest of the request holding it.

        The holder may release the key (its journal commit) between our insert, which met its
        claim, and our read of the holder's digest: the key is free then, so claim it again
        rather than report a holder that is gone (a copy of the same bytes was answered 94)."""
        conn = self._db()
        for _ in range(CLAIM_ATTEMPTS):
            now = self.clock()
            with conn.transaction():
                conn.execute("DELETE FROM dup_claims WHERE dup_key = %s AND created_at < %s",
                             (key, now - self.stale_after))
                got = conn.execute(
                    "INSERT INTO dup_claims (dup_key, digest, created_at) VALUES (%s, %s, %s)"
                    " ON CONFLICT DO NOTHING RETURNING 1", (key, digest, now),
                ).fetchone()
                if got is not None:
                    return None
                row = conn.execute("SELECT digest FROM dup_claims WHERE dup_key = %s", (key,)).fetchone()
            if row is not None:
                return str(row[0])
        # claimed and released again at every attempt: some holder keeps finishing the same key;
        # "" is no request's digest, so the caller answers 94 rather than process it once more
        return ""

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def held(self, prefix: str, mtis: tuple[str, ...]) -> bool:
        """Whether a live claim (of any process) starts with ``prefix`` and ends with one of
        ``mtis``: a request of that terminal and batch still in flight somewhere."""
        try:
            rows = self._db().execute(
                "SELECT dup_key FROM dup_claims WHERE substr(dup_key, 1, %s) = %s AND created_at >= %s",
                (len(prefix), prefix, self.clock() - self.stale_after),
            ).fetchall()
        except Exception:  # the database is unreachable: nothing to wait for that we can see
            return False
        return any(str(r[0])[-4:] in mtis for r in rows)

    @staticmethod
    def op_release(key: str) -> Op:
        def op(db: Any) -> None:
            db.execute("DELETE FROM dup_claims WHERE dup_key = ?", (key,))

        return op

    def release(self, key: str) -> None:
        try:
            self._db().execute("DELETE FROM dup_claims WHERE dup_key = %s", (key,))
        except Exception:  # it goes stale and is taken over anyway
            pass


def finish(state: SwitchState, ctx: Context, response: bytes | None) -> None:
    """After the journal commit: release copies waiting on this request."""
    if ctx.dup_key is None:
        return
    if ctx.claimed and response is None and state.dup_claims is not None:
        state.dup_claims.release(ctx.dup_key)  # no journal commit released it
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
    ctx.change_terminal("terminal_keys", terminal)
