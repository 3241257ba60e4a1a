"""Turning one bench run's results into a Markdown summary and PNG plots.

Owns the presentation: the summary table (TPS, latency percentiles, ratios to the codec-echo
baseline of the same run, generator CPU, correctness), the throughput-vs-offered-load and the
p50/p99/p999-vs-offered-load plots (matplotlib, Agg backend, no display), and the final one-line
verdict ``bench: tps=... baseline_tps=... ratio=... p99_ms=...``.

Must not: run anything or measure anything (``bench.run`` does), or round figures before the
ratios are taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def ms(us: float | int | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def final_line(results: dict[str, Any]) -> str:
    h = results["headline"]
    return (f"bench: tps={h['tps']:.0f} baseline_tps={h['baseline_tps']:.0f} ratio={h['ratio']:.3f} "
            f"p99_ms={h['p99_ms']:.2f}")


def summary_markdown(results: dict[str, Any]) -> str:
    base = results["headline"]["baseline_tps"]
    lines = [
        f"# Bench run {results['started']}",
        "",
        f"Command: `{results['command']}` · {results['terminals']} terminals · host: {results['host']}",
        "",
        "| phase | server | mode | mix | offered/s | TPS | × codec-echo | p50 ms | p99 ms | p99.9 ms | max ms |"
        " lost | generator CPU | server CPU µs/req | books |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in results["phases"]:
        r = p["result"]
        lat = r["latency_us"]
        books = p.get("books")
        verdict = "-" if books is None else ("ok" if books["ok"] else "MISMATCH")
        offered = "-" if r["offered_rate"] is None else f"{r['offered_rate']:.0f}"
        lines.append(
            f"| {p['name']} | {p['server']} | {r['mode']} | {r['mix']} | {offered} | {r['tps']:.0f} |"
            f" {r['tps'] / base:.3f} | {ms(lat['p50'])} | {ms(lat['p99'])} | {ms(lat['p999'])} |"
            f" {ms(lat['max'])} | {r['lost']} | {r['generator_cpu'] * 100:.0f} % |"
            f" {p.get('server_cpu_us_per_request', '-')} | {verdict} |"
        )
    h = results["headline"]
    paired = (f" (pooled over {h['paired_rounds']} alternating rounds of codec echo and switch; the single"
              f" closed-loop phases above, minutes apart, gave {h['single_ratio']:.3f})"
              if h.get("paired_rounds") else "")
    lines += [
        "",
        f"Headline: switch closed-loop {h['tps']:.0f} TPS = {h['ratio']:.3f} × codec-echo ({base:.0f} TPS){paired};"
        f" plain loopback echo {h['plain_tps']:.0f} TPS; switch open loop at {h['open_rate']:.0f}/s"
        f" (80 % of closed loop): p99 {h['p99_ms']:.2f} ms.",
        "",
        f"CPU per request (the figure the shared machine's load moves least): switch"
        f" {h.get('switch_cpu_us', 0):.0f} µs, codec echo {h.get('baseline_cpu_us', 0):.0f} µs:"
        f" the switch costs {h.get('cpu_ratio', 0):.3f} × the codec echo's work per request"
        f" (1/{1 / h['cpu_ratio'] if h.get('cpu_ratio') else 0:.1f}).",
        "",
    ]
    load = h.get("open80_cpu") or {}
    if load.get("echo_p99_ms") is not None and load["switch_closed_cpu_us"] and load["echo_closed_cpu_us"]:
        lines += [
            f"Below saturation: at {h['open_rate']:.0f}/s a request costs the switch {load['switch_cpu_us']:.0f} µs"
            f" of CPU, {load['switch_cpu_us'] / load['switch_closed_cpu_us']:.2f} × its closed loop's; the codec"
            f" echo at the same rate {load['echo_cpu_us']:.0f} µs, {load['echo_cpu_us'] / load['echo_closed_cpu_us']:.2f}"
            f" × its closed loop's (p99 {load['echo_p99_ms']:.2f} ms). A server that is not saturated handles"
            " each request on its own wake-up, so \"80 % of the closed loop's rate\" needs more than 80 % of"
            " the closed loop's CPU.",
            "",
        ]
    soak = results.get("soak")
    if soak:
        lines += [
            f"Soak: {soak['seconds']:.0f} s open loop at {soak['rate']:.0f}/s: RSS {soak['rss_kib'][1]} ->"
            f" {soak['rss_kib'][-1]} KiB, {soak['growth_percent_after_warmup']:+.1f} % after the first slice"
            + (f", {soak['growth_percent_second_half']:+.1f} % over the second half"
               if "growth_percent_second_half" in soak else "")
            + " (target: < 10 %).",
            "",
        ]
    lines += [
        "Latency: closed loop from the send; open loop from the scheduled send time (no coordinated"
        " omission). A generator CPU near 100 % means the generator, not the server, set the pace.",
        "",
        "## Correctness under load (switch phases)",
        "",
    ]
    for p in results["phases"]:
        books = p.get("books")
        if books is None:
            continue
        lines.append(f"- {p['name']}: generator approvals {books['generator_approvals']}, journal approvals"
                     f" {books['journal_approvals']}; " + "; ".join(
                         f"{pan} moved {c['moved_fen']} fen (approvals imply {c['expected_fen']})"
                         for pan, c in books["cards"].items())
                     + ("" if books["ok"] else " — MISMATCH: " + "; ".join(books["mismatches"])))
    lines += ["", final_line(results), ""]
    return "\n".join(lines)


def plots(results: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """throughput and latency vs offered load (open-loop phases), one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for p in results["phases"]:
        r = p["result"]
        if r["mode"] == "open":
            series.setdefault(p["server"], []).append((float(r["offered_rate"]), r))
    paths: list[Path] = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 1.0
    for server, pts in sorted(series.items()):
        pts.sort(key=lambda x: x[0])
        ax.plot([x for x, _ in pts], [r["tps"] for _, r in pts], marker="o", label=f"{server} achieved")
        top = max(top, max(x for x, _ in pts))
    ax.plot([0, top], [0, top], linestyle=":", color="grey", label="offered = achieved")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("achieved throughput (responses/s)")
    ax.set_title("Throughput vs offered load (open loop)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    path = out_dir / f"{stem}-throughput.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"p50": "-", "p99": "--", "p999": ":"}
    for server, pts in sorted(series.items()):
        pts.sort(key=lambda x: x[0])
        for q, style in styles.items():
            ax.plot([x for x, _ in pts], [r["latency_us"][q] / 1000 for _, r in pts], linestyle=style, marker="o",
                    label=f"{server} {q}")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency from scheduled send (ms, log)")
    ax.set_title("Latency percentiles vs offered load (open loop, HDR histogram)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    path = out_dir / f"{stem}-latency.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths
