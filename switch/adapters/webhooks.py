"""Merchant notifications: a durable outbox of transaction events delivered to merchants' webhooks.

Owns the ``outbox`` table's life cycle (pending → delivered | failed), the event JSON, the
HMAC-SHA256 signature scheme and the delivery worker. It must not decide *which* transactions
notify (the pipeline does, calling :meth:`WebhookOutbox.op_enqueue` only when
:meth:`WebhookOutbox.wants` says the merchant registered a URL), must never deliver on the request
path (only :meth:`WebhookOutbox.run` / :meth:`WebhookOutbox.deliver_due` send HTTP), and must never
put a full PAN, track, PIN, PIN block or key into an event, a log line or ``last_error``.

Enqueueing: ``op_enqueue`` returns an ``Op`` that the pipeline commits in the same group commit as
the journal row, so an event exists if and only if its transaction was journaled, and it survives a
crash or restart. The pipeline then calls :meth:`wake` after the commit (as for store-and-forward).

Event JSON (UTF-8, keys sorted, no spaces; the bytes sent are exactly the bytes stored)::

    {"id": "<uuid4 hex, fixed at enqueue; also X-Switch-Event-Id>",
     "type": "transaction",
     "created_at": "2025-03-01T02:00:00+00:00",      # ISO 8601, UTC, when enqueued
     "mid": "898310048990001", "tid": "10000001",
     "txn": "consume",                               # the pipeline's transaction name
     "response_code": "00", "approved": true,        # approved == (response_code == "00")
     "amount_fen": 12345, "fee_fen": 47,             # int fen (or null), never a float
     "currency": "156",
     "card": "622202*********1684",                  # masked PAN: first 6 + last 4 (or null)
     "rrn": "000000001234", "auth_code": "123456", "stan": "000042", "batch": "000001",
     "business_date": "20250301"}

Keys outside this list are dropped at enqueue; a ``card`` that is not already masked is masked.

Delivery: ``POST`` to the merchant's current ``webhook_url`` (http or https, read at each attempt)
with headers ``Content-Type: application/json``, ``X-Switch-Event-Id``, ``X-Switch-Timestamp``
(unix seconds at this attempt) and ``X-Switch-Signature: sha256=<hex HMAC-SHA256(secret,
timestamp + "." + body)>``; the secret is ``merchants.webhook_secret_enc`` unwrapped under the
master key with context ``webhook:<mid>``. A 2xx answer marks the event delivered. Anything else —
another status (redirects are not followed), a connection error, a timeout, no URL or secret on
file — counts an attempt and schedules the next one at ``now + min(max_delay, base_delay *
2**(attempts-1))``; after ``max_attempts`` attempts the event is ``failed`` and logged. Delivery is
at least once (a crash between the merchant's 2xx and our commit re-sends the same event id) and
not ordered across events; merchants deduplicate on ``X-Switch-Event-Id``. Connections go direct
(proxy environment variables are ignored), with the system's certificate checks for https.

Where a webhook may point: only at public addresses unless ``allow_private`` (configuration
``[webhooks] allow_private``, ``switch demo --webhook-allow-private``). The URL's host is resolved
at every attempt and the connection is made to an address that was checked, never to one that
is loopback, private (RFC 1918, unique-local), link-local (cloud metadata services), multicast,
reserved or unspecified, IPv4-mapped forms included; such an attempt fails as ``address not
allowed`` without a packet sent. Otherwise a merchant could make the switch POST to services on
its own host or network and read their answer's status in the portal (SSRF, security review I).

HTTP uses ``urllib.request`` in a worker thread (no new dependency); at most ``concurrency``
deliveries run at once.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Callable, Mapping

import anyio
import anyio.abc

from switch.adapters.sqlite_store import StoreError
from switch.domain.cards import is_digits, mask_pan

if TYPE_CHECKING:
    from switch.adapters.sqlite_store import JournalEntry, Op, SqliteStore

log = logging.getLogger("switch.webhooks")

IDLE_POLL = 5.0
MAX_RESPONSE_READ = 64 * 1024
MAX_ERROR_TEXT = 200
USER_AGENT = "switch-webhooks/1"

EVENT_KEYS: tuple[str, ...] = (
    "id", "type", "created_at", "mid", "tid", "txn", "response_code", "approved", "amount_fen",
    "fee_fen", "currency", "card", "rrn", "auth_code", "stan", "batch", "business_date",
)


# ---- signatures (pure) --------------------------------------------------------------------------
def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Switch-Signature`` header value: ``sha256=<hex HMAC-SHA256(secret, ts + "." + body)>``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: bytes, timestamp: str, body: bytes, header: str, *, now: float, tolerance: float = 300
) -> bool:
    """What a merchant checks: the signature matches (constant-time) and the timestamp is within
    ``tolerance`` seconds of ``now`` (either side), so a captured request cannot be replayed later."""
    if not is_digits(timestamp) or len(timestamp) > 12:
        return False
    if abs(now - int(timestamp)) > tolerance:
        return False
    expected = sign(secret, timestamp, body).encode("ascii")
    return hmac.compare_digest(expected, header.encode("utf-8", "replace"))


# ---- events -----------------------------------------------------------------------------------
def _masked(card: Any) -> str | None:
    if card is None or card == "":
        return None
    text = str(card)
    return mask_pan(text) if is_digits(text) else text


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def event_from_journal(entry: JournalEntry) -> dict[str, Any]:
    """The event fields of one journal row (the pipeline may pass this to ``op_enqueue``)."""
    return {
        "mid": entry.mid, "tid": entry.tid, "txn": entry.txn, "response_code": entry.response_code,
        "amount_fen": entry.amount_fen, "fee_fen": entry.fee_fen, "currency": entry.currency or "156",
        "card": entry.pan_masked, "rrn": entry.rrn, "auth_code": entry.auth_code, "stan": entry.stan,
        "batch": entry.batch, "business_date": entry.business_date,
    }


def build_event(mid: str, event: Mapping[str, Any], now: float) -> dict[str, Any]:
    """Normalise ``event`` to the documented shape: only known keys, a masked card, int fen."""
    dropped = sorted(k for k in event if k not in EVENT_KEYS)
    if dropped:
        log.warning("webhook event for %s: dropped unknown keys %s", mid, ", ".join(dropped))
    out: dict[str, Any] = {k: event.get(k) for k in EVENT_KEYS}
    code = str(event.get("response_code") or "")
    out.update(
        id=str(event.get("id") or uuid.uuid4().hex),
        type=str(event.get("type") or "transaction"),
        created_at=str(event.get("created_at") or _iso(now)),
        mid=mid,
        response_code=code,
        approved=code == "00",
        currency=str(event.get("currency") or "156"),
        card=_masked(event.get("card")),
    )
    for money in ("amount_fen", "fee_fen"):
        v = out[money]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{money} must be int fen, got {type(v).__name__}")
    return out


def encode_event(event: Mapping[str, Any]) -> str:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# ---- HTTP (runs in a worker thread) -------------------------------------------------------------
@dataclass(frozen=True)
class DeliveryResult:
    ok: bool
    status: int | None  # HTTP status, or None when no answer came
    error: str | None  # short reason for last_error (never the URL, which may hold a token)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is an answer other than 2xx: a failed attempt


class AddressNotAllowed(OSError):
    """The webhook's host is (or resolves only to) an address webhooks may not reach."""


