"""Merchant and terminal onboarding (protocol §9.1, §9.2, §13): the back-office API that the
``switch merchant`` / ``switch terminal`` commands (and later the admin HTTP API) call.

Owns: the onboarding rules (merchant types and their monthly limits, fee-rate bounds, ID card and
settlement-account checks, one main terminal per merchant, secondaries linked to a main of the same
merchant, the disable cascade from a main to its secondaries), MID/TID and activation-code
issuance, and the masked views an owner uses to verify whose terminal it is. Every change runs in
one ``BEGIN IMMEDIATE ... COMMIT`` on ``store.db`` and stamps the changed rows with a fresh
``change_seq`` so a running switch reloads them.

Must not: keep, return, log or put into an error message the clear ID card number, settlement
account or activation code beyond the one return value that hands the code to the operator (the ID
card and account are stored wrapped under the master key, the code only as its SHA-256); touch
keys or the journal; know anything of the wire.
"""

from __future__ import annotations

import logging
import re
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from switch.adapters.sqlite_store import SqliteStore, legacy_code_hash
from switch.admin import bump_change_seq
from switch.domain.money import DEFAULT_FEE_RATE

__all__ = [
    "ACTIVATION_TTL",
    "ENTERPRISE_DEFAULT_LIMIT_FEN",
    "MAX_FEE_RATE",
    "MICRO_LIMIT_FEN",
    "MerchantView",
    "OnboardingError",
    "TerminalSummary",
    "TerminalView",
    "add_merchant",
    "add_terminal",
    "id_card_check_char",
    "mask_account",
    "mask_id_card",
    "new_activation_code",
    "set_merchant_state",
    "set_terminal_state",
    "show_merchant",
    "show_terminal",
    "upgrade_to_enterprise",
]

log = logging.getLogger("switch.admin.onboarding")

MICRO_LIMIT_FEN = 300_000_00  # §13: a micro merchant's monthly limit, never above
ENTERPRISE_DEFAULT_LIMIT_FEN = 5_000_000_00
MAX_FEE_RATE = Decimal("0.05")
FEE_RATE_STEP = Decimal("0.0001")  # 0.01 %: what parameter download tag 06 can show exactly
ACTIVATION_TTL = timedelta(hours=24)  # §9.1
SHOP_NAME_MAX_GBK_BYTES = 40  # one receipt line (F63 and tag 01 carry it as GBK)
DEVICE_SERIAL_MAX = 50

KINDS = ("micro", "enterprise")
ROLES = ("main", "secondary")
SETTABLE_STATES = ("active", "disabled")

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also accepts '１' and '٣'
_SERIAL = re.compile(r"[A-Za-z0-9._:/-]+")
_GENERATE_ATTEMPTS = 100


class OnboardingError(ValueError):
    """A request the onboarding rules refuse; the message says why and never holds the clear ID
    card or account."""


@dataclass(frozen=True)
class TerminalSummary:
    tid: str
    role: str
    main_tid: str | None
    state: str
    device_serial: str | None


@dataclass(frozen=True)
class TerminalView:
    """What an owner sees to verify whose terminal this is (masked)."""

    tid: str
    role: str
    main_tid: str | None
    state: str
    device_serial: str | None
    mid: str
    shop_name: str
    owner_name: str | None
    id_card_masked: str | None
    account_masked: str | None
    bank_name: str | None
    merchant_state: str


@dataclass(frozen=True)
class MerchantView:
    mid: str
    kind: str
    shop_name: str
    owner_name: str | None
    id_card_masked: str | None
    account_masked: str | None
    bank_name: str | None
    licence_no: str | None
    fee_rate: Decimal
    monthly_limit_fen: int
    state: str
    created_at: str | None
    terminals: tuple[TerminalSummary, ...]


# ---- pure checks ---------------------------------------------------------------------------
def _ascii_digits(text: str) -> bool:
    return _DIGITS.fullmatch(text) is not None


