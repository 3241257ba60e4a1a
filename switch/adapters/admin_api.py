"""The admin HTTP API: a small JSON-over-HTTP/1.1 server on its own port for the back office.

Owns: the HTTP side of the back-office operations — bearer-token authentication (``Authorization:
Bearer <token>``, compared in constant time; no header → 401 with ``WWW-Authenticate: Bearer``,
a wrong token → 403; a token anywhere else, e.g. the query string, counts for nothing), the
routes, parameter parsing, and turning results and errors into JSON responses:

    GET  /journal?rrn=&tid=&date=&rc=&limit=     journal search (switch.admin.queries)
    GET  /saf?state=&limit=                      store-and-forward queue
    GET  /merchants/{mid}                        merchant, masked, with its terminals
    POST /merchants/{mid}/disable | enable
    GET  /terminals/{tid}                        terminal and its owner, masked
    POST /terminals/{tid}/disable | enable       (disabling a main disables its secondaries)

404 for an unknown route or object, 405 (with ``Allow``) for a wrong method, 400 for a request or
parameter it cannot accept, 409 when the onboarding rules refuse a change, 413/431 for a body or
head over the bounds, and a bare ``internal error`` (never a traceback) if something breaks. One
request per connection, ``Connection: close``; head size, body size, read/write timeouts and the
number of concurrent connections are bounded.

Must not: hold business rules (reads go to ``switch.admin.queries`` and the onboarding views,
changes to ``switch.admin.onboarding``, which runs its own transaction — in a worker thread, so
the event loop never waits on the store's commit lock), log the Authorization header, query
strings or bodies, return anything the onboarding views and queries do not (no keys, no clear PAN,
ID card or account), or let any input crash the server.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import anyio
import anyio.abc
import anyio.to_thread
from anyio.abc import TaskStatus

from switch.adapters.http_endpoint import HttpResponse, drain, find_head_end, serve_bounded
from switch.adapters.sqlite_store import SqliteStore
from switch.admin import onboarding, queries
from switch.admin.onboarding import OnboardingError
from switch.admin.queries import QueryError

__all__ = [
    "AdminRequest",
    "JSON",
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "answer",
    "check_auth",
    "parse_head",
    "serve_admin",
]

log = logging.getLogger("switch.admin_api")

MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 4 * 1024  # no route takes a body; a small one is read and ignored
MAX_HEADERS = 64
MAX_QUERY_FIELDS = 16
READ_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 32

JSON = "application/json; charset=utf-8"
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)  # RFC 9110 tchar
_LIMIT = re.compile(r"[0-9]{1,4}")
_MID = re.compile(r"[0-9]{15}")
_TID = re.compile(r"[0-9]{8}")
_WWW_AUTHENTICATE = ("WWW-Authenticate", 'Bearer realm="switch-admin"')


@dataclass(frozen=True)
class AdminRequest:
    """A parsed request head. ``headers``: lower-case name -> value (the last one wins, except
    for the headers ``parse_head`` refuses to see twice)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]

    @property
    def content_length(self) -> int:
        return int(self.headers.get("content-length", "0"))


def _json(status: HTTPStatus, payload: Any, *headers: tuple[str, str]) -> HttpResponse:
    body = json.dumps(payload, ensure_ascii=False, default=str).encode("utf-8") + b"\n"
    return HttpResponse(status, body, JSON, headers)


def _error(status: HTTPStatus, message: str, *headers: tuple[str, str]) -> HttpResponse:
    return _json(status, {"error": message}, *headers)


# ---- sans-IO: head -> request, auth -----------------------------------------------------------
def parse_head(head: bytes) -> AdminRequest | HttpResponse:
    """Parse a request head (any line endings); an error response if it is not acceptable.
    Never raises."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return _error(HTTPStatus.BAD_REQUEST, "bad request line")
    method, target, version = parts
    if (
        not method
        or not set(method) <= _TOKEN_CHARS
        or not target.startswith("/")
        or not target.isascii()
        or not target.isprintable()
        or version not in ("HTTP/1.0", "HTTP/1.1")
    ):
        return _error(HTTPStatus.BAD_REQUEST, "bad request line")
    headers: dict[str, str] = {}
    fields = [line for line in lines[1:] if line]
    if len(fields) > MAX_HEADERS:
        return _error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
    for line in fields:
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            return _error(HTTPStatus.BAD_REQUEST, "bad header line")
        key = name.lower()
        if key in headers and key in ("authorization", "content-length", "transfer-encoding"):
            return _error(HTTPStatus.BAD_REQUEST, f"repeated {key} header")
        headers[key] = value.strip(" \t")
    if "transfer-encoding" in headers:
        return _error(HTTPStatus.BAD_REQUEST, "transfer-encoding is not supported")
    length = headers.get("content-length", "0")
    if not length.isascii() or not length.isdigit() or len(length) > 12:
        return _error(HTTPStatus.BAD_REQUEST, "bad content-length")
    if int(length) > MAX_BODY_BYTES:
        return _error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
    path, _, query = target.partition("?")
    return AdminRequest(method, path, query, headers)


def check_auth(request: AdminRequest, token: str) -> HttpResponse | None:
    """None if the request carries ``Authorization: Bearer <token>``; else 401 (no bearer
    credentials) or 403 (a wrong token). Only the header counts."""
    value = request.headers.get("authorization")
    if value is None:
        return _error(HTTPStatus.UNAUTHORIZED, "bearer token required", _WWW_AUTHENTICATE)
    scheme, _, credentials = value.partition(" ")
    credentials = credentials.strip(" \t")
    if scheme.lower() != "bearer" or not credentials:
        return _error(HTTPStatus.UNAUTHORIZED, "bearer token required", _WWW_AUTHENTICATE)
    if not hmac.compare_digest(credentials.encode("latin-1"), token.encode("utf-8")):
        return _error(HTTPStatus.FORBIDDEN, "invalid token")
    return None


def _query(request: AdminRequest, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query string's parameters; empty values count as absent. Raises QueryError for an
    unknown or repeated parameter or one that is not UTF-8."""
    try:
        pairs = parse_qsl(
            request.query, keep_blank_values=True, strict_parsing=False,
            errors="strict", max_num_fields=MAX_QUERY_FIELDS,
        )
    except ValueError:  # too many fields, or bytes that are not UTF-8
        raise QueryError("bad query string") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise QueryError(f"unknown parameter (allowed: {', '.join(allowed)})")
        if name in params:
            raise QueryError(f"parameter {name} given twice")
        if value:
            params[name] = value
    return params


