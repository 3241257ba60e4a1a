"""Read-only back-office queries shared by the admin HTTP API and the ``switch`` CLI: journal
search (by RRN, TID, business date, response code) and the store-and-forward queue view.

Owns: validating the search parameters (a bad one raises ``QueryError`` naming the parameter),
the SQL of these searches, and what a row may show. A journal row shows only the columns in
``JOURNAL_COLUMNS`` (an allow-list: never ``pan_token``, ``pan_enc``, ``response_blob`` or
``request_digest``), its PAN only masked (first 6 + last 4); a queue row never shows the wrapped
``fields`` blob.

Must not: write anything (every read goes through ``store.query``, the store's read-only
connection), unwrap anything under the master key, know about HTTP or argparse, or log what it
returns.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

from switch.adapters.sqlite_store import SqliteStore
from switch.domain.cards import mask_pan

__all__ = [
    "JOURNAL_COLUMNS",
    "MAX_LIMIT",
    "SAF_COLUMNS",
    "SAF_STATES",
    "QueryError",
    "normalise_date",
    "saf_queue",
    "search_journal",
]

MAX_LIMIT = 1000
SAF_STATES = ("pending", "done", "refused", "all")

# What a journal row may show, in this order. An allow-list, so a column added to the table later
# stays hidden until someone decides it may be shown.
JOURNAL_COLUMNS = (
    "id", "created_at", "business_date", "tid", "mid", "mti", "txn", "pcode", "stan", "batch",
    "rrn", "auth_code", "response_code", "amount_fen", "fee_fen", "currency", "pan_masked",
    "entry_mode", "issuer", "issuer_stan", "issuer_f7", "issuer_response_code", "needs_reversal",
    "latency_us", "issuer_latency_us", "note", "dup_key", "state", "refunded_fen", "original_id",
    "legs",
)
SAF_COLUMNS = (
    "id", "issuer", "kind", "mti", "journal_id", "attempts", "state", "created_at",
    "next_attempt", "last_response", "age_s",
)

_DIGITS = re.compile(r"[0-9]+")  # ASCII only
_RESPONSE_CODE = re.compile(r"[0-9A-Z]{2}")
_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})|([0-9]{4})([0-9]{2})([0-9]{2})")


class QueryError(ValueError):
    """A search parameter that is not acceptable; the message names the parameter."""


def _digits(value: str, length: int, what: str) -> str:
    text = value.strip()
    if len(text) != length or _DIGITS.fullmatch(text) is None:
        raise QueryError(f"{what} must be {length} digits")
    return text


def normalise_date(value: str) -> str:
    """``YYYY-MM-DD`` or ``YYYYMMDD`` (a real calendar day) -> ``YYYYMMDD`` (the journal's
    ``business_date``, an Asia/Shanghai day, protocol §9.6)."""
    text = value.strip()
    m = _DATE.fullmatch(text)
    if m is None:
        raise QueryError("date must be YYYY-MM-DD or YYYYMMDD")
    year, month, day_of_month = (int(g) for g in m.groups() if g is not None)
    try:
        day = datetime(year, month, day_of_month)
    except ValueError:
        raise QueryError("date is not a calendar day") from None
    return day.strftime("%Y%m%d")


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return limit


def _masked(pan: Any) -> Any:
    """Stored PANs are already masked; a value that still looks like a clear PAN (digits only)
    is masked here too, so no clear PAN can leave through a search."""
    if isinstance(pan, str) and _DIGITS.fullmatch(pan) is not None:
        return mask_pan(pan)
    return pan


def search_journal(
    store: SqliteStore,
    *,
    rrn: str | None = None,
    tid: str | None = None,
    date: str | None = None,
    response_code: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Journal rows matching every given filter, newest first, at most ``limit`` (1 to
    ``MAX_LIMIT``). ``rrn``: 12 digits; ``tid``: 8 digits; ``date``: business date,
    ``YYYY-MM-DD`` or ``YYYYMMDD``; ``response_code``: two characters (F39, e.g. ``00``,
    ``A0``; case-insensitive). Each row has the keys of ``JOURNAL_COLUMNS``."""
    where: list[str] = []
    params: list[Any] = []
    if rrn is not None:
        where.append("rrn = ?")
        params.append(_digits(rrn, 12, "rrn"))
    if tid is not None:
        where.append("tid = ?")
        params.append(_digits(tid, 8, "tid"))
    if date is not None:
        where.append("business_date = ?")
        params.append(normalise_date(date))
    if response_code is not None:
        code = response_code.strip().upper()
        if _RESPONSE_CODE.fullmatch(code) is None:
            raise QueryError("response code must be two letters or digits")
        where.append("response_code = ?")
        params.append(code)
    params.append(_limit(limit))
    sql = (
        f"SELECT {', '.join(JOURNAL_COLUMNS)} FROM journal"
        f" WHERE {' AND '.join(where) or '1=1'} ORDER BY id DESC LIMIT ?"
    )
    rows = store.query(sql, params)
    for row in rows:
        row["pan_masked"] = _masked(row["pan_masked"])
        row["needs_reversal"] = bool(row["needs_reversal"])
    return rows


def _iso(epoch: Any) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(float(epoch), UTC).isoformat(timespec="seconds")


def saf_queue(
    store: SqliteStore, *, state: str = "pending", limit: int = 100, now: float | None = None
) -> list[dict[str, Any]]:
    """Store-and-forward messages in ``state`` (``pending``, ``done``, ``refused``, or ``all``),
    oldest first, at most ``limit``. Times are ISO 8601 UTC; ``age_s`` is whole seconds since the
    message was queued (at ``now``, epoch seconds, default the current time). Never the wrapped
    message fields."""
    if state not in SAF_STATES:
        raise QueryError(f"state must be one of {', '.join(SAF_STATES)}")
    at = time.time() if now is None else now
    sql = (
        "SELECT id, issuer, kind, mti, journal_id, attempts, state, created_at, next_attempt,"
        " last_response FROM saf_queue"
        + ("" if state == "all" else " WHERE state = ?")
        + " ORDER BY id LIMIT ?"
    )
    params: list[Any] = ([] if state == "all" else [state]) + [_limit(limit)]
    out: list[dict[str, Any]] = []
    for row in store.query(sql, params):
        created = float(row["created_at"])
        out.append({
            "id": row["id"], "issuer": row["issuer"], "kind": row["kind"], "mti": row["mti"],
            "journal_id": row["journal_id"], "attempts": int(row["attempts"]),
            "state": row["state"], "created_at": _iso(created),
            "next_attempt": _iso(row["next_attempt"]), "last_response": row["last_response"],
            "age_s": max(0, int(at - created)),
        })
    return out