def id_card_check_char(first17: str) -> str:
    """GB 11643 check character of the first 17 digits of a resident ID card number."""
    if len(first17) != 17 or not _ascii_digits(first17):
        raise OnboardingError("ID card number must start with 17 digits")
    return _ID_CHECK[sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS)) % 11]


def _normalise_id_card(id_card: str) -> str:
    text = id_card.strip().upper()
    if len(text) != 18:
        raise OnboardingError(f"ID card number must be 18 characters, got {len(text)}")
    if id_card_check_char(text[:17]) != text[17]:
        raise OnboardingError("ID card number has a wrong check character (GB 11643)")
    return text


def _normalise_account(bank_account: str) -> str:
    text = bank_account.replace(" ", "")
    if not _ascii_digits(text) or not 12 <= len(text) <= 19:
        raise OnboardingError("settlement bank account must be 12 to 19 digits")
    return text


def mask_id_card(id_card: str) -> str:
    """First 3 and last 4 characters: ``110***********002X``."""
    return id_card[:3] + "*" * max(len(id_card) - 7, 0) + id_card[-4:]


def mask_account(account: str) -> str:
    """First 4 and last 4 digits: ``6222***********1684``."""
    return account[:4] + "*" * max(len(account) - 8, 0) + account[-4:]


def _required_text(value: str, what: str) -> str:
    text = value.strip()
    if not text:
        raise OnboardingError(f"{what} must not be empty")
    return text


def _shop_name(value: str) -> str:
    text = _required_text(value, "shop name")
    try:
        size = len(text.encode("gbk"))
    except UnicodeEncodeError:
        raise OnboardingError("shop name must be printable in GBK (it goes on receipts)") from None
    if size > SHOP_NAME_MAX_GBK_BYTES or not text.isprintable():
        raise OnboardingError(
            f"shop name must be printable text of at most {SHOP_NAME_MAX_GBK_BYTES} GBK bytes"
            f" ({SHOP_NAME_MAX_GBK_BYTES // 2} Chinese characters)"
        )
    return text


def _fee_rate(rate: Decimal) -> Decimal:
    if not isinstance(rate, Decimal) or not rate.is_finite():
        raise OnboardingError("fee rate must be a finite Decimal fraction (0.0060 = 0.60%)")
    if not Decimal(0) < rate <= MAX_FEE_RATE:
        raise OnboardingError(f"fee rate must be above 0 and at most {MAX_FEE_RATE * 100}%")
    if rate != rate.quantize(FEE_RATE_STEP):
        raise OnboardingError("fee rate must be a whole number of 0.01% steps")
    return rate.quantize(FEE_RATE_STEP)


def _limit(kind: str, monthly_limit_fen: int | None) -> int:
    if monthly_limit_fen is None:
        return MICRO_LIMIT_FEN if kind == "micro" else ENTERPRISE_DEFAULT_LIMIT_FEN
    if isinstance(monthly_limit_fen, bool) or not isinstance(monthly_limit_fen, int):
        raise OnboardingError("monthly limit must be an int number of fen")
    if monthly_limit_fen <= 0:
        raise OnboardingError("monthly limit must be above zero")
    if kind == "micro" and monthly_limit_fen > MICRO_LIMIT_FEN:
        raise OnboardingError(
            "a micro merchant's monthly limit cannot be above 300000.00 CNY; upgrade it to enterprise"
        )
    return monthly_limit_fen


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise OnboardingError("now must be timezone-aware")
    return now.astimezone(UTC)