def _limit(params: dict[str, str]) -> int:
    text = params.get("limit")
    if text is None:
        return 100
    if _LIMIT.fullmatch(text) is None:
        raise QueryError(f"limit must be a whole number from 1 to {queries.MAX_LIMIT}")
    return int(text)


# ---- handlers ----------------------------------------------------------------------------------
Handler = Callable[[SqliteStore, AdminRequest, re.Match[str]], Awaitable[HttpResponse]]


async def _get_journal(store: SqliteStore, request: AdminRequest, m: re.Match[str]) -> HttpResponse:
    p = _query(request, ("rrn", "tid", "date", "rc", "limit"))
    rows = queries.search_journal(
        store, rrn=p.get("rrn"), tid=p.get("tid"), date=p.get("date"),
        response_code=p.get("rc"), limit=_limit(p),
    )
    return _json(HTTPStatus.OK, {"count": len(rows), "rows": rows})


async def _get_saf(store: SqliteStore, request: AdminRequest, m: re.Match[str]) -> HttpResponse:
    p = _query(request, ("state", "limit"))
    rows = queries.saf_queue(store, state=p.get("state", "pending"), limit=_limit(p))
    return _json(HTTPStatus.OK, {"count": len(rows), "rows": rows})


def _merchant_payload(store: SqliteStore, mid: str) -> dict[str, Any]:
    return dataclasses.asdict(onboarding.show_merchant(store, mid))


def _terminal_payload(store: SqliteStore, tid: str) -> dict[str, Any]:
    return dataclasses.asdict(onboarding.show_terminal(store, tid))


def _exists(store: SqliteStore, table: str, key: str, value: str) -> bool:
    return bool(store.query(f"SELECT 1 FROM {table} WHERE {key} = ?", (value,)))


async def _get_merchant(store: SqliteStore, request: AdminRequest, m: re.Match[str]) -> HttpResponse:
    mid = m[1]
    if _MID.fullmatch(mid) is None or not _exists(store, "merchants", "mid", mid):
        return _error(HTTPStatus.NOT_FOUND, "merchant not found")
    return _json(HTTPStatus.OK, _merchant_payload(store, mid))


async def _set_merchant(store: SqliteStore, request: AdminRequest, m: re.Match[str]) -> HttpResponse:
    mid, action = m[1], m[2]
    if _MID.fullmatch(mid) is None or not _exists(store, "merchants", "mid", mid):
        return _error(HTTPStatus.NOT_FOUND, "merchant not found")
    state = "disabled" if action == "disable" else "active"
    changed = await anyio.to_thread.run_sync(onboarding.set_merchant_state, store, mid, state)
    log.info("admin API: merchant %s %sd (changed: %s)", mid, action, changed)
    return _json(HTTPStatus.OK, {"changed": changed, "merchant": _merchant_payload(store, mid)})


async def _get_terminal(store: SqliteStore, request: AdminRequest, m: re.Match[str]) -> HttpResponse:
    tid = m[1]
    if _TID.fullmatch(tid) is None or not _exists(store, "terminals", "tid", tid):
        return _error(HTTPStatus.NOT_FOUND, "terminal not found")
    return _json(HTTPStatus.OK, _terminal_payload(store, tid))


async def _set_terminal(store: SqliteStore, request: AdminRequest, m: re.Match[str]) -> HttpResponse:
    tid, action = m[1], m[2]
    if _TID.fullmatch(tid) is None or not _exists(store, "terminals", "tid", tid):
        return _error(HTTPStatus.NOT_FOUND, "terminal not found")
    state = "disabled" if action == "disable" else "active"
    changed = await anyio.to_thread.run_sync(onboarding.set_terminal_state, store, tid, state)
    log.info("admin API: terminal %s %sd (changed: %s)", tid, action, ",".join(changed) or "none")
    return _json(HTTPStatus.OK, {"changed": changed, "terminal": _terminal_payload(store, tid)})


