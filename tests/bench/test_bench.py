"""The bench suite's own correctness: frames it sends, responses it reads, the codec-echo
baseline, the books check, and a ~2 s smoke run of the generator against a real ``switch demo``
(N terminals onboarded and activated over TCP) whose approvals must match the journal and the
issuers' balances. Performance is never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.echo_server import codec_echo_body
from bench.harness import Books, check_books, echo_process, onboard_terminals, switch_process
from bench.wire import CARDS, FrameBuilder, ResponseScanner, balance_fen, dummy_keys, terminal_codec
from switch.core.framing import ENVELOPE_LEN, LEN_BYTES
from switch.crypto.mac import cup_mac
from switch.demo_fixture import TERMINALS_BY_TID
from switch.pos.client import TerminalClient

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors.json"
TMK = bytes.fromhex(TERMINALS_BY_TID["20000001"].tmk_hex or "")
MID = TERMINALS_BY_TID["20000001"].mid


def builder(card_index: int = 0) -> FrameBuilder:
    return FrameBuilder(terminal_codec(), "20000001", MID, TMK, dummy_keys(TMK), "000007", CARDS[card_index])


@pytest.mark.parametrize("card_index", [0, 1])
def test_patched_consume_equals_the_terminal_clients_encoding(card_index: int) -> None:
    b = builder(card_index)
    b.verify()
    codec = terminal_codec()
    client = TerminalClient("127.0.0.1", 1, "20000001", MID, TMK, codec=codec)
    client.keys = dummy_keys(TMK)
    client.batch = "000007"
    card = CARDS[card_index]
    for stan, amount in ((1, 1), (999_999, 9), (123_456, 5)):
        fields = client.card_fields(processing_code="000000", type_code="22", card=card.pan, amount_fen=amount,
                                    pin=card.pin, entry="swipe", expiry=card.expiry, stan=f"{stan:06d}")
        want, _ = client.build_frame("0200", fields, mac=True)
        got = b.consume(stan, amount)
        assert got == want
        body = got[LEN_BYTES + ENVELOPE_LEN :]
        _, decoded = codec.decode(body)
        assert decoded[11] == f"{stan:06d}" and decoded[4] == f"{amount:012d}" and decoded[41] == "20000001"
        assert decoded[64] == cup_mac(dummy_keys(TMK).mak, body[:-8])


def test_scanner_reads_what_the_codec_decodes() -> None:
    codec = terminal_codec()
    scanner = ResponseScanner()
    frames = [bytes.fromhex(v["frame_hex"]) for v in json.loads(VECTORS.read_text())["vectors"]
              if len(v.get("frame_hex") or "") > 2 * (LEN_BYTES + ENVELOPE_LEN)]
    assert len(frames) >= 5
    # a full financial response as the switch sends it (§6.1), with every field up to 39
    frames.append(b"\x00\x00" + bytes(11) + codec.encode("0210", {
        2: "6222029375642931684", 3: "000000", 4: "000000000123", 11: "004711", 12: "101112", 13: "1126",
        14: "3012", 15: "1126", 22: "021", 25: "00", 32: "48521000", 37: "123456789012", 38: "A1B2C3",
        39: "00", 41: "20000001", 42: MID, 44: "ICBC       48521000   ", 49: "156", 60: "22000007000",
        63: "CUP", 64: b"12345678"}))
    seen = 0
    for frame in frames:
        body = frame[LEN_BYTES + ENVELOPE_LEN :]
        mti, full = codec.decode(body)
        smti, got = scanner.scan(body)
        assert smti == mti
        want = {k: full[k] for k in ResponseScanner.WANTED if k in full}
        assert got == want
        seen += len(got)
    assert seen >= 20


def test_codec_echo_answers_with_the_echo_fields_and_00() -> None:
    codec = terminal_codec()
    req = builder().consume(42, 3)[LEN_BYTES + ENVELOPE_LEN :]
    body = codec_echo_body(codec, req)
    assert body is not None
    mti, fields = codec.decode(body)
    assert mti == "0210" and fields[39] == "00" and fields[11] == "000042" and fields[4] == "000000000003"
    assert 52 not in fields and 35 not in fields  # no PIN block or track goes back
    assert codec_echo_body(codec, b"\x02\x00garbage") is None


def test_balance_fen_reads_f54() -> None:
    assert balance_fen("1002156C000000012345") == 12345
    assert balance_fen("1002156D000000000100") == -100
    assert balance_fen("1002156X000000000100") is None and balance_fen(None) is None


def _gen(approved: int, fen: int, delta: int) -> dict[str, Any]:
    return {"by_txn": {"consume": {"approved": approved, "approved_fen": fen}},
            "expected_delta_fen": {"622202****1684": delta}, "lost": 0, "connection_failures": 0}


def test_check_books_agrees_only_when_everything_agrees() -> None:
    journal = {"consume": {"rows": 3, "approved": 2, "approved_fen": 7}}
    before, after = {"622202****1684": 100}, {"622202****1684": 93}
    assert check_books(_gen(2, 7, -7), journal, before, after)["ok"]
    assert not check_books(_gen(3, 7, -7), journal, before, after)["ok"]  # an approval the journal lacks
    assert not check_books(_gen(2, 8, -7), journal, before, after)["ok"]  # amounts differ
    assert not check_books(_gen(2, 7, -8), journal, before, after)["ok"]  # the issuer moved another sum
    lost = _gen(2, 7, -7) | {"lost": 1}
    assert not check_books(lost, journal, before, after)["ok"]  # an unanswered request is unverifiable


def _loadgen(tmp: Path, port: int, *extra: str) -> dict[str, Any]:
    out = tmp / "lg.json"
    subprocess.run([sys.executable, "-m", "bench.loadgen", "--port", str(port), "--duration", "2",
                    "--max-requests", "20000", "--drain", "10", "--out", str(out), *extra],
                   check=True, timeout=50, capture_output=True)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.mark.anyio
async def test_smoke_realistic_mix_against_the_switch_balances_the_books(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = switch_process(data_dir)
    port, _ = server.start()
    try:
        terms = await onboard_terminals(data_dir, port, 4)
        assert len({t["tid"] for t in terms}) == 4 and all(t["mid"] == MID for t in terms)
        tfile = tmp_path / "terminals.json"
        tfile.write_text(json.dumps(terms))
        books = Books(data_dir, port)
        before = await books.balances()
        start_id = books.journal_max_id()
        gen = _loadgen(tmp_path, port, "--terminals", "4", "--terminals-file", str(tfile), "--mode", "closed",
                       "--mix", "realistic", "--seed", "7")
        journal = books.journal_approvals(start_id, [t["tid"] for t in terms])
        after = await books.balances()
    finally:
        server.stop()
    check = check_books(gen, journal, before, after)
    assert check["ok"], check["mismatches"]
    assert gen["sent"] == gen["answered"] > 0 and gen["lost"] == 0
    assert gen["by_txn"]["consume"]["approved"] > 0
    assert sum(-c["moved_fen"] for c in check["cards"].values()) > 0  # money really moved
    # the two-step scenarios ran and were approved end to end at least once over 2 s
    assert {"pre_auth", "completion", "balance_inquiry"} <= set(gen["by_txn"])
    assert journal["consume"]["approved"] == gen["by_txn"]["consume"]["approved"]
    assert gen["latency_us"]["count"] == gen["answered"]


def test_smoke_open_loop_against_the_codec_echo(tmp_path: Path) -> None:
    server = echo_process("codec")
    (port,) = server.start()
    try:
        gen = _loadgen(tmp_path, port, "--terminals", "8", "--dummy-keys", "--mode", "open", "--rate", "200")
    finally:
        server.stop()
    assert gen["latency_from"] == "scheduled time"
    # 2 s at 200/s on a fixed schedule: every scheduled request was sent and answered
    assert gen["scheduled_scenarios"] == gen["sent"] == gen["answered"] == 400
    assert gen["by_txn"]["consume"]["codes"] == {"00": 400}
    # the worst latency per half second of start time covers the whole schedule, and is the max
    slots = gen["worst_ms_by_slot"]
    assert list(slots) == ["0.0", "0.5", "1.0", "1.5"]
    assert max(slots.values()) == pytest.approx(gen["latency_us"]["max"] / 1000, rel=0.01, abs=0.01)


def test_summary_reports_the_soak_growth_after_warm_up_and_over_the_second_half() -> None:
    from bench.report import summary_markdown

    results = {
        "started": "T", "command": "c", "terminals": 1, "host": "h", "phases": [],
        "headline": {"baseline_tps": 100.0, "tps": 10.0, "ratio": 0.1, "plain_tps": 300.0, "open_rate": 8.0,
                     "p99_ms": 5.0},
        "soak": {"seconds": 300.0, "rate": 50.0, "rss_kib": [900, 1000, 1050, 1100, 1100, 1100],
                 "growth_percent_after_warmup": 10.0, "growth_percent_second_half": 0.0},
    }
    soak = [line for line in summary_markdown(results).splitlines() if line.startswith("Soak:")]
    assert soak == ["Soak: 300 s open loop at 50/s: RSS 1000 -> 1100 KiB, +10.0 % after the first slice,"
                    " +0.0 % over the second half (target: < 10 %)."]


def _phase(name: str, server: str, answered: int, elapsed: float, cpu_us: float, **extra: Any) -> dict[str, Any]:
    result = {"answered": answered, "elapsed_s": elapsed, "tps": answered / elapsed,
              "latency_us": {"p99": 7000}, "offered_rate": extra.get("rate")}
    return {"name": name, "server": server, "result": result, "server_cpu_us_per_request": cpu_us}


def test_the_headline_ratio_pools_the_alternating_rounds() -> None:
    from bench.report import summary_markdown
    from bench.run import headline

    phases = [
        _phase("plain-echo-closed", "plain-echo", 30_000, 10.0, 10.0),
        # minutes apart on a machine that slowed down: the single phases say 0.05
        _phase("codec-echo-closed", "codec-echo", 100_000, 10.0, 80.0),
        _phase("switch-closed", "switch", 5_000, 10.0, 1_600.0),
        _phase("switch-open-80", "switch", 4_000, 10.0, 1_700.0, rate=400.0),
        # adjacent slices: the first round on a fast machine, the second on a slow one
        _phase("pair-1-codec-echo", "codec-echo", 30_000, 3.0, 80.0),
        _phase("pair-1-switch", "switch", 6_000, 3.0, 800.0),
        _phase("pair-2-codec-echo", "codec-echo", 15_000, 3.0, 160.0),
        _phase("pair-2-switch", "switch", 3_000, 3.0, 1_600.0),
    ]
    h = headline(phases)
    assert h["paired_rounds"] == 2
    assert h["tps"] == pytest.approx(9_000 / 6.0) and h["baseline_tps"] == pytest.approx(45_000 / 6.0)
    assert h["ratio"] == pytest.approx(0.2) and h["single_ratio"] == pytest.approx(0.05)
    # CPU per request over all the answers: (6000 * 800 + 3000 * 1600) / 9000
    assert h["switch_cpu_us"] == pytest.approx(1_066.667, rel=1e-4)
    assert h["baseline_cpu_us"] == pytest.approx((30_000 * 80 + 15_000 * 160) / 45_000)
    assert (h["p99_ms"], h["open_rate"]) == (7.0, 400.0)
    # without rounds the single phases are the headline
    single = headline([p for p in phases if not p["name"].startswith("pair-")])
    assert (single["paired_rounds"], single["ratio"]) == (0, pytest.approx(0.05))
    text = summary_markdown({"started": "T", "command": "c", "terminals": 1, "host": "h", "phases": [],
                             "headline": h})
    assert "= 0.200 × codec-echo (7500 TPS) (pooled over 2 alternating rounds" in text
    assert "gave 0.050)" in text
    assert not any(line.startswith("Below saturation") for line in text.splitlines())  # no echo at 80 %


def test_the_summary_compares_cpu_per_request_below_saturation_with_the_closed_loop() -> None:
    from bench.report import summary_markdown
    from bench.run import headline

    phases = [
        _phase("plain-echo-closed", "plain-echo", 30_000, 10.0, 10.0),
        _phase("codec-echo-closed", "codec-echo", 100_000, 10.0, 100.0),
        _phase("switch-closed", "switch", 10_000, 10.0, 1_000.0),
        _phase("switch-open-80", "switch", 8_000, 10.0, 1_300.0, rate=800.0),
        _phase("codec-echo-open-80", "codec-echo", 8_000, 10.0, 250.0, rate=800.0),
    ]
    phases[-1]["result"]["latency_us"]["p99"] = 1_500
    h = headline(phases)
    assert h["open80_cpu"] == {"switch_cpu_us": 1_300.0, "switch_closed_cpu_us": 1_000.0, "echo_cpu_us": 250.0,
                               "echo_closed_cpu_us": 100.0, "echo_p99_ms": 1.5}
    assert h["p99_ms"] == 7.0  # the headline p99 stays the switch's
    text = summary_markdown({"started": "T", "command": "c", "terminals": 1, "host": "h", "phases": [],
                             "headline": h})
    below = [line for line in text.splitlines() if line.startswith("Below saturation")]
    assert len(below) == 1
    assert below[0].startswith("Below saturation: at 800/s a request costs the switch 1300 µs of CPU, 1.30 ×"
                               " its closed loop's; the codec echo at the same rate 250 µs, 2.50 × its closed"
                               " loop's (p99 1.50 ms).")
