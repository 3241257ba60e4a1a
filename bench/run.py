"""The bench orchestrator: ``make bench-quick`` (``--quick``) and ``make bench`` (``--full``).

    python -m bench.run --quick | --full [--seconds S] [--pairs N] [--pair-seconds S] [--terminals N]
                        [--results-dir D]

Runs every phase with the same generator (``bench.loadgen``, its own process) against:
1. the plain loopback echo (``bench.echo_server --mode plain``): the loop + generator ceiling;
2. the codec echo (``--mode codec``): the baseline every switch figure is divided by;
3. the switch (``switch demo`` subprocess, fresh data directory, N terminals of M2 onboarded and
   activated over TCP, see ``bench.harness``): closed loop, then open loop at 80 % of the
   closed-loop TPS, then ``--pairs`` rounds alternating a codec-echo and a switch closed-loop
   slice (the codec echo stays up for them), pooled into the headline ratio: on this shared
   machine the speed drifts by up to 2 x within minutes, so only adjacent slices compare
   (``--full`` adds the soak, the realistic mix and an open-loop sweep over several rates, and
   the codec echo at the same rates, for the plots).
After every switch phase the books are checked (``bench.harness.check_books``): the generator's
approvals equal the journal's per transaction type (count and fen), and each card's available
balance at its mock issuer moved by exactly what those approvals imply.

Writes ``<results-dir>/<timestamp>.json`` (every phase's generator output, books, headline),
``<timestamp>-summary.md`` and the two plots, copies the summary to ``summary.md``, and ends by
printing exactly one line: ``bench: tps=... baseline_tps=... ratio=... p99_ms=...``. Exits 1 when
a books check failed (the line is still printed).

Must not: assert on performance, leave a server process running, or print keys or full PANs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio

from bench.harness import (
    Books,
    ServerProcess,
    SwitchWithIssuers,
    check_books,
    echo_process,
    onboard_terminals,
    switch_process,
)
from bench.report import final_line, plots, summary_markdown

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STAN_SPAN = 20_000  # per terminal and phase; 49 phases fit in the 6-digit STAN
BOOKS_RETRIES = 20  # re-read the books up to this many times, 0.25 s apart (a 98 reversal may lag)
FULL_SWEEP = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.phases: list[dict[str, Any]] = []
        self.paired_echo = (0, 0)  # (port, pid) of the codec echo kept up for the paired rounds
        self.stan_block = 0

    def loadgen(self, name: str, port: int, *, mode: str, mix: str, rate: float = 0.0, dummy: bool = False,
                terminals_file: Path | None = None) -> dict[str, Any]:
        out = self.work / f"{len(self.phases):02d}-{name}.json"
        argv = [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--terminals", str(self.args.terminals),
                "--mode", mode, "--mix", mix, "--duration", str(self.args.seconds),
                "--max-requests", str(self.args.max_requests), "--out", str(out), "--drain", "15"]
        if mode == "open":
            argv += ["--rate", f"{rate:.1f}"]
        if dummy:
            argv.append("--dummy-keys")
        else:
            assert terminals_file is not None
            argv += ["--terminals-file", str(terminals_file), "--stan-base", str(1 + self.stan_block * STAN_SPAN),
                     "--stan-span", str(STAN_SPAN)]
            self.stan_block += 1
        log(f"bench: {name}: {mode} loop, {mix}" + (f", {rate:.0f}/s" if mode == "open" else ""))
        limit = self.args.seconds + 120
        done = subprocess.run(argv, capture_output=True, text=True, timeout=limit)
        if done.returncode != 0:
            raise RuntimeError(f"loadgen {name} failed:\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(out.read_text())
        lat = result["latency_us"]
        log(f"bench:   {result['tps']:.0f} TPS, p50 {lat['p50'] / 1000:.2f} ms, p99 {lat['p99'] / 1000:.2f} ms,"
            f" lost {result['lost']}, generator CPU {result['generator_cpu'] * 100:.0f} %")
        return result

    def echo_phases(self, mode: str, phases: list[tuple[str, str, str, float]]) -> None:
        server = echo_process(mode)
        (port,) = server.start()
        try:
            for name, loop_mode, mix, rate in phases:
                assert server.proc is not None
                self.echo_phase(name, mode, port, server.proc.pid, mode=loop_mode, mix=mix, rate=rate)
        finally:
            server.stop()

    def echo_phase(self, name: str, kind: str, port: int, pid: int, *, mode: str, mix: str,
                   rate: float = 0.0) -> dict[str, Any]:
        cpu0 = cpu_seconds(pid)
        r = self.loadgen(name, port, mode=mode, mix=mix, rate=rate, dummy=True)
        cpu = cpu_per_request(cpu_seconds(pid) - cpu0, r["answered"])
        log(f"bench:   server CPU {cpu} us per request")
        phase = {"name": name, "server": f"{kind}-echo", "result": r, "server_cpu_us_per_request": cpu}
        self.phases.append(phase)
        return phase

    async def switch_phase(self, name: str, port: int, books: Books, tids: list[str], terminals_file: Path, *,
                           mode: str, mix: str, rate: float = 0.0) -> dict[str, Any]:
        before = await books.balances()
        start_id = books.journal_max_id()
        commits0, answered0 = switch_counters(self.metrics_port)
        rss0 = rss_kib(self.switch_pid)
        cpu0 = cpu_seconds(self.switch_pid)
        r = await anyio.to_thread.run_sync(
            lambda: self.loadgen(name, port, mode=mode, mix=mix, rate=rate, terminals_file=terminals_file)
        )
        check: dict[str, Any] = {}
        for _ in range(BOOKS_RETRIES):  # bounded: the journal and balances settle once reversals are done
            journal = books.journal_approvals(start_id, tids)
            after = await books.balances()
            check = check_books(r, journal, before, after)
            if check["ok"]:
                break
            await anyio.sleep(0.25)
        if not check["ok"]:
            log(f"bench:   BOOKS MISMATCH: {check['mismatches']}")
        else:
            log(f"bench:   books ok: {check['generator_approvals']} approvals = journal")
        commits1, answered1 = switch_counters(self.metrics_port)
        rss1 = rss_kib(self.switch_pid)
        cpu = cpu_per_request(cpu_seconds(self.switch_pid) - cpu0, answered1 - answered0)
        log(f"bench:   switch CPU {cpu} us per request")
        requests = max(answered1 - answered0, 1.0)
        group = {
            "journal_commits": commits1 - commits0,
            "requests": answered1 - answered0,
            "requests_per_commit": round(requests / max(commits1 - commits0, 1.0), 2),
            "rss_kib_before": rss0, "rss_kib_after": rss1,
        }
        log(f"bench:   group commit: {group['requests_per_commit']} requests per journal commit; "
            f"RSS {rss0} -> {rss1} KiB")
        phase = {"name": name, "server": "switch", "result": r, "books": check, "switch": group,
                 "server_cpu_us_per_request": cpu}
        self.phases.append(phase)
        return phase

    async def switch_phases(self) -> None:
        data_dir = self.work / "data"
        server: Any = SwitchWithIssuers(data_dir) if self.args.separate_issuers else switch_process(data_dir)
        port, metrics_port = server.start()[:2]
        self.metrics_port = metrics_port
        assert server.proc is not None
        self.switch_pid = server.proc.pid
        try:
            terms = await onboard_terminals(data_dir, port, self.args.terminals)
            terminals_file = self.work / "terminals.json"  # test keys the demo issued; deleted with the work dir
            terminals_file.write_text(json.dumps(terms))
            tids = [t["tid"] for t in terms]
            books = Books(data_dir, port)
            closed = await self.switch_phase("switch-closed", port, books, tids, terminals_file,
                                             mode="closed", mix="consume")
            tps = float(closed["result"]["tps"])
            await self.switch_phase("switch-open-80", port, books, tids, terminals_file, mode="open",
                                    mix="consume", rate=max(1.0, 0.8 * tps))
            echo_port, echo_pid = self.paired_echo
            if echo_port:
                # the codec echo at the same offered rate, right after: what a request costs a
                # server below saturation on this machine, and its latency there
                await anyio.to_thread.run_sync(functools.partial(
                    self.echo_phase, "codec-echo-open-80", "codec", echo_port, echo_pid, mode="open",
                    mix="consume", rate=max(1.0, 0.8 * tps)))
            await self.paired_rounds(port, books, tids, terminals_file)
            if self.args.soak:
                # before the overload phases of the sweep: their queues (at 100-110 % of the closed
                # loop) raise the heap's high-water mark, and growth below it would not show in RSS
                await self.soak(port, books, tids, terminals_file, rate=max(1.0, 0.5 * tps))
            if self.args.full:
                await self.switch_phase("switch-closed-realistic", port, books, tids, terminals_file,
                                        mode="closed", mix="realistic")
                for f in FULL_SWEEP:
                    if f == 0.8:
                        continue
                    await self.switch_phase(f"switch-open-{int(f * 100)}", port, books, tids, terminals_file,
                                            mode="open", mix="consume", rate=max(1.0, f * tps))
        finally:
            code = server.stop()
            if code not in (0, None):
                log(f"bench: switch exited {code}:\n" + "".join(server.output[-20:]))


    async def paired_rounds(self, port: int, books: Books, tids: list[str], terminals_file: Path) -> None:
        """The headline ratio, measured in alternation: codec echo closed loop, switch closed loop,
        codec echo, switch... (both servers stay up; the idle one costs nothing). The shared
        machine's speed drifts by up to 2 x within minutes; phases minutes apart then give a
        ratio that says more about the drift than about the switch. Adjacent slices see the
        same machine, and the sums over all rounds (``headline``) average what drift is left."""
        echo = self.paired_echo
        seconds = self.args.seconds
        self.args.seconds = self.args.pair_seconds
        try:
            for i in range(self.args.pairs):
                await anyio.to_thread.run_sync(functools.partial(
                    self.echo_phase, f"pair-{i + 1}-codec-echo", "codec", echo[0], echo[1], mode="closed",
                    mix="consume"))
                await self.switch_phase(f"pair-{i + 1}-switch", port, books, tids, terminals_file,
                                        mode="closed", mix="consume")
        finally:
            self.args.seconds = seconds

    async def soak(self, port: int, books: Books, tids: list[str], terminals_file: Path, *, rate: float) -> None:
        """Memory over a long open-loop run: RSS sampled between slices of the same load."""
        samples = [rss_kib(self.switch_pid)]
        slices = max(1, int(self.args.soak // self.args.seconds))
        for i in range(slices):
            await self.switch_phase(f"soak-{i:02d}", port, books, tids, terminals_file, mode="open",
                                    mix="consume", rate=rate)
            samples.append(rss_kib(self.switch_pid))
        growth = (samples[-1] - samples[1]) / max(samples[1], 1) * 100 if len(samples) > 2 else 0.0
        # bounded caches (SQLite's page cache of each connection, 2 MiB by default) fill during the
        # first minutes as the journal grows; a leak keeps growing in the second half too
        mid = samples[len(samples) // 2]
        late = (samples[-1] - mid) / max(mid, 1) * 100 if len(samples) > 4 else 0.0
        log(f"bench: soak {self.args.soak:.0f} s at {rate:.0f}/s: RSS {samples[1]} -> {samples[-1]} KiB "
            f"({growth:+.1f} % after the first slice, {late:+.1f} % over the second half)")
        self.soak_result = {"seconds": self.args.soak, "rate": rate, "rss_kib": samples,
                            "growth_percent_after_warmup": round(growth, 1),
                            "growth_percent_second_half": round(late, 1)}



def switch_counters(metrics_port: int) -> tuple[float, float]:
    """(journal commits, requests answered) from the switch's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    commits = answered = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "switch_journal_commits_total":
                commits += sample.value
            elif sample.name == "switch_requests_total":
                answered += sample.value
    return commits, answered