# ---- transactions --------------------------------------------------------------------------
@contextmanager
def _transaction(store: SqliteStore) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE ... COMMIT`` on the store's write connection. The store's commit lock
    is held so an in-process group-commit writer (same connection) never interleaves with it."""
    db = store.db
    with store._commit_lock:  # the store has no public transaction API yet
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def _unique_number(db: sqlite3.Connection, sql: str, low: int, high: int, what: str) -> str:
    """A random number in [low, high) that ``sql`` (one parameter) does not find."""
    for _ in range(_GENERATE_ATTEMPTS):
        value = str(low + secrets.randbelow(high - low))
        if db.execute(sql, (value,)).fetchone() is None:
            return value
    raise OnboardingError(f"could not find a free {what}")


def _row(db: sqlite3.Connection, sql: str, key: str) -> dict[str, Any] | None:
    cur = db.execute(sql, (key,))  # no sqlite3.Row: the PostgreSQL store's connection has none
    row = cur.fetchone()
    return None if row is None else dict(zip([d[0] for d in cur.description], row))


def _merchant_row(db: sqlite3.Connection, mid: str) -> dict[str, Any]:
    row = _row(db, "SELECT * FROM merchants WHERE mid = ?", mid)
    if row is None:
        raise OnboardingError(f"merchant {mid} not found")
    return row


def _terminal_row(db: sqlite3.Connection, tid: str) -> dict[str, Any]:
    row = _row(db, "SELECT * FROM terminals WHERE tid = ?", tid)
    if row is None:
        raise OnboardingError(f"terminal {tid} not found")
    return row


def _read_one(store: SqliteStore, sql: str, key: str, what: str) -> dict[str, Any]:
    """Reads for the views go through the store's read-only connection (committed rows only)."""
    rows = store.query(sql, (key,))
    if not rows:
        raise OnboardingError(f"{what} not found")
    return rows[0]


# ---- merchants -----------------------------------------------------------------------------
def add_merchant(
    store: SqliteStore,
    *,
    kind: str,
    shop_name: str,
    owner_name: str,
    id_card: str,
    bank_account: str,
    bank_name: str,
    licence_no: str | None = None,
    fee_rate: Decimal = DEFAULT_FEE_RATE,
    monthly_limit_fen: int | None = None,
    mid: str | None = None,
    now: datetime | None = None,
) -> str:
    """Onboard a merchant (state ``active``); returns its MID (15 digits, ``898...``)."""
    if kind not in KINDS:
        raise OnboardingError(f"merchant type must be one of {', '.join(KINDS)}")
    shop = _shop_name(shop_name)
    owner = _required_text(owner_name, "owner name")
    bank = _required_text(bank_name, "settlement bank")
    licence = licence_no.strip() if licence_no is not None else None
    if kind == "enterprise" and not licence:
        raise OnboardingError("an enterprise merchant needs a business licence number")
    card = _normalise_id_card(id_card)
    account = _normalise_account(bank_account)
    rate = _fee_rate(fee_rate)
    limit = _limit(kind, monthly_limit_fen)
    if mid is not None and (len(mid) != 15 or not _ascii_digits(mid)):
        raise OnboardingError("MID must be 15 digits")
    created_at = _utc(now).isoformat(timespec="seconds")
    with _transaction(store) as db:
        if mid is None:
            mid = _unique_number(
                db, "SELECT 1 FROM merchants WHERE mid = ?", 898 * 10**12, 899 * 10**12, "MID"
            )
        elif db.execute("SELECT 1 FROM merchants WHERE mid = ?", (mid,)).fetchone() is not None:
            raise OnboardingError(f"merchant {mid} already exists")
        seq = bump_change_seq(store)
        db.execute(
            "INSERT INTO merchants (mid, kind, shop_name, state, fee_rate, monthly_limit_fen,"
            " params_version, owner_name, id_card_enc, bank_account_enc, bank_name, licence_no,"
            " created_at, change_seq) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                mid, kind, shop, "active", str(rate), limit, 1, owner,
                store.master_key.wrap(card.encode(), f"id_card:{mid}"),
                store.master_key.wrap(account.encode(), f"account:{mid}"),
                bank, licence or None, created_at, seq,
            ),
        )
    log.info("merchant %s added (%s)", mid, kind)
    return mid


