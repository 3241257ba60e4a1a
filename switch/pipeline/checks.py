"""The checks of protocol §12.1, steps 2-8, in order. Each participant looks at the Context,
records a ResultCode on a decline and returns; the manager stops at the first decline.

Step 5 (duplicates) and step 9 (originals, monthly limit) belong to later transactions and
are not in this slice; see specs/decisions.md.
"""

from __future__ import annotations

import time

from switch.core.transactions import MANAGEMENT_MTIS, Field60, classify
from switch.crypto.mac import verify_mac
from switch.crypto.track import TrackError, decrypt_track
from switch.domain.cards import expiry_from_track2, luhn_ok, pan_from_track2
from switch.domain.codes import ResultCode
from switch.domain.model import Terminal
from switch.pipeline.context import Context, SwitchState


def check_terminal(state: SwitchState, ctx: Context) -> None:
    """Step 2: F41 names an active terminal (97); F42 is its merchant and that merchant is active (03).
    An activation finds its terminal by the code instead (§9.1, pipeline/activation.py)."""
    if ctx.txn is not None and ctx.txn.name == "activation":
        return
    terminal = state.terminals.get(ctx.request.tid)
    if terminal is None or not terminal.active:
        ctx.decline(ResultCode.TERMINAL_INVALID, "terminal unknown or not active")
        ctx.terminal = terminal  # a known terminal still gets header digit 6 (§2)
        return
    ctx.terminal = terminal
    merchant = state.merchants.get(terminal.mid)
    ctx.merchant = merchant
    if merchant is None or ctx.request.mid != terminal.mid or not merchant.active:
        ctx.decline(ResultCode.MERCHANT_INVALID, "merchant mismatch or disabled")


def classify_request(ctx: Context) -> None:
    """Not a check: the §6 type and field 60 are known before step 2 so that even a request
    declined early gets the response layout of its kind (e.g. a sign-on's 32 and 37)."""
    raw60 = ctx.request.fields.get(60)
    ctx.f60 = Field60.parse(raw60) if isinstance(raw60, str) else None
    ctx.txn = classify(ctx.request.mti, ctx.request.fields)


def check_transaction_key(state: SwitchState, ctx: Context) -> None:
    """Step 3: the §6 key is in the table and served by this build (40)."""
    if ctx.txn is None or not ctx.txn.implemented:
        ctx.decline(ResultCode.NOT_SUPPORTED, "transaction key not supported")


def check_signed_on_and_mac(state: SwitchState, ctx: Context) -> None:
    """Step 4: financial requests, settlement and batch upload need working keys (77), then the MAC (A0)."""
    txn, terminal = ctx.txn, ctx.terminal
    assert txn is not None
    needs_keys = txn.financial or ctx.request.mti in ("0500", "0320")
    if not needs_keys:
        return
    assert terminal is not None
    if not terminal.signed_on:
        refresh_terminal(state, terminal)  # another process sharing the store may have signed it on
    if not terminal.signed_on:
        ctx.decline(ResultCode.SIGN_ON_FIRST, "not signed on")
        return
    if not txn.mac:
        return
    f64 = ctx.request.fields.get(64)
    assert terminal.mak is not None
    if isinstance(f64, bytes) and verify_mac(terminal.mak, ctx.request.mab, f64):
        terminal.mac_failures.clear()
        ctx.mak = terminal.mak
        return
    if isinstance(f64, bytes) and refresh_terminal(state, terminal) and terminal.mak is not None \
            and verify_mac(terminal.mak, ctx.request.mab, f64):
        terminal.mac_failures.clear()  # the keys of a sign-on another process served
        ctx.mak = terminal.mak
        return
    state.metrics.mac_failure()
    now = time.monotonic()
    window = state.settings.mac_failure_window
    terminal.mac_failures[:] = [t for t in terminal.mac_failures if now - t < window] + [now]
    ctx.decline(ResultCode.MAC_FAILURE, "MAC missing or wrong")
    if len(terminal.mac_failures) >= state.settings.mac_failure_limit:
        # §10.1: five consecutive failures in 10 minutes revoke the working keys
        terminal.revoke_keys()
        terminal.mac_failures.clear()
        ctx.note = "MAC failure limit reached: working keys revoked"
        ctx.change_terminal("terminal_keys", terminal)


