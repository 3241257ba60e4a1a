"""A static picture of the Grafana dashboard ``dashboards/switch.json`` for the README.

Owns: turning a short series of ``/metrics`` scrapes into the dashboard's main panels (TPS,
approval rate by transaction, end-to-end p50/p99, issuer link state, SAF depth, journal commits
vs requests) and drawing them with matplotlib into ``docs/dashboard.png``. The scrapes come either
from a running switch (``--url http://127.0.0.1:9100/metrics``) or, by default, from a generated
time series: a seeded traffic scenario (a CMB link outage with its SAF backlog, a slow issuer)
driven through the real ``PrometheusMetrics`` adapter and scraped from its exposition every 5
simulated seconds, so the picture is computed from exactly the text Prometheus would read. The
panel titles are read from the dashboard JSON; a panel the JSON no longer has is an error.

Must not: be imported by the switch, write anywhere but the output path, or present synthetic data
as real (the image title says which it is). matplotlib is imported lazily (it is in the ``bench``
extra, not a runtime dependency); without it the script says how to install it and exits 2.

    .venv/bin/python dashboards/render.py                     # synthetic -> docs/dashboard.png
    .venv/bin/python dashboards/render.py --url http://127.0.0.1:9100/metrics --scrapes 60 --interval 5
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "switch.json"
OUTPUT = ROOT / "docs" / "dashboard.png"

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


@dataclass(frozen=True)
class Scrape:
    """One scrape: seconds since the first scrape and every sample in the exposition."""

    t: float
    samples: Samples


# (dashboard panel title, a metric its PromQL must reference): what render() draws, in order.
RENDERED_PANELS: tuple[tuple[str, str], ...] = (
    ("TPS", "switch_requests_total"),
    ("Approval rate by transaction", "switch_requests_total"),
    ("End-to-end latency p50 / p99", "switch_request_duration_seconds_bucket"),
    ("Issuer link state", "switch_issuer_link_up"),
    ("SAF depth", "switch_saf_depth"),
    ("Journal commits/s vs requests/s", "switch_journal_commits_total"),
)


# --- scrapes --------------------------------------------------------------------------------


def parse_exposition(text: str) -> Samples:
    """Prometheus text exposition -> {(sample name, sorted labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def scrape_url(
    url: str,
    count: int,
    interval: float,
    *,
    timeout: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Scrape]:
    """``count`` scrapes of ``url`` ``interval`` seconds apart (``sleep`` waits between them)."""
    scrapes: list[Scrape] = []
    t0 = time.monotonic()
    for i in range(count):
        if i:
            sleep(interval)
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (operator's URL)
            text = resp.read().decode("utf-8")
        scrapes.append(Scrape(time.monotonic() - t0, parse_exposition(text)))
    return scrapes


# The synthetic scenario: issuers, routing shares and the transaction mix (shares of all requests).
ISSUERS: tuple[str, ...] = ("ICBC", "CMB", "SLOW", "WECHAT", "ALIPAY")
_CARD_ROUTES: tuple[tuple[str, float], ...] = (("ICBC", 0.58), ("CMB", 0.40), ("SLOW", 0.004))
_WALLET_ROUTES: tuple[tuple[str, float], ...] = (("WECHAT", 0.6), ("ALIPAY", 0.4))
_MIX: tuple[tuple[str, float], ...] = (
    ("consume", 0.58), ("scan_to_pay", 0.16), ("balance_inquiry", 0.08), ("consume_void", 0.04),
    ("refund", 0.03), ("pre_auth", 0.03), ("echo_test", 0.05), ("sign_on", 0.03),
)
_MANAGEMENT = frozenset({"echo_test", "sign_on"})
CMB_DOWN = (6 * 60.0, 8.5 * 60.0)  # seconds into the scenario during which the CMB link is down
SLOW_DISK = (11 * 60.0, 12 * 60.0)  # journal commits ~40x slower (a busy disk)


def _pick(rng: random.Random, table: Sequence[tuple[str, float]]) -> str:
    x = rng.random() * sum(w for _, w in table)
    for name, w in table:
        x -= w
        if x <= 0:
            return name
    return table[-1][0]


def synthetic_scrapes(minutes: float = 15.0, step: float = 5.0, seed: int = 8583) -> list[Scrape]:
    """A seeded traffic scenario through the real PrometheusMetrics, scraped every ``step`` s.

    ~30-45 TPS of card and wallet traffic; SLOW answers in ~0.8 s and times out now and then
    (98 -> a reversal in store-and-forward, acknowledged a few scrapes later); the CMB link is down
    during ``CMB_DOWN`` (91 for its cards; the requests in flight when it dropped time out and
    their reversals wait in SAF until the link is back, then drain); during ``SLOW_DISK`` journal
    commits take ~40x longer, which the end-to-end p99 shows.
    """
    from switch.adapters.prometheus import PrometheusMetrics  # the catalogue as exposed

    rng = random.Random(seed)
    m = PrometheusMetrics()
    for name in ISSUERS:
        m.issuer_link_state(name, True)
        m.saf_state(name, 0, 0.0)
    for _ in range(120):
        m.connection_opened()
    saf: dict[str, list[float]] = {name: [] for name in ISSUERS}  # enqueue times
    scrapes: list[Scrape] = []
    steps = int(minutes * 60 / step)
    for i in range(steps + 1):
        now = i * step
        cmb_up = not (CMB_DOWN[0] <= now < CMB_DOWN[1])
        disk = 40.0 if SLOW_DISK[0] <= now < SLOW_DISK[1] else 1.0
        m.issuer_link_state("CMB", cmb_up)
        if i:
            tps = 36 + 8 * math.sin(now / 140) + rng.gauss(0, 2.5)
            n = max(0, int(tps * step))
            for _ in range(n):
                _one_request(rng, m, saf, now, cmb_up, disk)
            if now == CMB_DOWN[0]:  # in flight when the link dropped: 98, reversal queued
                for _ in range(9):
                    m.issuer_request("CMB", "timeout", 2.0)
                    m.request_completed("consume", "98", 2.0 + rng.random() * 0.01)
                    saf["CMB"].append(now)
            rows = n
            while rows > 0:  # group commit: ~1 ms batches
                batch = min(rows, max(1, int(rng.gauss(9, 3))))
                m.journal_commit(batch, disk * (0.00012 + rng.random() * 0.0002 * (1 + batch / 20)))
                rows -= batch
        for name, queue in saf.items():  # deliver store-and-forward while the link is up
            up = cmb_up if name == "CMB" else True
            if up and queue:
                for _ in range(min(len(queue), 3)):
                    m.saf_attempt(name, "acknowledged")
                    queue.pop(0)
            elif queue:
                m.saf_attempt(name, "unavailable")
            m.saf_state(name, len(queue), (now - queue[0]) if queue else 0.0)
            m.issuer_pending(name, 0 if not up else rng.randint(0, 3))
        scrapes.append(Scrape(now, parse_exposition(m.exposition().decode("utf-8"))))
    return scrapes


def _one_request(
    rng: random.Random, m: Any, saf: dict[str, list[float]], now: float, cmb_up: bool,
    disk: float,
) -> None:
    txn = _pick(rng, _MIX)
    if txn in _MANAGEMENT:
        seconds = 0.0008 + rng.random() * 0.0015
        m.request_completed(txn, "00", seconds)
        m.stage("checks", seconds * 0.3)
        m.stage("handler", seconds * 0.1)
        m.stage("respond", seconds * 0.2)
        m.stage("journal", seconds * 0.4)
        return
    issuer = _pick(rng, _WALLET_ROUTES if txn == "scan_to_pay" else _CARD_ROUTES)
    checks, respond, journal = 0.0002, 0.00015, disk * (0.0004 + rng.random() * 0.0012)
    if issuer == "CMB" and not cmb_up:
        m.issuer_request(issuer, "unavailable", 0.00002)
        handler, code = 0.00005, "91"
    elif issuer == "SLOW" and rng.random() < 0.1:
        m.issuer_request(issuer, "timeout", 2.0)
        handler, code = 2.0, "98"
        if txn != "balance_inquiry":
            saf[issuer].append(now)
    else:
        base = 0.8 if issuer == "SLOW" else (0.012 if issuer in ("WECHAT", "ALIPAY") else 0.006)
        handler = rng.lognormvariate(math.log(base), 0.45)
        m.issuer_request(issuer, "answered", handler)
        r = rng.random()
        code = "51" if r < 0.035 else "55" if r < 0.05 else "00"
    total = checks + handler + respond + journal
    m.stage("checks", checks)
    m.stage("handler", handler)
    m.stage("respond", respond)
    m.stage("journal", journal)
    m.request_completed(txn, code, total)


# --- the little PromQL the picture needs ----------------------------------------------------


def select(
    samples: Samples, name: str, where: Mapping[str, str] | None = None, by: str | None = None
) -> dict[str, float]:
    """sum by (``by``) of the samples named ``name`` whose labels include ``where``."""
    out: dict[str, float] = {}
    for (sname, labels), value in samples.items():
        if sname != name:
            continue
        d = dict(labels)
        if where and any(d.get(k) != v for k, v in where.items()):
            continue
        key = d.get(by, "") if by else ""
        out[key] = out.get(key, 0.0) + value
    return out


def increase(older: Samples, newer: Samples, name: str,
             where: Mapping[str, str] | None = None, by: str | None = None) -> dict[str, float]:
    """Counter increase per group between two scrapes (a reset counts from zero)."""
    old, new = select(older, name, where, by), select(newer, name, where, by)
    return {k: (v - old.get(k, 0.0) if v >= old.get(k, 0.0) else v) for k, v in new.items()}


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative ``{le: count}`` (NaN with no observations)."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return math.nan
    total = ordered[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def _window_start(scrapes: Sequence[Scrape], i: int, window: float) -> int:
    j = i
    while j > 0 and scrapes[i].t - scrapes[j - 1].t <= window:
        j -= 1
    return j


@dataclass
class PanelSeries:
    """The rendered panels' series, one value per scrape (NaN where the window is empty)."""

    t_min: list[float] = field(default_factory=list)
    tps: list[float] = field(default_factory=list)
    approval: dict[str, list[float]] = field(default_factory=dict)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    link_up: dict[str, list[float]] = field(default_factory=dict)
    saf_depth: dict[str, list[float]] = field(default_factory=dict)
    commits_per_s: list[float] = field(default_factory=list)


def panel_series(scrapes: Sequence[Scrape], max_transactions: int = 5) -> PanelSeries:
    """Evaluate the rendered panels' PromQL (rates over 1m, approval over 5m) at every scrape."""
    s = PanelSeries()
    if not scrapes:
        return s
    last = scrapes[-1].samples
    volume = select(last, "switch_requests_total", by="transaction")
    top = sorted((k for k in volume if k not in _MANAGEMENT and k != "malformed"),
                 key=lambda k: -volume[k])[:max_transactions]
    issuers = sorted(set(select(last, "switch_issuer_link_up", by="issuer"))
                     | set(select(last, "switch_saf_depth", by="issuer")))
    s.approval = {k: [] for k in top}
    s.link_up = {k: [] for k in issuers}
    s.saf_depth = {k: [] for k in issuers}
    nan = math.nan
    for i, sc in enumerate(scrapes):
        s.t_min.append(sc.t / 60)
        j1, j5 = _window_start(scrapes, i, 60.0), _window_start(scrapes, i, 300.0)
        old1, old5 = scrapes[j1], scrapes[j5]
        dt1, dt5 = sc.t - old1.t, sc.t - old5.t
        reqs = sum(increase(old1.samples, sc.samples, "switch_requests_total").values())
        commits = sum(increase(old1.samples, sc.samples, "switch_journal_commits_total").values())
        s.tps.append(reqs / dt1 if dt1 > 0 else nan)
        s.commits_per_s.append(commits / dt1 if dt1 > 0 else nan)
        all5 = increase(old5.samples, sc.samples, "switch_requests_total", by="transaction")
        ok5 = increase(old5.samples, sc.samples, "switch_requests_total",
                       {"response_code": "00"}, by="transaction")
        for k in top:
            n = all5.get(k, 0.0)
            s.approval[k].append(ok5.get(k, 0.0) / n if dt5 > 0 and n > 0 else nan)
        inc = increase(old1.samples, sc.samples, "switch_request_duration_seconds_bucket", by="le")
        buckets = {float(le): v for le, v in inc.items()}
        s.p50.append(histogram_quantile(0.5, buckets) if dt1 > 0 else nan)
        s.p99.append(histogram_quantile(0.99, buckets) if dt1 > 0 else nan)
        up = select(sc.samples, "switch_issuer_link_up", by="issuer")
        depth = select(sc.samples, "switch_saf_depth", by="issuer")
        for k in issuers:
            s.link_up[k].append(up.get(k, nan))
            s.saf_depth[k].append(depth.get(k, nan))
    return s


# --- drawing --------------------------------------------------------------------------------


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def rendered_titles(dashboard: Mapping[str, Any]) -> list[str]:
    """The titles of RENDERED_PANELS as the dashboard has them; ValueError if one is missing."""
    titles: list[str] = []
    panels = dashboard.get("panels", [])
    for title, metric in RENDERED_PANELS:
        for p in panels:
            exprs = " ".join(str(t.get("expr", "")) for t in p.get("targets", []))
            if p.get("title") == title and metric in exprs:
                titles.append(str(p["title"]))
                break
        else:
            raise ValueError(f"dashboard has no panel {title!r} querying {metric}")
    return titles


def figure_title(source: str | None) -> str:
    if source is None:
        return ("ISO 8583 switch dashboard - SYNTHETIC DATA, not a real switch\n"
                "a generated 15-minute scenario through the real metrics adapter: "
                "CMB link down 6:00-8:30, slow journal disk 11:00-12:00")
    return f"ISO 8583 switch - live scrape of {source}"


def render(dashboard: Mapping[str, Any], series: PanelSeries, out: Path,
           source: str | None) -> str:
    """Draw the rendered panels into ``out`` (PNG); returns the figure title."""
    try:
        import matplotlib
    except ImportError:
        print("render.py needs matplotlib: .venv/bin/pip install -e '.[bench]' (make bench "
              "installs it)", file=sys.stderr)
        raise SystemExit(2) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = rendered_titles(dashboard)
    title = figure_title(source)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.6), dpi=72, layout="constrained")
    fig.suptitle(title, fontsize=11, color="#b00020" if source is None else "black")
    ax = list(axes.flat)
    t = series.t_min

    ax[0].plot(t, series.tps, color="#1f77b4", label="TPS")
    ax[0].set_ylabel("requests/s")
    for k, v in series.approval.items():
        ax[1].plot(t, [x * 100 for x in v], label=k)
    ax[1].set_ylabel("% F39 = 00 (5m)")
    ax[2].plot(t, [x * 1000 for x in series.p50], label="p50")
    ax[2].plot(t, [x * 1000 for x in series.p99], label="p99")
    ax[2].set_ylabel("ms")

    names = list(series.link_up)
    step = (t[1] - t[0]) if len(t) > 1 else 1.0
    for row, name in enumerate(names):
        for state, colour in ((1.0, "#2ca02c"), (0.0, "#d62728")):
            spans = [(x, step) for x, v in zip(t, series.link_up[name]) if v == state]
            if spans:
                ax[3].broken_barh(spans, (row - 0.4, 0.8), facecolors=colour)
    ax[3].set_yticks(range(len(names)), names)
    ax[3].set_ylim(-0.6, len(names) - 0.4)
    ax[3].invert_yaxis()

    for k, v in series.saf_depth.items():
        if any(x > 0 for x in v if not math.isnan(x)):
            ax[4].plot(t, v, label=k, drawstyle="steps-post")
    ax[4].set_ylabel("messages waiting")
    ax[5].plot(t, series.tps, label="requests/s")
    ax[5].plot(t, series.commits_per_s, label="commits/s")
    ax[5].set_ylabel("per second")

    for a, panel_title in zip(ax, titles):
        a.set_title(panel_title, fontsize=10, loc="left")
        a.set_xlabel("minutes", fontsize=8)
        a.tick_params(labelsize=8)
        a.grid(True, alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7, loc="best")
        if a is not ax[3]:
            a.set_ylim(bottom=0)
    ax[3].set_xlabel("minutes (green = UP, red = DOWN)", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", metadata={"Software": None})
    plt.close(fig)
    return title


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", help="scrape a running switch's /metrics instead of synthetic data")
    p.add_argument("--scrapes", type=int, default=60, help="scrapes of --url (default 60)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between scrapes of --url")
    p.add_argument("--dashboard", type=Path, default=DASHBOARD)
    p.add_argument("--out", type=Path, default=OUTPUT)
    a = p.parse_args(argv)
    if a.scrapes < 2:
        p.error("--scrapes must be at least 2 (rates need two scrapes)")
    scrapes = (scrape_url(a.url, a.scrapes, a.interval) if a.url else synthetic_scrapes())
    title = render(load_dashboard(a.dashboard), panel_series(scrapes), a.out, a.url)
    print(f"{a.out}: {title}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
