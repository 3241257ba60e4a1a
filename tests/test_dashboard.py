"""The Grafana dashboard (dashboards/switch.json) against the metrics the switch really exposes,
and the README picture's renderer (dashboards/render.py).

The catalogue is not a list typed into this test: it is what ``PrometheusMetrics().exposition()``
shows after every method of the ``switch.ports.Metrics`` port has been called once, parsed with
prometheus_client's own parser. A PromQL expression naming a metric (or filtering, grouping or
labelling by a label) that the exposition does not have fails here.

The renderer tests need matplotlib (the ``bench`` extra) and are skipped without it; the PromQL
helpers and the scrape of a real /metrics endpoint over 127.0.0.1 need only prometheus_client.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from switch.adapters.http_endpoint import serve_http
from switch.adapters.prometheus import PrometheusMetrics
from switch.ports import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "switch.json"

# One call of every Metrics method with labels like the switch's own.
SAMPLE_CALLS: dict[str, tuple[Any, ...]] = {
    "request_completed": ("consume", "00", 0.012),
    "issuer_request": ("ICBC", "answered", 0.006),
    "issuer_link_state": ("ICBC", True),
    "issuer_late_reply": ("ICBC",),
    "connection_opened": (),
    "connection_closed": ("peer",),
    "malformed_frame": ("secondary_bitmap",),
    "mac_failure": (),
    "journal_commit": (8, 0.0002),
    "store_write_failed": (),
    "in_flight": (1,),
    "saf_state": ("CMB", 2, 30.0),
    "saf_attempt": ("CMB", "acknowledged"),
    "duplicate": ("resent",),
    "activation_failure": ("wrong_code",),
    "issuer_pending": ("ICBC", 1),
    "stage": ("checks", 0.0002),
    "limit_rejection": (),
}

METRIC = re.compile(r"\bswitch_[A-Za-z0-9_]+")
SELECTOR = re.compile(r"\b(switch_[A-Za-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def catalogue() -> dict[str, set[str]]:
    """Sample name -> label names, as exposed after one call of every Metrics method."""
    methods = {n for n, v in vars(Metrics).items() if not n.startswith("_") and callable(v)}
    assert methods == set(SAMPLE_CALLS), "a Metrics method needs sample arguments in SAMPLE_CALLS"
    m = PrometheusMetrics()
    for name, args in SAMPLE_CALLS.items():
        getattr(m, name)(*args)
    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(m.exposition().decode("utf-8")):
        for s in family.samples:
            exposed.setdefault(s.name, set()).update(s.labels)
    return exposed


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def query_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (rows are layout headers; nested row panels included)."""
    for p in dashboard["panels"]:
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, PromQL, legend format) for every target and every query variable."""
    for p in query_panels(dashboard):
        for t in p.get("targets", []):
            yield f"panel {p.get('title')!r} {t.get('refId')}", t.get("expr", ""), \
                t.get("legendFormat", "")
    for v in dashboard.get("templating", {}).get("list", []):
        q = v.get("query")
        text = q.get("query", "") if isinstance(q, dict) else str(q or "")
        yield f"variable {v.get('name')!r}", text, ""


def problems(dashboard: dict[str, Any], exposed: dict[str, set[str]]) -> list[str]:
    """What in the dashboard's PromQL the exposition cannot answer."""
    found: list[str] = []
    for where, expr, legend in expressions(dashboard):
        names = METRIC.findall(expr)
        if not names:
            found.append(f"{where}: no switch_ metric in {expr!r}")
        labels: set[str] = set()
        for name in names:
            if name not in exposed:
                found.append(f"{where}: {name} is not exposed")
            else:
                labels |= exposed[name]
        for name, body in SELECTOR.findall(expr):
            for label in MATCHER.findall(body):
                if name in exposed and label not in exposed[name]:
                    found.append(f"{where}: {name} has no label {label!r}")
        for group in GROUPING.findall(expr):
            for label in (x.strip() for x in group.split(",")):
                if label and label not in labels:
                    found.append(f"{where}: grouping by {label!r}, which none of {names} has")
        for label in LEGEND.findall(legend):
            if label not in labels:
                found.append(f"{where}: legend uses {label!r}, which none of {names} has")
    return found