def refresh_terminal(state: SwitchState, terminal: Terminal) -> bool:
    """Re-read a terminal's working keys and batch from the store (only on the paths where a
    request does not match what this process holds: several processes may share one store).
    True when something changed."""
    store = state.store
    if store is None or terminal.keys_pending:  # a change of ours is in commit: memory is newer
        return False
    fresh = store.load_terminals("tid = ?", (terminal.tid,), reader=True).get(terminal.tid)
    if fresh is None:
        return False
    before = (terminal.key_mode, terminal.pik, terminal.mak, terminal.tdk, terminal.batch_no, terminal.batch_date)
    after = (fresh.key_mode, fresh.pik, fresh.mak, fresh.tdk, fresh.batch_no, fresh.batch_date)
    if before == after:
        return False
    terminal.key_mode, terminal.pik, terminal.mak, terminal.tdk = fresh.key_mode, fresh.pik, fresh.mak, fresh.tdk
    terminal.batch_no, terminal.batch_date = fresh.batch_no, fresh.batch_date
    return True


def restore_terminal(state: SwitchState, terminal: Terminal) -> None:
    """After a journal commit that failed: what the request changed in memory (keys, batch,
    parameters version, activation) never reached the store; take the store's values back, unless
    another change of this process to the terminal is still being committed."""
    store = state.store
    if store is None or terminal.keys_pending:
        return
    fresh = store.load_terminals("tid = ?", (terminal.tid,), reader=True).get(terminal.tid)
    if fresh is None:
        return
    terminal.state, terminal.tmk = fresh.state, fresh.tmk
    terminal.key_mode, terminal.pik, terminal.mak, terminal.tdk = fresh.key_mode, fresh.pik, fresh.mak, fresh.tdk
    terminal.batch_no, terminal.batch_date = fresh.batch_no, fresh.batch_date
    terminal.params_version = fresh.params_version


def check_batch_and_day(state: SwitchState, ctx: Context) -> None:
    """Step 6: 0100/0200/0220 must use the open batch, and that batch must not be from an
    earlier business day (77: settle and sign on, §9.6)."""
    if ctx.request.mti not in ("0100", "0200", "0220"):
        return
    terminal = ctx.terminal
    assert terminal is not None
    if ctx.f60 is not None and ctx.f60.batch != terminal.batch:
        refresh_terminal(state, terminal)  # a settlement another process served moves the batch
    if ctx.f60 is None or ctx.f60.batch != terminal.batch:
        ctx.decline(ResultCode.SIGN_ON_FIRST, "batch is not the terminal's open batch")
        return
    if terminal.batch_date is not None and terminal.batch_date < ctx.business_date:
        ctx.decline(ResultCode.SIGN_ON_FIRST, "batch from an earlier business day must be settled")
        return
    if terminal.batch_date is None:
        terminal.batch_date = ctx.business_date
        ctx.change_terminal("terminal_batch", terminal)


def _pin_entered(ctx: Context) -> bool:
    f22 = ctx.request.fields.get(22)
    return isinstance(f22, str) and len(f22) == 3 and f22[2] == "1"


# §6.1: fields mandatory per type, beyond 3, 11, 22, 25, 49, 64 (and 4 / card, checked apart)
EXTRA_MANDATORY: dict[str, tuple[int, ...]] = {
    "consume_void": (37, 61),
    "completion_void": (37, 61),
    "refund": (37, 61),
    "pre_auth_void": (38, 61),
    "completion": (38, 61),
    "completion_advice": (38, 61),
    "transfer": (48,),
}
NO_AMOUNT = frozenset({"balance_inquiry"})