def upgrade_to_enterprise(
    store: SqliteStore, mid: str, licence_no: str, monthly_limit_fen: int | None = None
) -> None:
    """Make a micro merchant an enterprise (the only way above the micro limit). Raises the
    parameter version so its terminals download the new limit."""
    licence = licence_no.strip()
    if not licence:
        raise OnboardingError("an enterprise merchant needs a business licence number")
    limit = _limit("enterprise", monthly_limit_fen)
    with _transaction(store) as db:
        row = _merchant_row(db, mid)
        if row["kind"] != "micro":
            raise OnboardingError(f"merchant {mid} is already {row['kind']}")
        seq = bump_change_seq(store)
        db.execute(
            "UPDATE merchants SET kind = 'enterprise', licence_no = ?, monthly_limit_fen = ?,"
            " params_version = params_version + 1, change_seq = ? WHERE mid = ?",
            (licence, limit, seq, mid),
        )
    log.info("merchant %s upgraded to enterprise", mid)


def set_merchant_state(store: SqliteStore, mid: str, state: str) -> bool:
    """``active`` or ``disabled``; returns whether the state changed. A disabled merchant's
    terminals keep their own state (the switch answers ``03`` for them)."""
    if state not in SETTABLE_STATES:
        raise OnboardingError(f"merchant state must be one of {', '.join(SETTABLE_STATES)}")
    with _transaction(store) as db:
        row = _merchant_row(db, mid)
        if row["state"] == state:
            return False
        seq = bump_change_seq(store)
        db.execute("UPDATE merchants SET state = ?, change_seq = ? WHERE mid = ?", (state, seq, mid))
    log.info("merchant %s set %s", mid, state)
    return True


def set_webhook(store: SqliteStore, mid: str, url: str | None) -> str | None:
    """Bind (or with None, unbind) the merchant's notification URL. Returns the new signing
    secret (hex), which is shown once: events are signed with HMAC-SHA256 under it
    (switch/adapters/webhooks.py)."""
    if url is not None and not url.startswith(("http://", "https://")):
        raise OnboardingError("webhook URL must start with http:// or https://")
    secret = secrets.token_bytes(32) if url is not None else None
    with _transaction(store) as db:
        _merchant_row(db, mid)
        seq = bump_change_seq(store)
        db.execute(
            "UPDATE merchants SET webhook_url = ?, webhook_secret_enc = ?, change_seq = ? WHERE mid = ?",
            (url, store.master_key.wrap(secret, f"webhook:{mid}") if secret else None, seq, mid),
        )
    log.info("merchant %s webhook %s", mid, "bound" if url else "removed")
    return secret.hex() if secret else None


def _unwrap_text(store: SqliteStore, blob: bytes | None, context: str) -> str | None:
    return None if blob is None else store.master_key.unwrap(blob, context).decode()


def _masked(store: SqliteStore, row: dict[str, Any]) -> tuple[str | None, str | None]:
    mid = row["mid"]
    card = _unwrap_text(store, row["id_card_enc"], f"id_card:{mid}")
    account = _unwrap_text(store, row["bank_account_enc"], f"account:{mid}")
    return (
        None if card is None else mask_id_card(card),
        None if account is None else mask_account(account),
    )


def show_merchant(store: SqliteStore, mid: str) -> MerchantView:
    """The merchant as the back office sees it (ID card and account masked) and its terminals."""
    row = _read_one(store, "SELECT * FROM merchants WHERE mid = ?", mid, f"merchant {mid}")
    card, account = _masked(store, row)
    terminals = tuple(
        TerminalSummary(t["tid"], t["role"], t["main_tid"], t["state"], t["device_serial"])
        for t in store.query(
            "SELECT tid, role, main_tid, state, device_serial FROM terminals WHERE mid = ?"
            " ORDER BY role = 'secondary', tid",
            (mid,),
        )
    )
    return MerchantView(
        mid=mid, kind=row["kind"], shop_name=row["shop_name"], owner_name=row["owner_name"],
        id_card_masked=card, account_masked=account, bank_name=row["bank_name"],
        licence_no=row["licence_no"], fee_rate=Decimal(row["fee_rate"]),
        monthly_limit_fen=int(row["monthly_limit_fen"]), state=row["state"],
        created_at=row["created_at"], terminals=terminals,
    )


