"""Merchant portal accounts: the ``portal_accounts`` and ``portal_sessions`` tables, scrypt password
hashes, and the login decision with its lockout (5 failures lock the account for 15 minutes).

Owns: creating the portal tables (``CREATE TABLE IF NOT EXISTS``; the store's versioned migrations
do not know them yet), ``set_password`` (the ``switch merchant set-password`` command and the demo
call it), hashing (``hashlib.scrypt``, a random 16-byte salt per hash, n=2**14, r=8, p=1, stored as
``scrypt$n$r$p$salt_b64$hash_b64``), constant-time verification, and counting failures.

Must not: store, log or put into an error message a clear password; tell apart "no such MID" and
"wrong password" to the caller's user (both are one failure, and both cost one scrypt); run scrypt
on the event loop (``check_login`` hands it to a worker thread).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio

from switch.adapters.sqlite_store import SqliteStore

__all__ = [
    "LOCKOUT_SECONDS",
    "MAX_FAILURES",
    "MIN_PASSWORD_LENGTH",
    "AccountError",
    "LoginResult",
    "UnknownMids",
    "check_login",
    "ensure_schema",
    "hash_password",
    "set_password",
    "verify_password",
]

log = logging.getLogger("switch.portal.accounts")

MAX_FAILURES = 5
LOCKOUT_SECONDS = 15 * 60
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 256  # scrypt takes any length; a bound keeps one request's cost bounded
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES = 16
HASH_BYTES = 32

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS portal_accounts (
        mid TEXT PRIMARY KEY REFERENCES merchants(mid), password_hash TEXT NOT NULL,
        failed_count INTEGER NOT NULL DEFAULT 0, locked_until REAL, updated_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS portal_sessions (
        id_hash TEXT PRIMARY KEY, mid TEXT NOT NULL, csrf TEXT NOT NULL,
        created REAL NOT NULL, expires REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS portal_sessions_expires ON portal_sessions(expires)",
)


class AccountError(ValueError):
    """A password or MID the account rules refuse; the message never holds the password."""


# ---- hashing (pure) ------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$16384$8$1$<salt>$<hash>`` (base64), a fresh random salt unless one is given."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=HASH_BYTES
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time comparison of scrypt(password) with a stored hash; False for a malformed one."""
    try:
        scheme, n, r, p, salt_b64, hash_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(hash_b64)
        n_i, r_i, p_i = int(n), int(r), int(p)
    except ValueError:
        return False
    if not (2 <= n_i <= 2**20 and 1 <= r_i <= 32 and 1 <= p_i <= 16):
        return False
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n_i, r=r_i, p=p_i, dklen=len(expected),
        maxmem=256 * n_i * r_i * p_i + 1024 * 1024,
    )
    return hmac.compare_digest(digest, expected)


# scrypt of a password nobody has: a login for an unknown MID costs the same as a real one
_DUMMY_HASH = hash_password(secrets.token_hex(16))


def check_password_rules(password: str) -> None:
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise AccountError(
            f"password must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters"
        )
    if password != password.strip():
        raise AccountError("password must not start or end with whitespace")