def check_mandatory(state: SwitchState, ctx: Context) -> None:
    """Step 7: the mandatory fields of §6.1 (30) and the amount (13)."""
    txn = ctx.txn
    assert txn is not None
    f = ctx.request.fields
    if ctx.request.mti in MANAGEMENT_MTIS:
        if 11 not in f and txn.name != "echo_test":
            ctx.decline(ResultCode.FORMAT_ERROR, "F11 missing")
        return
    if txn.name == "reversal":
        _check_reversal_fields(ctx)
        return
    for k in (3, 11, 22, 25, 49, 64) + EXTRA_MANDATORY.get(txn.name, ()):
        if k not in f:
            ctx.decline(ResultCode.FORMAT_ERROR, f"F{k} missing")
            return
    if 61 in EXTRA_MANDATORY.get(txn.name, ()) and len(str(f[61])) < (
        12 if txn.name in ("consume_void", "completion_void") else 16
    ):
        ctx.decline(ResultCode.FORMAT_ERROR, "F61 shorter than batch + STAN (+ date)")
        return
    pin_fields = [k for k in (26, 52) if k in f]
    if _pin_entered(ctx):
        if len(pin_fields) != 2 or 53 not in f:
            ctx.decline(ResultCode.FORMAT_ERROR, "PIN entered but 26/52/53 incomplete")
            return
    elif pin_fields:
        ctx.decline(ResultCode.FORMAT_ERROR, "PIN fields without a PIN entry mode")
        return
    f53 = f.get(53)
    if isinstance(f53, str) and f53[:1] != ("2" if _pin_entered(ctx) else "0"):
        # §4: digit 1 is 2 with a PIN (format 0 with PAN), else 0; any other value declares a
        # PIN block this switch cannot read, or one the request does not carry
        ctx.decline(ResultCode.FORMAT_ERROR, "F53 digit 1 does not match the PIN entry")
        return
    if not _read_card(ctx):
        return
    if txn.name not in NO_AMOUNT:
        if not _read_amount(ctx):
            return
    if is_wallet_request(ctx) and (ctx.pan is None or len(ctx.pan) != 18 or 35 in f):
        ctx.decline(ResultCode.FORMAT_ERROR, "a payment code is 18 digits in F2")


def _check_reversal_fields(ctx: Context) -> None:
    """§11: the 0400 repeats the original's fields, plus 39 and 64. F2 only when the original
    carried it (a swiped original's reversal has no card number)."""
    f = ctx.request.fields
    for k in (3, 11, 25, 39, 49, 64):
        if k not in f:
            ctx.decline(ResultCode.FORMAT_ERROR, f"F{k} missing")
            return
    if 2 in f:
        ctx.pan = str(f[2])
    if 4 in f:
        _read_amount(ctx)


def _read_amount(ctx: Context) -> bool:
    amount = ctx.request.fields.get(4)
    if not isinstance(amount, str) or not amount.isdigit() or int(amount) == 0:
        ctx.decline(ResultCode.INVALID_AMOUNT, "amount missing or zero")
        return False
    ctx.amount_fen = int(amount)
    return True


