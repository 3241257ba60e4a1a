"""After scripted traffic, /metrics (parsed by prometheus-client's own parser) has every metric of
the catalogue in the README with its labels, and /healthz and /readyz answer (§15)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from switch.core.framing import encode_frame

from .conftest import DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CARD = "6222029375642931684"

# sample name -> labels it must carry (a sample of it must exist after the traffic below)
CATALOGUE: dict[str, set[str]] = {
    "switch_requests_total": {"transaction", "response_code"},
    "switch_request_duration_seconds_bucket": {"transaction", "le"},
    "switch_pipeline_stage_seconds_bucket": {"stage", "le"},
    "switch_issuer_request_duration_seconds_bucket": {"issuer", "outcome", "le"},
    "switch_issuer_requests_total": {"issuer", "outcome"},
    "switch_issuer_link_up": {"issuer"},
    "switch_issuer_pending": {"issuer"},
    "switch_connections_open": set(),
    "switch_connections_closed_total": {"reason"},
    "switch_store_write_failures_total": set(),
    "switch_malformed_frames_total": {"reason"},
    "switch_mac_failures_total": set(),
    "switch_journal_commit_seconds_bucket": {"le"},
    "switch_journal_commit_batch_size_bucket": {"le"},
    "switch_journal_commits_total": set(),
    "switch_requests_in_flight": set(),
    "switch_saf_depth": {"issuer"},
    "switch_saf_oldest_age_seconds": {"issuer"},
    "switch_limit_rejections_total": set(),
    "switch_duplicates_total": {"outcome"},
}


def samples(demo: DemoSwitch) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(demo.metrics_text()):
        for s in family.samples:
            out.setdefault(s.name, []).append(dict(s.labels))
    return out


async def test_catalogue_after_scripted_traffic(demo: DemoSwitch) -> None:
    term = demo.terminal()
    async with term.connect():
        await term.sign_on("003")
        await term.consume(CARD, 100, pin="123456", expiry="3012")
        await term.balance(CARD, pin="123456", expiry="3012")
        f = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=100, expiry="3012")
        frame, _ = term.build_frame("0200", f, mac=True)
        await term.send_raw(frame)
        await term.send_raw(frame)  # a retransmission: answered from the journal
        f[64] = b"BADMAC00"
        await term.send_fields("0200", {**f, 11: term.take_stan()}, mac=False)
    async with term.connect():  # a frame with bit 1 set: closed and counted
        body = bytearray(frame[13:])
        body[2] |= 0x80
        await term.send_raw(encode_frame(frame[2:7], frame[7:13], bytes(body)), timeout=5)
    got = samples(demo)
    for name, labels in CATALOGUE.items():
        assert name in got, f"{name} missing from /metrics"
        assert any(labels <= set(l) for l in got[name]), f"{name} lacks labels {labels}: {got[name][:3]}"
    assert {"checks", "handler", "respond", "journal"} <= {l["stage"] for l in got["switch_pipeline_stage_seconds_bucket"]}
    assert {"resent"} <= {l["outcome"] for l in got["switch_duplicates_total"]}
    # the outcome the dashboard's issuer latency panel selects (it stayed empty while the link said "ok")
    assert {l["outcome"] for l in got["switch_issuer_requests_total"]} == {"answered"}
    # every routed issuer has a link gauge, BOC (a route with no listener, §14) too, at 0
    link_up = {s.labels["issuer"]: s.value for f in text_string_to_metric_families(demo.metrics_text())
               for s in f.samples if s.name == "switch_issuer_link_up"}
    assert {"ICBC", "CMB", "BOC"} <= set(link_up), sorted(link_up)
    assert (link_up["BOC"], link_up["ICBC"]) == (0.0, 1.0)


def test_health_endpoints(demo: DemoSwitch) -> None:
    base = f"http://127.0.0.1:{demo.metrics_port}"
    with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(base + "/readyz", timeout=5) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(base + "/nope", timeout=5)
    assert info.value.code == 404
    info.value.close()
