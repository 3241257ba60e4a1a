"""The metrics/health HTTP endpoint (protocol §15): a tiny HTTP/1.1 server on anyio.

Owns: serving ``GET /metrics`` (Prometheus text exposition of a ``PrometheusMetrics``),
``GET /healthz`` (200 ``ok`` while the process runs) and ``GET /readyz`` (200 ``ready`` when the
``ready`` callback says so, else 503 ``not ready``); 404 for other paths, 405 for other methods,
400 for a request it cannot parse, 431 for a request head over 8 KiB. One request per connection,
answered with ``Connection: close``. Every connection is bounded: head size, read timeout, a cap on
concurrent connections, and a bounded drain before close.

Must not: use a web framework, hold business rules, decide readiness itself (the composition root
passes ``ready``), log request bytes (they may be anything), or let any input crash the server.

``route`` is the sans-IO part (request head bytes -> response), ``serve_http`` moves the bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import anyio
import anyio.abc
from anyio.abc import SocketAttribute, TaskStatus

from switch.adapters.prometheus import PrometheusMetrics

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8 * 1024
READ_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 1.0
DRAIN_MAX_BYTES = 64 * 1024
MAX_CONNECTIONS = 64

_TEXT = "text/plain; charset=utf-8"
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)  # RFC 9110 tchar


@dataclass(frozen=True)
class HttpResponse:
    """A complete response; ``encode`` adds the status line and framing headers."""

    status: HTTPStatus
    body: bytes
    content_type: str = _TEXT
    extra_headers: tuple[tuple[str, str], ...] = field(default=())

    def encode(self) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status.value} {self.status.phrase}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.extra_headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + self.body


def _text(status: HTTPStatus, text: str, *headers: tuple[str, str]) -> HttpResponse:
    return HttpResponse(status, (text + "\n").encode("utf-8"), _TEXT, headers)


def find_head_end(buffer: bytes) -> int:
    """Index just past the blank line ending the request head, or -1 if it has not arrived."""
    crlf = buffer.find(b"\r\n\r\n")
    lf = buffer.find(b"\n\n")
    ends = [i + n for i, n in ((crlf, 4), (lf, 2)) if i >= 0]
    return min(ends) if ends else -1


def route(
    head: bytes, metrics: PrometheusMetrics, ready: Callable[[], bool]
) -> HttpResponse:
    """Answer one request head (request line + headers, any line endings). Never raises."""
    first_line = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        text = first_line.decode("ascii")
    except UnicodeDecodeError:
        return _text(HTTPStatus.BAD_REQUEST, "bad request")
    parts = text.split(" ")
    if len(parts) != 3:
        return _text(HTTPStatus.BAD_REQUEST, "bad request")
    method, target, version = parts
    if (
        not method
        or not set(method) <= _TOKEN_CHARS
        or not target.startswith("/")
        or not version.startswith("HTTP/1.")
    ):
        return _text(HTTPStatus.BAD_REQUEST, "bad request")
    if method != "GET":
        return _text(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed", ("Allow", "GET"))
    path = target.split("?", 1)[0]
    if path == "/metrics":
        try:
            body = metrics.exposition()
        except Exception:
            log.exception("metrics exposition failed")
            return _text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        return HttpResponse(HTTPStatus.OK, body, metrics.content_type)
    if path == "/healthz":
        return _text(HTTPStatus.OK, "ok")
    if path == "/readyz":
        try:
            is_ready = bool(ready())
        except Exception:
            log.exception("readiness check raised; answering not ready")
            is_ready = False
        if is_ready:
            return _text(HTTPStatus.OK, "ready")
        return _text(HTTPStatus.SERVICE_UNAVAILABLE, "not ready")
    return _text(HTTPStatus.NOT_FOUND, "not found")


async def _read_head(
    stream: anyio.abc.ByteStream, read_timeout: float
) -> bytes | HttpResponse | None:
    """Read to the end of the head: the head, an error response to send, or None to just close."""
    buffer = b""
    with anyio.move_on_after(read_timeout):
        # Bounded: each pass adds >= 1 byte and we stop past MAX_HEAD_BYTES.
        while True:
            end = find_head_end(buffer)
            if end >= 0:
                return buffer[:end] if end <= MAX_HEAD_BYTES else _too_large()
            if len(buffer) > MAX_HEAD_BYTES:
                return _too_large()
            try:
                buffer += await stream.receive(MAX_HEAD_BYTES + 4 - len(buffer))
            except anyio.EndOfStream:
                # Peer half-closed before finishing the head: tell it, if it sent anything.
                return _text(HTTPStatus.BAD_REQUEST, "bad request") if buffer else None
    log.info("metrics endpoint: read timeout, closing connection")
    return None


def _too_large() -> HttpResponse:
    return _text(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")


async def drain(stream: anyio.abc.ByteStream) -> None:
    """Read and discard what the peer still sends, so closing does not reset our response away."""
    received = 0
    with anyio.move_on_after(DRAIN_TIMEOUT_S):
        while received < DRAIN_MAX_BYTES:
            try:
                received += len(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return


async def _handle(
    stream: anyio.abc.ByteStream,
    metrics: PrometheusMetrics,
    ready: Callable[[], bool],
    read_timeout: float,
) -> None:
    async with stream:
        result = await _read_head(stream, read_timeout)
        if result is None:
            return
        response = route(result, metrics, ready) if isinstance(result, bytes) else result
        if response.status >= 400:
            log.info("metrics endpoint: answered %d", response.status.value)
        with anyio.move_on_after(WRITE_TIMEOUT_S):
            await stream.send(response.encode())
            await stream.send_eof()
            await drain(stream)


async def serve_http(
    metrics: PrometheusMetrics,
    host: str,
    port: int,
    ready: Callable[[], bool],
    *,
    read_timeout: float = READ_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics, /healthz and /readyz on host:port until cancelled.

    Reports the bound port with ``task_status.started(port)`` (port 0 picks a free one).
    Connections beyond ``max_connections`` at once are closed without an answer.
    """
    async def handle(stream: anyio.abc.SocketStream) -> None:
        await _handle(stream, metrics, ready, read_timeout)

    await serve_bounded(handle, host, port, "metrics endpoint", max_connections=max_connections,
                        task_status=task_status)


async def serve_bounded(
    handle: Callable[[anyio.abc.SocketStream], Awaitable[None]],
    host: str,
    port: int,
    name: str,
    *,
    max_connections: int,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """A TCP listener for the small HTTP servers (metrics, admin API): at most ``max_connections``
    at once (the rest closed unanswered), a failing connection never takes the server down;
    reports the bound port."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    open_connections = 0

    async def handler(stream: anyio.abc.SocketStream) -> None:
        nonlocal open_connections
        if open_connections >= max_connections:
            log.warning("%s: %d connections open, refusing one", name, open_connections)
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            return
        open_connections += 1
        try:
            await handle(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            log.info("%s: peer went away", name)
        except Exception:
            # Last line of defence: one bad connection must never take the server down.
            log.exception("%s: unexpected error on a connection", name)
        finally:
            open_connections -= 1

    async with listener:
        bound = listener.listeners[0].extra(SocketAttribute.local_port)
        log.info("%s listening on %s:%d", name, host, bound)
        task_status.started(bound)
        await listener.serve(handler)
