"""PrometheusMetrics: every Metrics method, read back through GET /metrics over real TCP.

Each test builds its own PrometheusMetrics (its own CollectorRegistry), starts serve_http on
127.0.0.1 port 0, calls the port methods, fetches /metrics and parses the exposition with
prometheus_client's own parser.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from switch.adapters.http_endpoint import serve_http
from switch.adapters.prometheus import PrometheusMetrics
from switch.ports import Metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@asynccontextmanager
async def metrics_server(metrics: PrometheusMetrics) -> AsyncIterator[int]:
    async with anyio.create_task_group() as tg:
        port: int = await tg.start(serve_http, metrics, "127.0.0.1", 0, lambda: True)
        yield port
        tg.cancel_scope.cancel()


async def scrape(port: int) -> Samples:
    """GET /metrics and return every sample keyed by (name, labels)."""
    with anyio.fail_after(10):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            raw = b""
            for _ in range(10_000):  # bounded: the server closes after one response
                try:
                    raw += await stream.receive()
                except anyio.EndOfStream:
                    break
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"Content-Type: text/plain; version=0.0.4" in head
    return samples_of(body.decode("utf-8"))


def samples_of(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


def test_implements_the_metrics_port() -> None:
    metrics: Metrics = PrometheusMetrics()  # mypy checks the Protocol; runtime checks methods
    for name in Metrics.__dict__:
        if not name.startswith("_"):
            assert callable(getattr(metrics, name)), name


@pytest.mark.anyio
async def test_request_completed_counts_by_transaction_and_response_code() -> None:
    m = PrometheusMetrics()
    m.request_completed("consume", "00", 0.004)
    m.request_completed("consume", "00", 0.0045)
    m.request_completed("consume", "51", 0.2)
    m.request_completed("balance_inquiry", "00", 12.0)
    async with metrics_server(m) as port:
        s = await scrape(port)
    assert s[key("switch_requests_total", transaction="consume", response_code="00")] == 2.0
    assert s[key("switch_requests_total", transaction="consume", response_code="51")] == 1.0
    assert s[key("switch_requests_total", transaction="balance_inquiry", response_code="00")] == 1.0
    h = "switch_request_duration_seconds"
    assert s[key(h + "_bucket", transaction="consume", le="0.003")] == 0.0
    assert s[key(h + "_bucket", transaction="consume", le="0.005")] == 2.0
    assert s[key(h + "_bucket", transaction="consume", le="0.1")] == 2.0
    assert s[key(h + "_bucket", transaction="consume", le="0.25")] == 3.0
    assert s[key(h + "_bucket", transaction="consume", le="+Inf")] == 3.0
    assert s[key(h + "_count", transaction="consume")] == 3.0
    assert s[key(h + "_sum", transaction="consume")] == pytest.approx(0.2085)
    assert s[key(h + "_bucket", transaction="balance_inquiry", le="10.0")] == 0.0
    assert s[key(h + "_bucket", transaction="balance_inquiry", le="+Inf")] == 1.0


@pytest.mark.anyio
async def test_request_duration_buckets_are_the_documented_ones() -> None:
    m = PrometheusMetrics()
    m.request_completed("consume", "00", 0.001)
    async with metrics_server(m) as port:
        s = await scrape(port)
    les = sorted(
        float(dict(labels)["le"])
        for name, labels in s
        if name == "switch_request_duration_seconds_bucket"
    )
    expected = [.0005, .001, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .075, .1,
                .25, .5, 1, 2.5, 5, 10, float("inf")]  # fmt: skip
    assert les == expected


@pytest.mark.anyio
async def test_issuer_requests_by_issuer_and_outcome() -> None:
    m = PrometheusMetrics()
    m.issuer_request("ICBC", "answered", 0.012)
    m.issuer_request("ICBC", "answered", 0.008)
    m.issuer_request("SLOW", "timeout", 30.0)
    m.issuer_request("BOC", "unavailable", 0.0001)
    async with metrics_server(m) as port:
        s = await scrape(port)
    c = "switch_issuer_requests_total"
    assert s[key(c, issuer="ICBC", outcome="answered")] == 2.0
    assert s[key(c, issuer="SLOW", outcome="timeout")] == 1.0
    assert s[key(c, issuer="BOC", outcome="unavailable")] == 1.0
    h = "switch_issuer_request_duration_seconds"
    assert s[key(h + "_bucket", issuer="ICBC", outcome="answered", le="0.01")] == 1.0
    assert s[key(h + "_bucket", issuer="ICBC", outcome="answered", le="0.015")] == 2.0
    assert s[key(h + "_bucket", issuer="SLOW", outcome="timeout", le="10.0")] == 0.0
    assert s[key(h + "_count", issuer="SLOW", outcome="timeout")] == 1.0
    assert s[key(h + "_bucket", issuer="BOC", outcome="unavailable", le="0.0005")] == 1.0


@pytest.mark.anyio
async def test_issuer_link_state_and_late_replies() -> None:
    m = PrometheusMetrics()
    m.issuer_link_state("ICBC", True)
    m.issuer_link_state("CMB", True)
    m.issuer_link_state("CMB", False)
    m.issuer_late_reply("SLOW")
    m.issuer_late_reply("SLOW")
    m.issuer_late_reply("SLOW")
    async with metrics_server(m) as port:
        s = await scrape(port)
    assert s[key("switch_issuer_link_up", issuer="ICBC")] == 1.0
    assert s[key("switch_issuer_link_up", issuer="CMB")] == 0.0
    assert s[key("switch_issuer_late_replies_total", issuer="SLOW")] == 3.0


@pytest.mark.anyio
async def test_connections_open_and_closed_by_reason() -> None:
    m = PrometheusMetrics()
    for _ in range(4):
        m.connection_opened()
    m.connection_closed("peer")
    m.connection_closed("idle_timeout")
    m.connection_closed("peer")
    async with metrics_server(m) as port:
        s = await scrape(port)
    assert s[key("switch_connections_open")] == 1.0
    assert s[key("switch_connections_closed_total", reason="peer")] == 2.0
    assert s[key("switch_connections_closed_total", reason="idle_timeout")] == 1.0


@pytest.mark.anyio
async def test_malformed_frames_and_mac_failures() -> None:
    m = PrometheusMetrics()
    m.malformed_frame("bad_bitmap")
    m.malformed_frame("decode")
    m.malformed_frame("decode")
    m.mac_failure()
    m.mac_failure()
    async with metrics_server(m) as port:
        s = await scrape(port)
    assert s[key("switch_malformed_frames_total", reason="bad_bitmap")] == 1.0
    assert s[key("switch_malformed_frames_total", reason="decode")] == 2.0
    assert s[key("switch_mac_failures_total")] == 2.0


@pytest.mark.anyio
async def test_journal_commits_batch_sizes_and_seconds() -> None:
    m = PrometheusMetrics()
    m.journal_commit(100, 0.0003)
    m.journal_commit(1, 0.00005)
    m.journal_commit(37, 0.004)
    async with metrics_server(m) as port:
        s = await scrape(port)
    assert s[key("switch_journal_commits_total")] == 3.0
    b = "switch_journal_commit_batch_size"
    assert s[key(b + "_bucket", le="1.0")] == 1.0
    assert s[key(b + "_bucket", le="20.0")] == 1.0
    assert s[key(b + "_bucket", le="50.0")] == 2.0
    assert s[key(b + "_bucket", le="100.0")] == 3.0
    assert s[key(b + "_bucket", le="500.0")] == 3.0
    assert s[key(b + "_sum")] == 138.0
    t = "switch_journal_commit_seconds"
    assert s[key(t + "_bucket", le="0.0001")] == 1.0
    assert s[key(t + "_bucket", le="0.0005")] == 2.0
    assert s[key(t + "_bucket", le="0.005")] == 3.0
    assert s[key(t + "_count")] == 3.0


@pytest.mark.anyio
async def test_requests_in_flight_follows_deltas() -> None:
    m = PrometheusMetrics()
    m.in_flight(+1)
    m.in_flight(+1)
    m.in_flight(+1)
    m.in_flight(-1)
    async with metrics_server(m) as port:
        s = await scrape(port)
    assert s[key("switch_requests_in_flight")] == 2.0


@pytest.mark.anyio
async def test_two_instances_do_not_share_state_and_leave_the_global_registry_alone() -> None:
    a = PrometheusMetrics()
    b = PrometheusMetrics()
    a.request_completed("consume", "00", 0.01)
    a.mac_failure()
    b.request_completed("refund", "25", 0.01)
    async with metrics_server(a) as port_a, metrics_server(b) as port_b:
        sa = await scrape(port_a)
        sb = await scrape(port_b)
    assert sa[key("switch_requests_total", transaction="consume", response_code="00")] == 1.0
    assert key("switch_requests_total", transaction="refund", response_code="25") not in sa
    assert sb[key("switch_requests_total", transaction="refund", response_code="25")] == 1.0
    assert key("switch_requests_total", transaction="consume", response_code="00") not in sb
    assert sa[key("switch_mac_failures_total")] == 1.0
    assert sb[key("switch_mac_failures_total")] == 0.0
    assert REGISTRY.get_sample_value(
        "switch_requests_total", {"transaction": "consume", "response_code": "00"}
    ) is None


def test_uses_a_registry_it_is_given() -> None:
    registry = CollectorRegistry()
    m = PrometheusMetrics(registry)
    m.request_completed("consume", "00", 0.01)
    assert registry.get_sample_value(
        "switch_requests_total", {"transaction": "consume", "response_code": "00"}
    ) == 1.0
    assert m.exposition().startswith(b"# HELP")
    assert m.content_type.startswith("text/plain; version=0.0.4")


@pytest.mark.anyio
async def test_request_path_metrics_expose_what_the_client_library_types_would() -> None:
    # the request path's metrics are lean collectors (adapters/prometheus.py _Lean): the same
    # observations through prometheus_client's own Histogram/Counter/Gauge give the same samples
    from prometheus_client import Counter, Gauge, Histogram

    from switch.adapters.prometheus import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS

    m = PrometheusMetrics()
    r = CollectorRegistry()
    seconds = Histogram("switch_request_duration_seconds", "x", ["transaction"], buckets=LATENCY_BUCKETS, registry=r)
    requests = Counter("switch_requests_total", "x", ["transaction", "response_code"], registry=r)
    batch = Histogram("switch_journal_commit_batch_size", "x", buckets=BATCH_SIZE_BUCKETS, registry=r)
    in_flight = Gauge("switch_requests_in_flight", "x", registry=r)
    # on a bound, between bounds, above the last one, zero
    for txn, rc, s in [("consume", "00", 0.005), ("consume", "00", 0.0051), ("refund", "25", 12.0), ("consume", "51", 0.0)]:
        m.request_completed(txn, rc, s)
        seconds.labels(txn).observe(s)
        requests.labels(txn, rc).inc()
    for size in (1, 50, 51, 1000):
        m.journal_commit(size, 0.001)
        batch.observe(size)
    for delta in (1, 1, -1):
        m.in_flight(delta)
        in_flight.inc(delta)
    async with metrics_server(m) as port:
        got = await scrape(port)
    from prometheus_client import generate_latest

    want = samples_of(generate_latest(r).decode())
    for k, v in want.items():
        if k[0].endswith("_created"):
            assert k in got  # a timestamp: present, value differs
        else:
            assert got[k] == v, k