def _read_card(ctx: Context) -> bool:
    """PAN (and expiry) from F2 / F14 or from track 2, decrypting a TDK-encrypted track (§10.3).
    §6.1: "2 or 35 M (35 for a swipe, 2 otherwise)"."""
    f = ctx.request.fields
    swipe = str(f.get(22, ""))[:2] == "02"
    if swipe and 35 not in f:
        ctx.decline(ResultCode.FORMAT_ERROR, "a swipe carries track 2 (F35)")
        return False
    if not swipe and 2 not in f:
        ctx.decline(ResultCode.FORMAT_ERROR, "a card not swiped carries F2")
        return False
    f53 = f.get(53)
    encrypted_track = isinstance(f53, str) and f53[2:3] == "1"
    if encrypted_track and ctx.terminal is not None and ctx.terminal.key_mode != "004":
        ctx.decline(ResultCode.FORMAT_ERROR, "encrypted track without a 004 sign-on")
        return False
    if encrypted_track and isinstance(f.get(36), str):
        assert ctx.terminal is not None and ctx.terminal.tdk is not None
        try:  # track 3 is not used, but like track 2 it must decrypt to digits and separators
            decrypt_track(ctx.terminal.tdk, str(f[36]))
        except TrackError:
            ctx.decline(ResultCode.FORMAT_ERROR, "track 3 does not decrypt")
            return False
    if 35 in f:
        # a clear track with a non-digit nibble failed decoding already (step 1, core/messages.py)
        track = str(f[35])
        if encrypted_track:
            assert ctx.terminal is not None and ctx.terminal.tdk is not None
            try:
                track = decrypt_track(ctx.terminal.tdk, track)
            except TrackError:
                ctx.decline(ResultCode.FORMAT_ERROR, "track does not decrypt")
                return False
        ctx.track2 = track
        ctx.pan = pan_from_track2(track)
        ctx.expiry = expiry_from_track2(track)
        if ctx.pan is None:
            ctx.decline(ResultCode.FORMAT_ERROR, "track 2 has no PAN")
            return False
    if 2 in f and not swipe:  # §6.1: F2 is not a swipe's field ("35 for a swipe"): ignored then
        ctx.pan = str(f[2])
    if ctx.pan is None:
        ctx.decline(ResultCode.FORMAT_ERROR, "neither F2 nor F35")
        return False
    if isinstance(f.get(14), str):
        ctx.expiry = str(f[14])
    return True


# §6/§7: F22 `03` selects scan-to-pay on the consume key, and "a scan-to-pay can be voided and
# refunded like a consume"; every other transaction's F2 is a card number (Luhn, BIN route)
WALLET_TRANSACTIONS = frozenset({"scan_to_pay", "consume_void", "refund"})


def is_wallet_request(ctx: Context) -> bool:
    """Scan-to-pay and its void and refund: F22 entry mode 03 (barcode/QR), F2 a payment code."""
    return (str(ctx.request.fields.get(22, ""))[:2] == "03" and ctx.txn is not None
            and ctx.txn.name in WALLET_TRANSACTIONS)


def check_card_and_route(state: SwitchState, ctx: Context) -> None:
    """Step 8: Luhn (14), then a route (15). Card numbers route by BIN (longest prefix), payment
    codes of scan-to-pay by their prefix to a wallet and carry no Luhn digit (§7). The chosen
    issuer is named in F44 even if its link is down. A transfer's destination (F48) is checked
    the same way."""
    txn = ctx.txn
    if ctx.request.mti in MANAGEMENT_MTIS or txn is None:
        return
    if txn.name == "reversal":
        return  # the original decides; a swiped original's 0400 carries no card number
    assert ctx.pan is not None
    if is_wallet_request(ctx):
        ctx.issuer = state.wallet_routes.route(ctx.pan)
        if ctx.issuer is None:
            ctx.decline(ResultCode.NO_ROUTE, "no wallet for this payment code")
        return
    transfer = txn.name == "transfer"
    dest = str(ctx.request.fields.get(48, "")) if transfer else ""
    # step 8 is "Luhn -> 14; route -> 15": both cards of a transfer pass Luhn before either is routed
    if not luhn_ok(ctx.pan):
        ctx.decline(ResultCode.INVALID_CARD, "card number fails Luhn")
        return
    if transfer and not luhn_ok(dest):
        ctx.decline(ResultCode.INVALID_CARD, "destination card fails Luhn")
        return
    ctx.issuer = state.routes.route(ctx.pan)
    if ctx.issuer is None:
        ctx.decline(ResultCode.NO_ROUTE, "no route for BIN")
        return
    if transfer:
        if state.routes.route(dest) is None:
            ctx.decline(ResultCode.NO_ROUTE, "no route for the destination card")
        elif dest == ctx.pan:
            ctx.decline(ResultCode.INVALID_STATE, "destination is the source card")
