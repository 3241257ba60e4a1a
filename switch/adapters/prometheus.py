"""Prometheus implementation of the ``switch.ports.Metrics`` port (protocol §15).

Owns: the metric objects (names, types, labels, buckets) on a private
``prometheus_client.CollectorRegistry`` and the text exposition of that registry.

Must not: touch the process-global default registry (tests create many instances), do any I/O
(serving ``/metrics`` is ``adapters/http_endpoint.py``'s job), hold business rules, or put a PAN,
PIN, track, key or any other card data into a label (labels are transaction names, two-character
response codes, issuer ids and fixed reason words only).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Iterator

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# End-to-end and issuer round trips: resolves 1-100 ms, the range the switch lives in.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
    0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# One journal commit (SQLite WAL ~100 µs, PostgreSQL a few ms, a slow disk much more).
COMMIT_BUCKETS: tuple[float, ...] = (
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
)
# Rows written by one commit (group commit: many requests share one fsync).
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500)


class _Lean:
    """A metric of the request path, kept in plain lists and exposed through the client
    library's metric families at scrape time. ``prometheus_client``'s own types take a lock per
    value they update (a histogram observation is two), which cost 6 % of the switch's
    instructions per consume (bench/README.md). Updates come from the event loop, the journal
    commit thread for the commit metrics; a scrape reads between two of them (the GIL makes
    each addition whole), as it does with the library's types."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], registry: CollectorRegistry,
                 buckets: tuple[float, ...] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = [*buckets, float("inf")]
        self.les = [str(floatToGoString(b)) for b in self.bounds]  # type: ignore[no-untyped-call]
        # labels -> [counts per bucket..., sum, created] (histogram) or [value, created]
        self.children: dict[tuple[str, ...], list[float]] = {}
        if not labelnames:
            self.child(())
        registry.register(self)

    def child(self, labels: tuple[str, ...]) -> list[float]:
        c = self.children.get(labels)
        if c is None:
            c = self.children[labels] = [0.0] * (len(self.bounds) + 1 if self.kind == "histogram" else 1) + [time.time()]
        return c

    def family(self) -> Metric:
        labels = list(self.labelnames)
        if self.kind == "histogram":
            return HistogramMetricFamily(self.name, self.documentation, labels=labels)
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.documentation, labels=labels)
        return GaugeMetricFamily(self.name, self.documentation, labels=labels)

    def describe(self) -> Iterator[Metric]:
        yield self.family()

    def collect(self) -> Iterator[Metric]:
        fam = self.family()
        for labels, c in list(self.children.items()):
            if isinstance(fam, HistogramMetricFamily):
                cumulative, buckets = 0.0, []
                for le, n in zip(self.les, c):
                    cumulative += n
                    buckets.append((le, cumulative))
                fam.add_metric(list(labels), buckets, c[-2])
                fam.samples.append(Sample(self.name + "_created", dict(zip(self.labelnames, labels)), c[-1]))
            elif isinstance(fam, CounterMetricFamily):
                fam.add_metric(list(labels), c[0], created=c[-1])
            elif isinstance(fam, GaugeMetricFamily):
                fam.add_metric(list(labels), c[0])
        yield fam

    def inc(self, labels: tuple[str, ...] = (), by: float = 1.0) -> None:
        """Counter and gauge: add ``by`` (a metric increment, not money)."""
        (self.children.get(labels) or self.child(labels))[0] += by