# ---- terminals -----------------------------------------------------------------------------
def _new_code(store: SqliteStore, db: sqlite3.Connection, now: datetime) -> tuple[str, str]:
    """8 random digits no other live code has (activation finds the terminal by the code's token,
    ``store.code_token``; a code issued by an older version is kept as ``legacy_code_hash``)."""
    for _ in range(_GENERATE_ATTEMPTS):
        code = f"{secrets.randbelow(10**8):08d}"
        digest = store.code_token(code)
        clash = db.execute(
            "SELECT 1 FROM terminals WHERE activation_code_hash IN (?, ?) AND activation_expires > ?",
            (digest, legacy_code_hash(code), now.timestamp()),
        ).fetchone()
        if clash is None:
            return code, digest
    raise OnboardingError("could not find a free activation code")


def add_terminal(
    store: SqliteStore,
    *,
    mid: str,
    role: str,
    main_tid: str | None = None,
    device_serial: str,
    tid: str | None = None,
    now: datetime | None = None,
) -> tuple[str, str]:
    """Register a terminal awaiting activation; returns (TID, one-time activation code valid
    ``ACTIVATION_TTL``). Only the code's SHA-256 is stored."""
    if role not in ROLES:
        raise OnboardingError(f"terminal role must be one of {', '.join(ROLES)}")
    if role == "main" and main_tid is not None:
        raise OnboardingError("a main terminal has no main TID")
    if role == "secondary" and not main_tid:
        raise OnboardingError("a secondary terminal needs the TID of its main terminal")
    serial = device_serial.strip()
    if not serial or len(serial) > DEVICE_SERIAL_MAX or _SERIAL.fullmatch(serial) is None:
        raise OnboardingError(
            f"device serial must be 1 to {DEVICE_SERIAL_MAX} characters of A-Z a-z 0-9 . _ : / -"
        )
    if tid is not None and (len(tid) != 8 or not _ascii_digits(tid)):
        raise OnboardingError("TID must be 8 digits")
    at = _utc(now)
    with _transaction(store) as db:
        merchant = _merchant_row(db, mid)
        if merchant["state"] != "active":
            raise OnboardingError(f"merchant {mid} is {merchant['state']}")
        if role == "main":
            existing = db.execute(
                "SELECT tid FROM terminals WHERE mid = ? AND role = 'main'", (mid,)
            ).fetchone()
            if existing is not None:
                raise OnboardingError(f"merchant {mid} already has main terminal {existing[0]}")
        else:
            assert main_tid is not None
            main = db.execute(
                "SELECT mid, role, state FROM terminals WHERE tid = ?", (main_tid,)
            ).fetchone()
            if main is None or main[1] != "main" or main[0] != mid:
                raise OnboardingError(f"{main_tid} is not a main terminal of merchant {mid}")
            if main[2] == "disabled":
                raise OnboardingError(f"main terminal {main_tid} is disabled")
        in_use = db.execute(
            "SELECT tid FROM terminals WHERE device_serial = ? AND state != 'disabled'", (serial,)
        ).fetchone()
        if in_use is not None:
            raise OnboardingError(f"device {serial} is already terminal {in_use[0]}")
        if tid is None:
            tid = _unique_number(db, "SELECT 1 FROM terminals WHERE tid = ?", 10**7, 10**8, "TID")
        elif db.execute("SELECT 1 FROM terminals WHERE tid = ?", (tid,)).fetchone() is not None:
            raise OnboardingError(f"terminal {tid} already exists")
        code, digest = _new_code(store, db, at)
        seq = bump_change_seq(store)
        db.execute(
            "INSERT INTO terminals (tid, mid, role, main_tid, state, device_serial,"
            " activation_code_hash, activation_expires, change_seq) VALUES (?,?,?,?,?,?,?,?,?)",
            (tid, mid, role, main_tid, "awaiting_activation", serial, digest,
             (at + ACTIVATION_TTL).timestamp(), seq),
        )
    log.info("terminal %s added to merchant %s (%s)", tid, mid, role)
    return tid, code


