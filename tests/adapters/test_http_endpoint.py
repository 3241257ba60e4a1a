"""serve_http over real TCP on 127.0.0.1: routes, status codes, and robustness to garbage.

Every client read is bounded (a fail_after scope and a bounded loop); the server closes after
each response, so "read until EOF" is the whole response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from switch.adapters import http_endpoint
from switch.adapters.http_endpoint import find_head_end, route, serve_http
from switch.adapters.prometheus import PrometheusMetrics


@asynccontextmanager
async def http_server(
    metrics: PrometheusMetrics | None = None,
    ready: Callable[[], bool] = lambda: True,
    **kwargs: Any,
) -> AsyncIterator[int]:
    m = metrics if metrics is not None else PrometheusMetrics()
    async with anyio.create_task_group() as tg:
        port: int = await tg.start(lambda task_status: serve_http(
            m, "127.0.0.1", 0, ready, task_status=task_status, **kwargs))
        yield port
        tg.cancel_scope.cancel()


async def read_all(stream: anyio.abc.ByteStream) -> bytes:
    """Everything until the server closes (EOF or reset), bounded."""
    raw = b""
    with anyio.fail_after(10):
        for _ in range(10_000):
            try:
                raw += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                break
    return raw


async def exchange(port: int, request: bytes) -> bytes:
    with anyio.fail_after(10):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            try:
                await stream.send(request)
            except anyio.BrokenResourceError:
                pass  # the server may close first (refused, or head too large); read what came
            return await read_all(stream)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    lines = head.decode("ascii").split("\r\n")
    version, code, _phrase = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    return int(code), headers, body


async def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return parse(await exchange(port, f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()))


@pytest.mark.anyio
async def test_port_zero_reports_a_real_port() -> None:
    async with http_server() as port:
        assert port > 0
        code, _, body = await get(port, "/healthz")
    assert (code, body) == (200, b"ok\n")


@pytest.mark.anyio
async def test_metrics_serves_a_parseable_exposition() -> None:
    m = PrometheusMetrics()
    m.request_completed("consume", "00", 0.003)
    m.request_completed("consume", "00", 0.003)
    async with http_server(m) as port:
        code, headers, body = await get(port, "/metrics")
        code_q, _, _ = await get(port, "/metrics?name[]=x")
    assert code == 200 and code_q == 200
    assert headers["content-type"] == m.content_type
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }
    assert values[("switch_requests_total",
                   (("response_code", "00"), ("transaction", "consume")))] == 2.0


@pytest.mark.anyio
async def test_metrics_reflect_changes_between_scrapes() -> None:
    m = PrometheusMetrics()
    async with http_server(m) as port:
        _, _, before = await get(port, "/metrics")
        m.mac_failure()
        _, _, after = await get(port, "/metrics")
    assert b"switch_mac_failures_total 0.0" in before
    assert b"switch_mac_failures_total 1.0" in after


@pytest.mark.anyio
async def test_readyz_follows_the_callback() -> None:
    state = {"ready": False}
    async with http_server(ready=lambda: state["ready"]) as port:
        not_ready = await get(port, "/readyz")
        state["ready"] = True
        ready = await get(port, "/readyz")
        state["ready"] = False
        again = await get(port, "/readyz")
    assert (not_ready[0], not_ready[2]) == (503, b"not ready\n")
    assert (ready[0], ready[2]) == (200, b"ready\n")
    assert again[0] == 503


@pytest.mark.anyio
async def test_readyz_is_503_when_the_callback_raises() -> None:
    def broken() -> bool:
        raise RuntimeError("store gone")

    async with http_server(ready=broken) as port:
        code, _, body = await get(port, "/readyz")
        health, _, _ = await get(port, "/healthz")
    assert (code, body) == (503, b"not ready\n")
    assert health == 200


@pytest.mark.anyio
async def test_healthz_is_200_even_when_not_ready() -> None:
    async with http_server(ready=lambda: False) as port:
        code, headers, body = await get(port, "/healthz")
    assert (code, body) == (200, b"ok\n")
    assert headers["content-type"].startswith("text/plain")


@pytest.mark.anyio
async def test_unknown_path_is_404_and_other_methods_405() -> None:
    async with http_server() as port:
        missing = await get(port, "/nope")
        post = await get(port, "/metrics", method="POST")
        head = await get(port, "/healthz", method="HEAD")
        delete = await get(port, "/nope", method="DELETE")
    assert missing[0] == 404
    assert post[0] == 405 and post[1]["allow"] == "GET"
    assert head[0] == 405
    assert delete[0] == 405


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\xfe\x16\x03\x01\r\n\r\n",  # binary, like a TLS hello
        b"GET /metrics\r\n\r\n",  # HTTP/0.9 style, no version
        b"GET metrics HTTP/1.1\r\n\r\n",  # target not a path
        b"GET /metrics SPDY/3\r\n\r\n",
        b"G\xc3\xa9T /metrics HTTP/1.1\r\n\r\n",  # non-ASCII method
        b"GET  /metrics HTTP/1.1\r\n\r\n",  # double space
        b"\r\n\r\n",
        b"GET /metrics HTTP/1.1",  # then half-close before the head ends
    ],
)
@pytest.mark.anyio
async def test_garbage_gets_400_and_the_server_keeps_serving(garbage: bytes) -> None:
    async with http_server() as port:
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(garbage)
                await stream.send_eof()
                raw = await read_all(stream)
        code, _, _ = parse(raw)
        assert code == 400
        assert (await get(port, "/healthz"))[0] == 200


@pytest.mark.anyio
async def test_head_over_8_kib_gets_431_and_the_server_keeps_serving() -> None:
    async with http_server() as port:
        request = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n"
        raw = await exchange(port, request)
        assert parse(raw)[0] == 431
        # Endless head without a terminator: never buffered past the limit.
        raw2 = await exchange(port, b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 3000)
        assert parse(raw2)[0] == 431
        assert (await get(port, "/healthz"))[0] == 200


@pytest.mark.anyio
async def test_silent_client_is_closed_after_the_read_timeout() -> None:
    async with http_server(read_timeout=0.05) as port:
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET /metr")  # stalls mid-head
                assert await read_all(stream) == b""
        assert (await get(port, "/healthz"))[0] == 200


@pytest.mark.anyio
async def test_client_that_connects_and_leaves_does_not_hurt() -> None:
    async with http_server() as port:
        for _ in range(5):
            async with await anyio.connect_tcp("127.0.0.1", port):
                pass
        assert (await get(port, "/healthz"))[0] == 200


@pytest.mark.anyio
async def test_connections_beyond_the_cap_are_closed_unanswered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Hold the only slot deterministically: once our response arrived, the server's handler is
    # draining our connection (until we close it), so it is still counted.
    monkeypatch.setattr(http_endpoint, "DRAIN_TIMEOUT_S", 60.0)
    async with http_server(max_connections=1) as port:
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as holder:
                await holder.send(b"GET /healthz HTTP/1.1\r\n\r\n")
                first = b""
                for _ in range(1000):
                    first += await holder.receive()
                    if first.endswith(b"ok\n"):
                        break
                assert first.startswith(b"HTTP/1.1 200 ")
                refused = await exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
                assert refused == b""
            # The slot frees once the server sees our close; retry a bounded number of times.
            for _ in range(200):
                raw = await exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
                if raw:
                    break
                await anyio.sleep(0.01)
            assert parse(raw)[0] == 200


def test_route_is_sans_io_and_never_raises() -> None:
    m = PrometheusMetrics()
    assert route(b"GET /healthz HTTP/1.0\n\n", m, lambda: True).status == 200
    assert route(b"GET /readyz HTTP/1.1\r\n\r\n", m, lambda: False).status == 503
    assert route(b"", m, lambda: True).status == 400
    assert route(b"\xff" * 100, m, lambda: True).status == 400
    assert route(b"PUT /x HTTP/1.1\r\n\r\n", m, lambda: True).status == 405
    encoded = route(b"GET /x HTTP/1.1\r\n\r\n", m, lambda: True).encode()
    assert encoded.startswith(b"HTTP/1.1 404 Not Found\r\n")


def test_find_head_end() -> None:
    assert find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n") == -1
    assert find_head_end(b"GET / HTTP/1.1\r\n\r\nbody") == 18
    assert find_head_end(b"GET / HTTP/1.1\n\nbody") == 16