def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A public unicast address: not loopback, private, link-local, multicast, reserved or
    unspecified (an IPv4-mapped IPv6 address is judged as its IPv4 address)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified or not ip.is_global)


def _connect_checked(host: str, port: int, timeout: float | None, allow_private: bool) -> socket.socket:
    """A TCP connection to the first address of ``host`` that may be reached."""
    last: OSError = AddressNotAllowed("address not allowed")
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if not allow_private and not address_allowed(ipaddress.ip_address(str(sockaddr[0]).split("%")[0])):
            continue
        sock = socket.socket(family, kind, proto)
        try:
            if isinstance(timeout, (int, float)):  # else http.client's "no timeout given" sentinel
                sock.settimeout(timeout)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    raise last


class _CheckedHTTPConnection(http.client.HTTPConnection):
    allow_private = False

    def connect(self) -> None:
        self.sock = _connect_checked(self.host, self.port, self.timeout, self.allow_private)


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    allow_private = False

    def connect(self) -> None:
        sock = _connect_checked(self.host, self.port, self.timeout, self.allow_private)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _AnyHTTPConnection(_CheckedHTTPConnection):
    allow_private = True


class _AnyHTTPSConnection(_CheckedHTTPSConnection):
    allow_private = True


def _opener(allow_private: bool) -> urllib.request.OpenerDirector:
    http_conn = _AnyHTTPConnection if allow_private else _CheckedHTTPConnection
    https_conn = _AnyHTTPSConnection if allow_private else _CheckedHTTPSConnection

    class _Http(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(http_conn, req)

    class _Https(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(https_conn, req, context=self._context)  # type: ignore[attr-defined]

    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect(), _Http(), _Https())


_OPENERS = {False: _opener(False), True: _opener(True)}


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float,
          allow_private: bool = False) -> DeliveryResult:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENERS[allow_private].open(request, timeout=timeout) as response:
            status = int(response.status)
            response.read(MAX_RESPONSE_READ)
    except urllib.error.HTTPError as exc:
        exc.close()
        return DeliveryResult(False, exc.code, f"http {exc.code}")
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, AddressNotAllowed):
            return DeliveryResult(False, None, "address not allowed")
        text = type(reason).__name__ if isinstance(reason, BaseException) else "url error"
        if isinstance(reason, OSError) and reason.strerror:
            text += f": {reason.strerror}"
        return DeliveryResult(False, None, text)
    except TimeoutError:
        return DeliveryResult(False, None, "timeout")
    except (OSError, ValueError) as exc:  # connection reset mid-answer, malformed status line...
        return DeliveryResult(False, None, type(exc).__name__)
    if 200 <= status < 300:
        return DeliveryResult(True, status, None)
    return DeliveryResult(False, status, f"http {status}")