# ---- schema and writes outside the running switch ---------------------------------------------
@contextmanager
def _transaction(store: SqliteStore) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE ... COMMIT`` on the store's write connection, under its commit lock
    so a group-commit writer in this process never interleaves (as ``admin.onboarding`` does)."""
    db = store.db
    with store._commit_lock:  # the store has no public transaction API yet
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def ensure_schema(store: SqliteStore) -> None:
    """Create the portal tables if they are missing (idempotent; blocking, call at start)."""
    with _transaction(store) as db:
        for stmt in SCHEMA:
            db.execute(stmt)


def set_password(store: SqliteStore, mid: str, password: str, *, now: datetime | None = None) -> None:
    """Set (or replace) a merchant's portal password; clears its failures and lockout and ends its
    sessions. Blocking (scrypt, then one transaction): from async code use a worker thread."""
    check_password_rules(password)
    stored = hash_password(password)
    stamp = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    ensure_schema(store)
    with _transaction(store) as db:
        if db.execute("SELECT 1 FROM merchants WHERE mid = ?", (mid,)).fetchone() is None:
            raise AccountError(f"merchant {mid} not found")
        db.execute(
            "INSERT INTO portal_accounts (mid, password_hash, failed_count, locked_until, updated_at)"
            " VALUES (?, ?, 0, NULL, ?) ON CONFLICT(mid) DO UPDATE SET"
            " password_hash = excluded.password_hash, failed_count = 0, locked_until = NULL,"
            " updated_at = excluded.updated_at",
            (mid, stored, stamp),
        )
        db.execute("DELETE FROM portal_sessions WHERE mid = ?", (mid,))
    log.info("portal password set for merchant %s", mid)


# ---- the login decision (async, in the running portal) ----------------------------------------
@dataclass(frozen=True)
class LoginResult:
    ok: bool
    locked_until: float | None = None  # set when the account is locked (now or by this failure)
    failures: int = 0  # consecutive failures counted so far (0 after a success)

    @property
    def locked(self) -> bool:
        return self.locked_until is not None


class UnknownMids:
    """Failed logins for well-formed MIDs that have no portal account, counted and locked like an
    account's, so that after ``MAX_FAILURES`` both answer "locked" alike and without an scrypt
    (security review I: only MIDs with an account locked, which told them apart). Kept in memory,
    at most ``size`` MIDs (the oldest forgotten first): nothing to store for a MID that does not
    exist, and a flood of made-up MIDs costs bounded memory."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[int, float | None]] = OrderedDict()

    def locked_until(self, mid: str, now: float) -> float | None:
        failed, until = self._entries.get(mid, (0, None))
        return until if until is not None and until > now else None

    def failed(self, mid: str, now: float) -> LoginResult:
        failed, until = self._entries.pop(mid, (0, None))
        if until is not None and until <= now:  # a lockout that ran out: start counting again
            failed = 0
        failed += 1
        until = now + LOCKOUT_SECONDS if failed >= MAX_FAILURES else None
        self._entries[mid] = (failed, until)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return LoginResult(False, until, failed)


async def check_login(
    store: SqliteStore,
    mid: str,
    password: str,
    *,
    on_success: Callable[[sqlite3.Connection], None] | None = None,
    clock: Callable[[], float] = time.time,
    unknown: UnknownMids | None = None,
) -> LoginResult:
    """Verify ``password`` for ``mid`` and count the outcome, through the store's group-commit
    writer (it must be running). A locked account is refused without looking at the password.
    ``on_success`` runs in the same transaction as the reset of the failure count (the caller
    creates its session there), and only when the account was still unlocked at commit time."""
    rows = store.query("SELECT * FROM portal_accounts WHERE mid = ?", (mid,))
    row = rows[0] if rows else None
    now = clock()
    if row is not None and row["locked_until"] is not None and float(row["locked_until"]) > now:
        return LoginResult(False, float(row["locked_until"]), int(row["failed_count"]))
    if row is None and unknown is not None and mid and (until := unknown.locked_until(mid, now)) is not None:
        return LoginResult(False, until, MAX_FAILURES)
    stored = str(row["password_hash"]) if row is not None else _DUMMY_HASH
    if len(password) > MAX_PASSWORD_LENGTH:
        password = ""  # still one scrypt, of something that cannot match
    matches = await anyio.to_thread.run_sync(verify_password, password, stored)
    if row is None:
        # a malformed MID ("") is no account anyone could hold: never locked, always 401
        return unknown.failed(mid, clock()) if unknown is not None and mid else LoginResult(False)
    outcome: list[LoginResult] = []

    def op(db: sqlite3.Connection) -> None:
        cur = db.execute("SELECT failed_count, locked_until FROM portal_accounts WHERE mid = ?", (mid,))
        current = cur.fetchone()
        if current is None:  # the account went away meanwhile
            outcome.append(LoginResult(False))
            return
        failed, locked_until = int(current[0]), current[1]
        at = clock()
        if locked_until is not None and float(locked_until) > at:
            outcome.append(LoginResult(False, float(locked_until), failed))
            return
        if locked_until is not None:  # a lockout that ran out: start counting again
            failed = 0
        if matches:
            db.execute(
                "UPDATE portal_accounts SET failed_count = 0, locked_until = NULL WHERE mid = ?", (mid,)
            )
            if on_success is not None:
                on_success(db)
            outcome.append(LoginResult(True))
            return
        failed += 1
        until = at + LOCKOUT_SECONDS if failed >= MAX_FAILURES else None
        db.execute(
            "UPDATE portal_accounts SET failed_count = ?, locked_until = ? WHERE mid = ?",
            (failed, until, mid),
        )
        outcome.append(LoginResult(False, until, failed))

    await store.write(op)
    result = outcome[0]
    if result.ok:
        log.info("portal login: merchant %s", mid)
    elif result.locked and result.failures >= MAX_FAILURES and not matches:
        log.warning("portal login: merchant %s locked after %d failures", mid, result.failures)
    else:
        log.info("portal login failed: merchant %s (%d consecutive)", mid, result.failures)
    return result