def cpu_seconds(pid: int) -> float:
    """User + system CPU the process has used so far (/proc/<pid>/stat, clock ticks)."""
    try:
        after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(after_name[11]) + int(after_name[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_request(cpu: float, requests: float) -> float:
    """µs of the server's CPU per answered request: unlike TPS, it barely moves when other
    processes share the machine (they take turns on the cores, not instructions from us)."""
    return round(cpu / requests * 1e6, 1) if requests > 0 else 0.0


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pooled(phases: list[dict[str, Any]]) -> tuple[float, float]:
    """(TPS, server CPU µs per request) of several phases taken together: all their answers over
    all their time, all their CPU over all their answers."""
    answered = sum(float(p["result"]["answered"]) for p in phases)
    elapsed = sum(float(p["result"]["elapsed_s"]) for p in phases)
    cpu_us = sum(float(p.get("server_cpu_us_per_request") or 0.0) * float(p["result"]["answered"]) for p in phases)
    return (answered / elapsed if elapsed > 0 else 0.0), (cpu_us / answered if answered > 0 else 0.0)


def headline(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """The release check's figures. TPS, baseline and their ratio come from the paired rounds
    (alternating codec echo and switch slices, pooled) when the run has them, else from the two
    closed-loop phases; both are kept."""
    by = {p["name"]: p["result"] for p in phases}
    single_tps = float(by["switch-closed"]["tps"])
    single_base = float(by["codec-echo-closed"]["tps"])
    cpu = {p["name"]: float(p.get("server_cpu_us_per_request") or 0.0) for p in phases}
    switch_cpu, base_cpu = cpu.get("switch-closed", 0.0), cpu.get("codec-echo-closed", 0.0)
    tps, base = single_tps, single_base
    pair_switch = [p for p in phases if p["name"].startswith("pair-") and p["server"] == "switch"]
    pair_echo = [p for p in phases if p["name"].startswith("pair-") and p["server"] == "codec-echo"]
    if pair_switch and pair_echo:
        tps, switch_cpu = pooled(pair_switch)
        base, base_cpu = pooled(pair_echo)
    open80 = by["switch-open-80"]
    # CPU per request at the open-loop rate against each server's own closed loop: on this machine
    # a server below saturation pays more per request (each one wakes it alone, on cold caches)
    load = {"switch_cpu_us": cpu.get("switch-open-80", 0.0), "switch_closed_cpu_us": cpu.get("switch-closed", 0.0),
            "echo_cpu_us": cpu.get("codec-echo-open-80", 0.0), "echo_closed_cpu_us": cpu.get("codec-echo-closed", 0.0),
            "echo_p99_ms": by["codec-echo-open-80"]["latency_us"]["p99"] / 1000 if "codec-echo-open-80" in by else None}
    return {"open80_cpu": load,
            "tps": tps, "baseline_tps": base, "ratio": tps / base if base else 0.0,
            "paired_rounds": min(len(pair_switch), len(pair_echo)),
            "single_tps": single_tps, "single_baseline_tps": single_base,
            "single_ratio": single_tps / single_base if single_base else 0.0,
            "switch_cpu_us": switch_cpu, "baseline_cpu_us": base_cpu,
            "cpu_ratio": base_cpu / switch_cpu if switch_cpu else 0.0,
            "plain_tps": float(by["plain-echo-closed"]["tps"]),
            "p99_ms": open80["latency_us"]["p99"] / 1000, "open_rate": float(open80["offered_rate"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description="The bench suite (see module doc).")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--quick", action="store_true", help="~30 s: one phase of each kind")
    g.add_argument("--full", action="store_true", help="longer phases, realistic mix, open-loop sweep, plots")
    p.add_argument("--seconds", type=float, help="per phase (quick 5, full 10)")
    p.add_argument("--soak", type=float, default=None,
                   help="with --full: seconds of open-loop load watching the switch's RSS (default 300)")
    p.add_argument("--terminals", type=int, default=64)
    p.add_argument("--demo-issuers", dest="separate_issuers", action="store_false",
                   help="run the mock issuers inside the switch's process (switch demo) instead of their own")
    p.add_argument("--max-requests", type=int, default=2_000_000)
    p.add_argument("--pairs", type=int, help="alternating codec-echo/switch closed-loop rounds for the headline"
                   " ratio (quick 2, full 4; 0: the single phases)")
    p.add_argument("--pair-seconds", type=float, help="per slice of a round (quick 4, full 5)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    args.seconds = args.seconds or (10.0 if args.full else 5.0)
    args.soak = args.soak if args.soak is not None else (300.0 if args.full else 0.0)
    args.pairs = args.pairs if args.pairs is not None else (4 if args.full else 2)
    args.pair_seconds = args.pair_seconds or (5.0 if args.full else 4.0)
    started = datetime.now(timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="switch-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        bench.echo_phases("plain", [("plain-echo-closed", "closed", "consume", 0.0)])
        paired = echo_process("codec")  # up through the switch phases, for the paired rounds
        (echo_port,) = paired.start()
        try:
            assert paired.proc is not None
            bench.paired_echo = (echo_port, paired.proc.pid)
            bench.echo_phase("codec-echo-closed", "codec", echo_port, paired.proc.pid, mode="closed", mix="consume")
            anyio.run(bench.switch_phases)
        finally:
            paired.stop()
        if args.full:
            tps = float(next(p["result"]["tps"] for p in bench.phases if p["name"] == "switch-closed"))
            bench.echo_phases("codec", [("codec-echo-closed-realistic", "closed", "realistic", 0.0)] + [
                (f"codec-echo-open-{int(f * 100)}", "open", "consume", max(1.0, f * tps))
                for f in FULL_SWEEP  # 80 % ran beside the switch's 80 % phase
            ])
    results: dict[str, Any] = {
        "started": stamp,
        "command": "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()})",
        "terminals": args.terminals,
        "seconds_per_phase": args.seconds,
        "wall_s": time.monotonic() - t_start,
        "phases": bench.phases,
        "soak": getattr(bench, "soak_result", None),
        "headline": headline(bench.phases),
    }
    books_ok = all(p["books"]["ok"] for p in bench.phases if "books" in p)
    results["books_ok"] = books_ok
    (args.results_dir / f"{stamp}.json").write_text(json.dumps(results, indent=1))
    summary = summary_markdown(results)
    (args.results_dir / f"{stamp}-summary.md").write_text(summary)
    (args.results_dir / "summary.md").write_text(summary)
    for path in plots(results, args.results_dir, stamp):
        log(f"bench: wrote {path}")
    log(f"bench: wrote {args.results_dir / (stamp + '.json')} and summary.md")
    print(final_line(results), flush=True)
    return 0 if books_ok else 1


if __name__ == "__main__":
    sys.exit(main())