class WebhookOutbox:
    """The outbox of merchant notifications and its delivery worker (see the module docstring)."""

    def __init__(
        self,
        store: SqliteStore,
        *,
        timeout: float = 5.0,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        max_attempts: int = 20,
        concurrency: int = 4,
        clock: Callable[[], float] = time.time,
        allow_private: bool = False,
    ) -> None:
        if max_attempts < 1 or concurrency < 1:
            raise ValueError("max_attempts and concurrency must be at least 1")
        self.store = store
        self.timeout = timeout
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_attempts = max_attempts
        self.concurrency = concurrency
        self.clock = clock
        self.allow_private = allow_private  # webhooks may reach loopback/private addresses (tests, demo)
        self._wake = anyio.Event()
        self._busy: set[int] = set()
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._subscribed: frozenset[str] = frozenset()

    # ---- who wants events (in memory; the switch calls refresh on start and on changes) -----
    def refresh(self) -> None:
        rows = self.store.query(
            "SELECT mid FROM merchants WHERE webhook_url IS NOT NULL AND webhook_url != ''"
        )
        self._subscribed = frozenset(str(r["mid"]) for r in rows)

    def wants(self, mid: str) -> bool:
        return mid in self._subscribed

    # ---- queueing (op committed with the journal row) ---------------------------------------
    def op_enqueue(self, mid: str, event: Mapping[str, Any]) -> Op:
        now = self.clock()
        text = encode_event(build_event(mid, event, now))

        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO outbox (mid, event, created_at, next_attempt) VALUES (?,?,?,?)",
                (mid, text, now, now),
            )

        return op

    def wake(self) -> None:
        self._wake.set()

    # ---- the worker -------------------------------------------------------------------------
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver due events, at most ``concurrency`` at once; sleep until the next due event, a
        finished delivery or a wake-up. A slow merchant holds one slot, not the queue."""
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                wait = IDLE_POLL
                try:
                    free = self.concurrency - len(self._busy)
                    for row in self._due_rows(free) if free > 0 else []:
                        self._busy.add(int(row["id"]))
                        tg.start_soon(self._deliver_row, row, True)
                    if len(self._busy) < self.concurrency:
                        due = self._next_due()
                        if due is not None:
                            wait = min(IDLE_POLL, max(0.0, due - self.clock()))
                except Exception:  # the store failing to read: notifications wait, payments go on
                    log.exception("webhook outbox: reading the queue failed; will retry")
                with anyio.move_on_after(wait):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def deliver_due(self) -> int:
        """Attempt every event due now (bounded concurrency) and return how many were attempted.
        For tests and one-shot tools; the switch runs :meth:`run`."""
        rows = self._due_rows(None)
        for row in rows:
            self._busy.add(int(row["id"]))
        async with anyio.create_task_group() as tg:
            for row in rows:
                tg.start_soon(self._deliver_row, row, False)
        return len(rows)

    def _busy_clause(self) -> tuple[str, list[Any]]:
        ids = sorted(self._busy)
        if not ids:
            return "", []
        return f" AND id NOT IN ({','.join('?' for _ in ids)})", list(ids)

    def _due_rows(self, limit: int | None) -> list[dict[str, Any]]:
        clause, params = self._busy_clause()
        sql = f"SELECT * FROM outbox WHERE state = 'pending' AND next_attempt <= ?{clause} ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return self.store.query(sql, [self.clock(), *params])

    def _next_due(self) -> float | None:
        clause, params = self._busy_clause()
        rows = self.store.query(
            f"SELECT MIN(next_attempt) AS t FROM outbox WHERE state = 'pending'{clause}", params
        )
        return float(rows[0]["t"]) if rows and rows[0]["t"] is not None else None

    async def _claim(self, row: dict[str, Any]) -> bool:
        """Take the event for one attempt (several switch processes may share the outbox): move its
        next attempt past this one's timeout, on the condition that it is still due — only one
        worker wins; the attempt's outcome sets the real next attempt."""
        now = self.clock()
        won: list[int] = []

        def op(db: Any) -> None:
            cur = db.execute(
                "UPDATE outbox SET next_attempt = ? WHERE id = ? AND state = 'pending' AND next_attempt = ?",
                (now + self.timeout + 5.0, int(row["id"]), row["next_attempt"]),
            )
            won.append(cur.rowcount)

        await self.store.write(op)
        return bool(won and won[0] == 1)

    async def _deliver_row(self, row: dict[str, Any], wake_after: bool) -> None:
        try:
            async with self._limiter:
                if not await self._claim(row):
                    return  # another process is posting it
                await self._attempt(row)
        except StoreError:  # the outcome was not recorded: the event stays due (at least once)
            log.exception("webhook outbox #%s: could not record the attempt", row["id"])
        except Exception:  # a bug, not the event (unreadable events are failed in _attempt)
            log.exception("webhook outbox #%s: attempt failed; will retry", row["id"])
        finally:
            self._busy.discard(int(row["id"]))
            if wake_after:
                self.wake()

    def _merchant_target(self, mid: str) -> tuple[str | None, bytes | None]:
        rows = self.store.query(
            "SELECT webhook_url, webhook_secret_enc FROM merchants WHERE mid = ?", [mid]
        )
        if not rows:
            return None, None
        url, blob = rows[0]["webhook_url"], rows[0]["webhook_secret_enc"]
        secret = self.store.master_key.unwrap(blob, f"webhook:{mid}") if blob else None
        return (str(url) if url else None), secret

    async def _attempt(self, row: dict[str, Any]) -> None:
        row_id, mid = int(row["id"]), str(row["mid"])
        body = str(row["event"]).encode("utf-8")
        try:
            event_id = str(json.loads(body).get("id", row_id))
        except (ValueError, AttributeError):
            # damaged at rest: it can never be posted as what it was; failed, for the record
            log.error("webhook outbox #%s for %s: the event is not readable JSON; marked failed", row_id, mid)
            await self.store.write(self._op_update(row_id, "failed", int(row["attempts"]), "unreadable event",
                                                   self.clock(), None))
            return
        try:
            url, secret = self._merchant_target(mid)
        except Exception as exc:  # a secret that does not unwrap: retried, then failed
            url, secret = None, None
            log.error("webhook %s for %s: secret does not unwrap (%s)", event_id, mid, type(exc).__name__)
        scheme = urllib.parse.urlsplit(url).scheme.lower() if url else ""
        if url is None:
            result = DeliveryResult(False, None, "no webhook URL on file")
        elif scheme not in ("http", "https"):
            result = DeliveryResult(False, None, f"unsupported URL scheme {scheme!r}")
        elif secret is None:
            result = DeliveryResult(False, None, "no webhook secret on file")
        else:
            timestamp = str(int(self.clock()))
            headers = {
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                "X-Switch-Event-Id": event_id,
                "X-Switch-Timestamp": timestamp,
                "X-Switch-Signature": sign(secret, timestamp, body),
            }
            result = await anyio.to_thread.run_sync(
                _post, url, body, headers, self.timeout, self.allow_private, abandon_on_cancel=True
            )
        await self._record(row_id, mid, event_id, int(row["attempts"]) + 1, result)

    async def _record(self, row_id: int, mid: str, event_id: str, attempts: int, result: DeliveryResult) -> None:
        now = self.clock()
        if result.ok:  # last_error keeps the previous failure, if any, for the record
            log.info("webhook %s delivered to %s (HTTP %s) after %d attempt(s)",
                     event_id, mid, result.status, attempts)
            await self.store.write(self._op_update(row_id, "delivered", attempts, None, now, now))
            return
        error = (result.error or "failed")[:MAX_ERROR_TEXT]
        if attempts >= self.max_attempts:
            log.error("webhook %s to %s failed after %d attempts (%s); giving up",
                      event_id, mid, attempts, error)
            await self.store.write(self._op_update(row_id, "failed", attempts, error, now, None))
            return
        delay = min(self.max_delay, self.base_delay * (2 ** min(attempts - 1, 30)))
        log.info("webhook %s to %s: %s, retry in %.1fs", event_id, mid, error, delay)
        await self.store.write(self._op_update(row_id, "pending", attempts, error, now + delay, None))

    @staticmethod
    def _op_update(
        row_id: int, state: str, attempts: int, error: str | None, next_attempt: float,
        delivered_at: float | None,
    ) -> Op:
        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE outbox SET state=?, attempts=?, last_error=COALESCE(?, last_error),"
                " next_attempt=?, delivered_at=?"
                " WHERE id=?",
                (state, attempts, error, next_attempt, delivered_at, row_id),
            )

        return op