# --- the dashboard ------------------------------------------------------------------------


def test_catalogue_is_what_the_adapter_exposes() -> None:
    exposed = catalogue()
    assert exposed["switch_requests_total"] == {"transaction", "response_code"}
    assert "le" in exposed["switch_request_duration_seconds_bucket"]
    assert "switch_limit_rejections_total" in exposed
    assert "switch_request_duration_seconds" not in exposed  # histograms: _bucket/_sum/_count only


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    d = load()
    assert d["title"] and d["uid"]
    assert 36 <= d["schemaVersion"] <= 41
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    assert d["__inputs"][0]["pluginId"] == "prometheus"
    required = {(r["type"], r["id"]) for r in d["__requires"]}
    assert ("datasource", "prometheus") in required
    for p in query_panels(d):
        assert ("panel", p["type"]) in required, p["type"]
    ids = [p["id"] for p in d["panels"]] + [p["id"] for r in d["panels"] for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_has_a_title_a_prometheus_datasource_and_a_target() -> None:
    d = load()
    panels = list(query_panels(d))
    assert len(panels) >= 20
    for p in panels:
        assert p.get("title"), p
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no target"
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    for row in (p for p in d["panels"] if p["type"] == "row"):
        assert row.get("title") and not row.get("targets"), row


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in load()["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_metric_and_label_in_the_promql_is_exposed() -> None:
    assert problems(load(), catalogue()) == []


def test_the_dashboard_covers_the_catalogue() -> None:
    used = set()
    for _, expr, _ in expressions(load()):
        used |= set(METRIC.findall(expr))
    families = {n for n in catalogue() if not n.endswith("_created")}
    for name in sorted(families):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert any(u == name or re.sub(r"_(bucket|sum|count)$", "", u) == base for u in used), \
            f"{name} is exposed but no panel shows it"


def test_the_brief_panels_are_there() -> None:
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in query_panels(load())}
    assert exprs["TPS"] == "sum(rate(switch_requests_total[1m]))"
    assert 'response_code="00"' in exprs["Approval rate by transaction"]
    assert "by (transaction)" in exprs["Approval rate by transaction"]
    p = exprs["End-to-end latency p50 / p99"]
    assert "histogram_quantile(0.5," in p and "histogram_quantile(0.99," in p
    assert "by (le, stage)" in exprs["Pipeline stage p99"]
    assert 'outcome="timeout"' in exprs["Issuer timeouts and unavailable"]
    assert "switch_journal_commits_total" in exprs["Journal commits/s vs requests/s"]


def test_a_metric_or_label_that_does_not_exist_is_reported() -> None:
    d = load()
    panel = next(iter(query_panels(d)))
    panel["targets"] = [
        {"refId": "A", "expr": "sum(rate(switch_requests_totl[1m]))", "legendFormat": ""},
        {"refId": "B", "expr": 'sum(rate(switch_mac_failures_total{issuer="ICBC"}[5m]))',
         "legendFormat": ""},
        {"refId": "C", "expr": "sum by (stage) (rate(switch_requests_total[1m]))",
         "legendFormat": "{{reason}}"},
        {"refId": "D", "expr": "sum(switch_journal_commit_seconds)", "legendFormat": ""},
    ]
    found = problems(d, catalogue())
    assert any("switch_requests_totl is not exposed" in f for f in found)
    assert any("switch_mac_failures_total has no label 'issuer'" in f for f in found)
    assert any("grouping by 'stage'" in f for f in found)
    assert any("legend uses 'reason'" in f for f in found)
    assert any("switch_journal_commit_seconds is not exposed" in f for f in found)


# --- the renderer -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard_render", ROOT / "dashboards" / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_histogram_quantile_interpolates_like_prometheus(render: ModuleType) -> None:
    buckets = {0.1: 50.0, 0.2: 100.0, 0.5: 100.0, math.inf: 100.0}
    assert render.histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert render.histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert render.histogram_quantile(0.25, buckets) == pytest.approx(0.05)
    assert render.histogram_quantile(0.99, {0.1: 0.0, 1.0: 10.0, math.inf: 20.0}) == 1.0
    assert math.isnan(render.histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}))