def new_activation_code(store: SqliteStore, tid: str, *, now: datetime | None = None) -> str:
    """Re-issue the one-time activation code of a terminal still awaiting activation (the old
    one stops working); valid ``ACTIVATION_TTL`` from ``now``."""
    at = _utc(now)
    with _transaction(store) as db:
        row = _terminal_row(db, tid)
        if row["state"] != "awaiting_activation":
            raise OnboardingError(f"terminal {tid} is {row['state']}, not awaiting activation")
        code, digest = _new_code(store, db, at)
        seq = bump_change_seq(store)
        db.execute(
            "UPDATE terminals SET activation_code_hash = ?, activation_expires = ?, change_seq = ?"
            " WHERE tid = ?",
            (digest, (at + ACTIVATION_TTL).timestamp(), seq, tid),
        )
    log.info("terminal %s: new activation code issued", tid)
    return code


def set_terminal_state(store: SqliteStore, tid: str, state: str) -> list[str]:
    """``active`` or ``disabled``; returns the TIDs whose state changed. Disabling a main also
    disables its secondaries (§9.2); enabling a secondary of a disabled main is refused; a
    terminal never activated (no TMK) goes back to ``awaiting_activation`` when enabled."""
    if state not in SETTABLE_STATES:
        raise OnboardingError(f"terminal state must be one of {', '.join(SETTABLE_STATES)}")
    changed: list[str] = []
    with _transaction(store) as db:
        row = _terminal_row(db, tid)
        if state == "disabled":
            targets = [tid]
            if row["role"] == "main":
                targets += [
                    r[0] for r in db.execute(
                        "SELECT tid FROM terminals WHERE main_tid = ? ORDER BY tid", (tid,)
                    )
                ]
            for t in targets:
                cur = db.execute("SELECT state FROM terminals WHERE tid = ?", (t,)).fetchone()
                if cur[0] != "disabled":
                    changed.append(t)
            new_state = {t: "disabled" for t in changed}
        else:
            if row["state"] != "disabled":
                return []
            if row["role"] == "secondary":
                main = db.execute(
                    "SELECT state FROM terminals WHERE tid = ?", (row["main_tid"],)
                ).fetchone()
                if main is None or main[0] == "disabled":
                    raise OnboardingError(
                        f"main terminal {row['main_tid']} is disabled; enable it first"
                    )
            activated = row["tmk"] is not None or row["activated_at"] is not None
            changed = [tid]
            new_state = {tid: "active" if activated else "awaiting_activation"}
        if not changed:
            return []
        seq = bump_change_seq(store)
        for t in changed:
            db.execute(
                "UPDATE terminals SET state = ?, change_seq = ? WHERE tid = ?", (new_state[t], seq, t)
            )
    log.info("terminals %s set %s", ",".join(changed), state)
    return changed


def show_terminal(store: SqliteStore, tid: str) -> TerminalView:
    """The owner-verification view: whose terminal this is, ID card and account masked."""
    t = _read_one(store, "SELECT * FROM terminals WHERE tid = ?", tid, f"terminal {tid}")
    m = _read_one(store, "SELECT * FROM merchants WHERE mid = ?", t["mid"], f"merchant {t['mid']}")
    card, account = _masked(store, m)
    return TerminalView(
        tid=tid, role=t["role"], main_tid=t["main_tid"], state=t["state"],
        device_serial=t["device_serial"], mid=t["mid"], shop_name=m["shop_name"],
        owner_name=m["owner_name"], id_card_masked=card, account_masked=account,
        bank_name=m["bank_name"], merchant_state=m["state"],
    )