# path pattern -> {method: handler}; one table decides
ROUTES: tuple[tuple[re.Pattern[str], dict[str, Handler]], ...] = (
    (re.compile(r"/journal"), {"GET": _get_journal}),
    (re.compile(r"/saf"), {"GET": _get_saf}),
    (re.compile(r"/merchants/([^/]+)"), {"GET": _get_merchant}),
    (re.compile(r"/merchants/([^/]+)/(enable|disable)"), {"POST": _set_merchant}),
    (re.compile(r"/terminals/([^/]+)"), {"GET": _get_terminal}),
    (re.compile(r"/terminals/([^/]+)/(enable|disable)"), {"POST": _set_terminal}),
)


async def _dispatch(store: SqliteStore, request: AdminRequest) -> HttpResponse:
    for pattern, methods in ROUTES:
        m = pattern.fullmatch(request.path)
        if m is None:
            continue
        handler = methods.get(request.method)
        if handler is None:
            return _error(
                HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed", ("Allow", ", ".join(methods))
            )
        try:
            return await handler(store, request, m)
        except QueryError as exc:
            return _error(HTTPStatus.BAD_REQUEST, str(exc))
        except OnboardingError as exc:  # its messages never hold the clear ID card or account
            return _error(HTTPStatus.CONFLICT, str(exc))
    return _error(HTTPStatus.NOT_FOUND, "not found")


async def answer(store: SqliteStore, token: str, request: AdminRequest | HttpResponse) -> HttpResponse:
    """The response to one parsed request (or the parse error itself): auth, then the route.
    Never raises (except cancellation)."""
    if isinstance(request, HttpResponse):
        return request
    denied = check_auth(request, token)
    if denied is not None:
        return denied
    try:
        return await _dispatch(store, request)
    except Exception:
        log.exception("admin API: %s %s failed", request.method, request.path[:100])
        return _error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")


# ---- I/O ---------------------------------------------------------------------------------------
async def _read_request(
    stream: anyio.abc.ByteStream, read_timeout: float
) -> AdminRequest | HttpResponse | None:
    """Read the head and any (bounded) body: the request, an error response, or None to just
    close (timeout, or the peer left without sending anything)."""
    buffer = b""
    with anyio.move_on_after(read_timeout):
        # Bounded: each pass adds >= 1 byte; we stop past MAX_HEAD_BYTES, and the body reads stop
        # at content-length <= MAX_BODY_BYTES.
        while True:
            end = find_head_end(buffer)
            if end >= 0:
                if end > MAX_HEAD_BYTES:
                    return _error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
                request = parse_head(buffer[:end])
                if isinstance(request, HttpResponse):
                    return request
                body = buffer[end:]
                while len(body) < request.content_length:
                    try:
                        body += await stream.receive(request.content_length - len(body))
                    except anyio.EndOfStream:
                        return _error(HTTPStatus.BAD_REQUEST, "request body cut short")
                return request
            if len(buffer) > MAX_HEAD_BYTES:
                return _error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
            try:
                buffer += await stream.receive(MAX_HEAD_BYTES + 4 - len(buffer))
            except anyio.EndOfStream:
                return _error(HTTPStatus.BAD_REQUEST, "bad request") if buffer else None
    log.info("admin API: read timeout, closing connection")
    return None


async def _handle(
    stream: anyio.abc.ByteStream, store: SqliteStore, token: str, read_timeout: float
) -> None:
    async with stream:
        request = await _read_request(stream, read_timeout)
        if request is None:
            return
        response = await answer(store, token, request)
        if isinstance(request, AdminRequest):
            log.info("admin API: %s %s -> %d", request.method, request.path[:100], response.status.value)
        else:
            log.info("admin API: unparsable request -> %d", response.status.value)
        with anyio.move_on_after(WRITE_TIMEOUT_S):
            await stream.send(response.encode())
            await stream.send_eof()
            await drain(stream)


async def serve_admin(
    store: SqliteStore,
    token: str,
    host: str,
    port: int,
    *,
    read_timeout: float = READ_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API on host:port until cancelled; reports the bound port with
    ``task_status.started(port)`` (port 0 picks a free one). Raises ValueError before binding if
    ``token`` is empty: the API never runs unauthenticated. Connections beyond
    ``max_connections`` at once are closed without an answer."""
    if not token or not token.strip():
        raise ValueError("the admin API needs a non-empty bearer token (SWITCH_ADMIN_TOKEN)")
    if token != token.strip(" \t"):
        raise ValueError("the admin API token must not start or end with whitespace")
    async def handle(stream: anyio.abc.SocketStream) -> None:
        await _handle(stream, store, token, read_timeout)

    await serve_bounded(handle, host, port, "admin API", max_connections=max_connections, task_status=task_status)