class _LeanHistogram(_Lean):
    kind = "histogram"

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        c = self.children.get(labels) or self.child(labels)
        c[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        c[-2] += value


class _LeanCounter(_Lean):
    kind = "counter"


class _LeanGauge(_Lean):
    kind = "gauge"

    def set(self, labels: tuple[str, ...], value: float) -> None:
        (self.children.get(labels) or self.child(labels))[0] = value


class PrometheusMetrics:
    """The switch's metrics on their own registry.

    Metrics (name, type, labels: meaning):

    - ``switch_requests_total``, counter, ``transaction``, ``response_code``: terminal requests
      answered, by transaction name (e.g. ``consume``) and the two-character F39 sent (§15).
    - ``switch_request_duration_seconds``, histogram, ``transaction``: end-to-end time from a
      decoded request to its encoded response.
    - ``switch_issuer_request_duration_seconds``, histogram, ``issuer``, ``outcome``: time of one
      issuer round trip; outcome is ``answered``, ``timeout``, ``unavailable`` or ``error`` (any
      other failure, e.g. a request the issuer codec cannot encode).
    - ``switch_issuer_requests_total``, counter, ``issuer``, ``outcome``: issuer round trips.
    - ``switch_issuer_link_up``, gauge, ``issuer``: 1 while the link to the issuer is up, else 0.
    - ``switch_issuer_late_replies_total``, counter, ``issuer``: issuer replies that arrived after
      their request had timed out (or matched no request in flight).
    - ``switch_connections_open``, gauge, no labels: terminal connections currently open.
    - ``switch_connections_closed_total``, counter, ``reason``: terminal connections closed, by
      reason (``peer``, ``idle_timeout``, ``read_timeout``, ``write_timeout``: the peer read none
      of its answers for ``read_timeout``, ``short_frame``, ``frame_too_large``,
      ``protocol``: a frame closed at §12.1 step 1, ``internal_error``, ``max_connections``,
      ``shutdown``).
    - ``switch_malformed_frames_total``, counter, ``reason``: frames that could not be decoded
      (``secondary_bitmap``, ``bad_mti``, ``short_body``, ``decode:<field>``, ...), closed or
      answered ``30``.
    - ``switch_mac_failures_total``, counter, no labels: requests whose MAC (F64) did not verify.
    - ``switch_journal_commit_seconds``, histogram, no labels: time of one journal commit.
    - ``switch_journal_commit_batch_size``, histogram, no labels: journal rows per commit.
    - ``switch_store_write_failures_total``, counter, no labels: writes the store could not
      commit (a full disk, an I/O error); a request whose journal row is among them got no
      answer (its connection was closed) and, if it reached an issuer, has its reversal queued
      at once or, if the store refuses that too, by the orphan-intent sweep.
    - ``switch_journal_commits_total``, counter, no labels: journal commits (= fsyncs); with
      ``switch_requests_total`` it shows how well group commit batches.
    - ``switch_requests_in_flight``, gauge, no labels: terminal requests being processed now.
    - ``switch_saf_depth``, gauge, ``issuer``: store-and-forward messages (reversals, advices)
      waiting for the issuer to acknowledge.
    - ``switch_saf_oldest_age_seconds``, gauge, ``issuer``: age of the oldest waiting message.
    - ``switch_saf_attempts_total``, counter, ``issuer``, ``outcome``: delivery attempts
      (``acknowledged``, ``timeout``, ``unavailable``, ``refused``); every attempt after the first
      of a message is a retransmission (0401 / 0221).
    - ``switch_pipeline_stage_seconds``, histogram, ``stage``: time spent per pipeline stage of a
      request: ``checks`` (§12.1 steps 2-9), ``handler`` (issuer round trips included),
      ``respond`` (building and signing the response), ``journal`` (waiting for the durable commit).
    - ``switch_issuer_pending``, gauge, ``issuer``: requests written to the issuer and not answered yet.
    - ``switch_limit_rejections_total``, counter, no labels: requests refused with ``61``.
    - ``switch_activation_failures_total``, counter, ``reason``: activations refused (``wrong_code``,
      ``lockout``, ``bad_key``).
    - ``switch_duplicates_total``, counter, ``outcome``: retransmitted requests answered from the
      journal (``resent``) or refused as a different request under the same key (``94``).

    Histograms expose ``_bucket``/``_count``/``_sum`` samples; counters expose ``_total`` (and the
    client library's ``_created``) samples.
    """

    # What generate_latest() writes: the classic text format. prometheus-client >= 0.22 names
    # 1.0.0 as CONTENT_TYPE_LATEST, but its own handlers still send 0.0.4 for this output.
    content_type: str = CONTENT_TYPE_PLAIN_0_0_4

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry: CollectorRegistry = (
            registry if registry is not None else CollectorRegistry()
        )
        r = self.registry
        # the request path's metrics (several updates per request): lean, see _Lean
        self._requests = _LeanCounter(
            "switch_requests",
            "Terminal requests answered, by transaction and F39 response code.",
            ("transaction", "response_code"),
            r,
        )
        self._request_seconds = _LeanHistogram(
            "switch_request_duration_seconds",
            "End-to-end time to answer a terminal request.",
            ("transaction",),
            r,
            LATENCY_BUCKETS,
        )
        self._issuer_seconds = _LeanHistogram(
            "switch_issuer_request_duration_seconds",
            "Time of one issuer round trip, by issuer and outcome.",
            ("issuer", "outcome"),
            r,
            LATENCY_BUCKETS,
        )
        self._issuer_requests = _LeanCounter(
            "switch_issuer_requests",
            "Issuer round trips, by issuer and outcome (answered/timeout/unavailable).",
            ("issuer", "outcome"),
            r,
        )
        self._issuer_up = Gauge(
            "switch_issuer_link_up",
            "1 while the link to the issuer is up, else 0.",
            ["issuer"],
            registry=r,
        )
        self._issuer_late = Counter(
            "switch_issuer_late_replies_total",
            "Issuer replies that arrived after their request timed out.",
            ["issuer"],
            registry=r,
        )
        self._connections_open = Gauge(
            "switch_connections_open",
            "Terminal connections currently open.",
            registry=r,
        )
        self._connections_closed = Counter(
            "switch_connections_closed_total",
            "Terminal connections closed, by reason.",
            ["reason"],
            registry=r,
        )
        self._malformed = Counter(
            "switch_malformed_frames_total",
            "Terminal frames that could not be decoded, by reason.",
            ["reason"],
            registry=r,
        )
        self._mac_failures = Counter(
            "switch_mac_failures_total",
            "Terminal requests whose MAC did not verify.",
            registry=r,
        )
        self._commit_seconds = _LeanHistogram(
            "switch_journal_commit_seconds", "Time of one journal commit.", (), r, COMMIT_BUCKETS
        )
        self._commit_batch = _LeanHistogram(
            "switch_journal_commit_batch_size", "Journal rows written by one commit.", (), r, BATCH_SIZE_BUCKETS
        )
        self._commits = _LeanCounter("switch_journal_commits", "Journal commits (fsyncs).", (), r)
        self._write_failures = Counter(
            "switch_store_write_failures_total",
            "Store writes that could not be committed (their requests got no answer).",
            registry=r,
        )
        self._in_flight = _LeanGauge("switch_requests_in_flight", "Terminal requests being processed now.", (), r)
        self._saf_depth = Gauge(
            "switch_saf_depth", "Store-and-forward messages waiting for the issuer.", ["issuer"], registry=r
        )
        self._saf_oldest = Gauge(
            "switch_saf_oldest_age_seconds", "Age of the oldest waiting store-and-forward message.",
            ["issuer"], registry=r,
        )
        self._saf_attempts = Counter(
            "switch_saf_attempts_total", "Store-and-forward delivery attempts.", ["issuer", "outcome"], registry=r
        )
        self._stages = _LeanHistogram(
            "switch_pipeline_stage_seconds", "Time per pipeline stage.", ("stage",), r, LATENCY_BUCKETS
        )
        self._issuer_pending = _LeanGauge("switch_issuer_pending", "Issuer requests awaiting a reply.", ("issuer",), r)
        self._limit_rejections = Counter(
            "switch_limit_rejections", "Requests refused for the merchant's monthly limit (61).", registry=r
        )
        self._activation_failures = Counter(
            "switch_activation_failures", "Activations refused, by reason.", ["reason"], registry=r
        )
        self._duplicates = Counter(
            "switch_duplicates", "Retransmitted requests (resent) and key clashes (94).", ["outcome"], registry=r
        )

    # --- switch.ports.Metrics -------------------------------------------------------------

    def request_completed(self, transaction: str, response_code: str, seconds: float) -> None:
        self._requests.inc((transaction, response_code))
        self._request_seconds.observe((transaction,), seconds)

    def issuer_request(self, issuer: str, outcome: str, seconds: float) -> None:
        self._issuer_requests.inc((issuer, outcome))
        self._issuer_seconds.observe((issuer, outcome), seconds)

    def issuer_link_state(self, issuer: str, up: bool) -> None:
        self._issuer_up.labels(issuer=issuer).set(1 if up else 0)

    def issuer_late_reply(self, issuer: str) -> None:
        self._issuer_late.labels(issuer=issuer).inc()

    def connection_opened(self) -> None:
        self._connections_open.inc()

    def connection_closed(self, reason: str) -> None:
        self._connections_open.dec()
        self._connections_closed.labels(reason=reason).inc()

    def malformed_frame(self, reason: str) -> None:
        self._malformed.labels(reason=reason).inc()

    def mac_failure(self) -> None:
        self._mac_failures.inc()

    def store_write_failed(self) -> None:
        self._write_failures.inc()

    def journal_commit(self, batch_size: int, seconds: float) -> None:
        self._commits.inc()
        self._commit_batch.observe((), batch_size)
        self._commit_seconds.observe((), seconds)

    def in_flight(self, delta: int) -> None:
        self._in_flight.inc((), delta)

    def saf_state(self, issuer: str, depth: int, oldest_age_seconds: float) -> None:
        self._saf_depth.labels(issuer=issuer).set(depth)
        self._saf_oldest.labels(issuer=issuer).set(oldest_age_seconds)

    def saf_attempt(self, issuer: str, outcome: str) -> None:
        self._saf_attempts.labels(issuer=issuer, outcome=outcome).inc()

    def duplicate(self, outcome: str) -> None:
        self._duplicates.labels(outcome=outcome).inc()

    def activation_failure(self, reason: str) -> None:
        self._activation_failures.labels(reason=reason).inc()

    def issuer_pending(self, issuer: str, pending: int) -> None:
        self._issuer_pending.set((issuer,), pending)

    def stage(self, stage: str, seconds: float) -> None:
        self._stages.observe((stage,), seconds)

    def limit_rejection(self) -> None:
        self._limit_rejections.inc()

    # --- exposition -----------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (``content_type``)."""
        return generate_latest(self.registry)