def test_panel_series_rates_and_approval_from_scrapes(render: ModuleType) -> None:
    m = PrometheusMetrics()
    m.issuer_link_state("ICBC", True)
    scrapes = []
    for i in range(4):  # each 30 s: 60 consume (45 approved), 30 refunds (all 51)
        if i:
            for k in range(60):
                m.request_completed("consume", "00" if k % 4 else "51", 0.004)
            for _ in range(30):
                m.request_completed("refund", "51", 0.02)
            m.journal_commit(90, 0.0002)
        if i == 3:
            m.issuer_link_state("ICBC", False)
        scrapes.append(render.Scrape(30.0 * i, render.parse_exposition(m.exposition().decode())))
    s = render.panel_series(scrapes)
    assert math.isnan(s.tps[0])
    assert s.tps[1:] == pytest.approx([3.0, 3.0, 3.0])  # 90 per 30 s
    assert s.commits_per_s[3] == pytest.approx(1 / 30)
    assert s.approval["consume"][3] == pytest.approx(0.75)
    assert s.approval["refund"][3] == 0.0  # no approvals is 0, not a gap
    assert s.link_up["ICBC"] == [1.0, 1.0, 1.0, 0.0]
    assert s.p99[3] < 0.025 and s.p50[3] <= 0.005


def test_synthetic_scenario_shows_the_outage_and_its_saf_backlog(render: ModuleType) -> None:
    scrapes = render.synthetic_scrapes(minutes=10)
    s = render.panel_series(scrapes)
    down = [t for t, v in zip(s.t_min, s.link_up["CMB"]) if v == 0.0]
    assert down and min(down) == pytest.approx(6.0) and max(down) < 8.5
    assert all(v == 1.0 for v in s.link_up["ICBC"])
    assert max(s.saf_depth["CMB"]) > 0 and s.saf_depth["CMB"][-1] == 0
    assert 20 < s.tps[-1] < 60
    consume = s.approval["consume"]
    assert min(consume[1:]) < 0.9 < consume[int(5.5 * 12)]  # approvals dip while CMB is down


def test_scrape_url_reads_a_real_metrics_endpoint(render: ModuleType) -> None:
    async def main() -> list[Any]:
        m = PrometheusMetrics()
        m.request_completed("consume", "00", 0.01)

        def between_scrapes(_: float) -> None:  # the switch answers 10 more between scrapes
            for _ in range(10):
                m.request_completed("consume", "00", 0.01)

        async with anyio.create_task_group() as tg:
            port = await tg.start(lambda task_status: serve_http(
                m, "127.0.0.1", 0, lambda: True, task_status=task_status))
            url = f"http://127.0.0.1:{port}/metrics"
            scrapes: list[Any] = await anyio.to_thread.run_sync(
                lambda: render.scrape_url(url, 3, 0.0, sleep=between_scrapes))
            tg.cancel_scope.cancel()
        return scrapes

    scrapes = anyio.run(main)
    totals = [render.select(s.samples, "switch_requests_total")[""] for s in scrapes]
    assert totals == [1.0, 11.0, 21.0]
    assert [s.t for s in scrapes] == sorted(s.t for s in scrapes)


def test_render_writes_a_small_png_saying_the_data_is_synthetic(
    render: ModuleType, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "dashboard.png"
    series = render.panel_series(render.synthetic_scrapes(minutes=3))
    title = render.render(load(), series, out, None)
    assert "SYNTHETIC" in title
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < len(data) < 300_000
    assert "SYNTHETIC" not in render.figure_title("http://127.0.0.1:9100/metrics")


def test_render_refuses_a_dashboard_without_its_panels(render: ModuleType, tmp_path: Path) -> None:
    d = load()
    d["panels"] = [p for p in d["panels"] if p.get("title") != "SAF depth"]
    with pytest.raises(ValueError, match="SAF depth"):
        render.rendered_titles(d)


def test_committed_picture_is_a_png_under_300_kb() -> None:
    data = (ROOT / "docs" / "dashboard.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000
