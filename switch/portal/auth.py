"""Portal sessions and CSRF tokens.

Owns: the session cookie (``portal_session``: 32 random bytes, urlsafe base64; HttpOnly,
SameSite=Lax, Path=/, Secure when the portal says so), the ``portal_sessions`` rows (only the
SHA-256 of a session id is stored, with its merchant, its CSRF token and its expiry), the
pre-login CSRF cookie of the login form (double submit), and the constant-time token checks.

Must not: store a clear session id, log a session id or token, or decide what a merchant may see
(``app`` scopes every read by the session's MID).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from switch.adapters.sqlite_store import SqliteStore

__all__ = [
    "LOGIN_CSRF_COOKIE",
    "SESSION_COOKIE",
    "SESSION_TTL",
    "Session",
    "csrf_ok",
    "delete_session",
    "load_session",
    "new_token",
    "op_create_session",
]

SESSION_COOKIE = "portal_session"
LOGIN_CSRF_COOKIE = "portal_login_csrf"
SESSION_TTL = 8 * 3600  # seconds: one working day
LOGIN_CSRF_TTL = 3600


@dataclass(frozen=True)
class Session:
    mid: str
    csrf: str
    expires: float


def new_token() -> str:
    """32 random bytes, urlsafe base64 without padding (43 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def id_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()


def tokens_equal(given: str | None, expected: str | None) -> bool:
    """Constant-time; an empty or missing token never matches."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8", "replace"))


def op_create_session(
    mid: str, now: float, *, replaces: str | None = None
) -> tuple[str, str, Callable[[sqlite3.Connection], None]]:
    """A new session id and CSRF token for ``mid``, and the op that stores them (and deletes the
    session it ``replaces`` and every expired one)."""
    session_id, csrf = new_token(), new_token()

    def op(db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM portal_sessions WHERE expires <= ?", (now,))
        if replaces:
            db.execute("DELETE FROM portal_sessions WHERE id_hash = ?", (id_hash(replaces),))
        db.execute(
            "INSERT INTO portal_sessions (id_hash, mid, csrf, created, expires) VALUES (?,?,?,?,?)",
            (id_hash(session_id), mid, csrf, now, now + SESSION_TTL),
        )

    return session_id, csrf, op


def load_session(store: SqliteStore, request: Request, now: float) -> Session | None:
    """The live session named by the request's cookie, or None."""
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id or len(session_id) > 128:
        return None
    rows = store.query(
        "SELECT mid, csrf, expires FROM portal_sessions WHERE id_hash = ? AND expires > ?",
        (id_hash(session_id), now),
    )
    if not rows:
        return None
    row = rows[0]
    return Session(str(row["mid"]), str(row["csrf"]), float(row["expires"]))


async def delete_session(store: SqliteStore, request: Request) -> None:
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id:
        return
    digest = id_hash(session_id)

    def op(db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM portal_sessions WHERE id_hash = ?", (digest,))

    await store.write(op)


def set_session_cookie(response: Response, session_id: str, *, secure: bool) -> None:
    response.set_cookie(
        SESSION_COOKIE, session_id, max_age=SESSION_TTL, path="/", secure=secure, httponly=True,
        samesite="lax",
    )


def clear_session_cookie(response: Response, *, secure: bool) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", secure=secure, httponly=True, samesite="lax")


def set_login_csrf_cookie(response: Response, token: str, *, secure: bool) -> None:
    response.set_cookie(
        LOGIN_CSRF_COOKIE, token, max_age=LOGIN_CSRF_TTL, path="/login", secure=secure,
        httponly=True, samesite="lax",
    )


def csrf_ok(given: str | None, expected: str | None) -> bool:
    return tokens_equal(given, expected)
