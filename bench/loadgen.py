"""The load generator: N simulated POS terminals on persistent TCP connections, in its own process.

    python -m bench.loadgen --host H --port P --terminals N --mode closed|open [--rate R]
        --duration S --max-requests K --mix consume|realistic --out FILE.json
        [--terminals-file F] [--dummy-keys] [--stan-base B] [--stan-span W] [--drain S] [--seed X]

Owns: one ``asyncio.Protocol`` connection per simulated terminal (uvloop), the terminal's sign-on
(0800 / 003, fresh working keys, the batch from 60.2), its STAN range ``[B, B + W)`` (trace
numbers never repeat per TID + batch + MTI across the phases of one run, §11), the request mix,
the timing and the accounting:
- closed loop: every terminal sends its next request as soon as the previous one is answered
  (one in flight per terminal: the maximum throughput of N terminals);
- open loop: scenarios arrive at a fixed rate R on a fixed schedule (t0 + i/R), spread round-robin
  over the terminals (a terminal may have several requests in flight, §1); latency is measured
  from the scheduled time, not the send time, so a slow server or a lagging generator shows up as
  latency instead of fewer samples (no coordinated omission);
- mixes (per scenario): ``consume``; ``realistic`` = consume 80 %, balance inquiry 10 %, pre-auth
  then its completion 5 %, consume then its void or a refund of it (alternately) 5 %. The second
  step of a two-step scenario is sent as soon as the first is answered;
- accounting: per transaction type the requests sent, the response codes, the approvals and the
  approved amounts (fen), and per card the movement of its available balance those approvals
  imply; latency percentiles from an HDR histogram (µs); the generator's own CPU use (a generator
  near 100 % of a core is the bottleneck, and the JSON says so).

Bounded: stops sending at ``--duration`` or after ``--max-requests`` requests, whichever is first,
then waits at most ``--drain`` seconds for answers; unanswered requests are counted as ``lost``.

Must not: print or write a PIN, PIN block, track, key or full PAN (cards are named masked), import
the switch's server side (pipeline, adapters), or assert on performance.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from hdrh.histogram import HdrHistogram

from bench.wire import CARDS, BenchCard, FrameBuilder, ResponseScanner, dummy_keys, terminal_codec
from switch.core.codec import Codec, Fields
from switch.core.framing import ENVELOPE_LEN, LEN_BYTES
from switch.crypto.working_keys import parse_f62
from switch.demo_fixture import TERMINALS_BY_TID
from switch.pos.client import TerminalClient
from switch.pos.receipt import mask_pan

MIXES: dict[str, tuple[tuple[str, float], ...]] = {
    "consume": (("consume", 1.0),),
    "realistic": (("consume", 0.80), ("balance", 0.10), ("pre_auth_completion", 0.05), ("void_refund", 0.05)),
}
HIST_MAX_US = 120_000_000
SIGN_ON_TIMEOUT = 30.0


class ConnectionLost(Exception):
    pass


@dataclass(frozen=True)
class TerminalSpec:
    tid: str
    mid: str
    tmk: bytes


def load_terminals(path: Path | None, n: int) -> list[TerminalSpec]:
    """``n`` terminals from a JSON list of {tid, mid, tmk (hex)}; without a file, ``n``
    made-up TIDs with the fixture's M2 MID and 20000001's TMK (only for ``--dummy-keys``)."""
    if path is not None:
        rows = json.loads(path.read_text())
        if len(rows) < n:
            raise SystemExit(f"{path} lists {len(rows)} terminals, {n} asked for")
        return [TerminalSpec(r["tid"], r["mid"], bytes.fromhex(r["tmk"])) for r in rows[:n]]
    base = TERMINALS_BY_TID["20000001"]
    assert base.tmk_hex is not None
    return [TerminalSpec(f"{90000000 + i:08d}", base.mid, bytes.fromhex(base.tmk_hex)) for i in range(n)]


class TerminalConnection(asyncio.Protocol):
    """One terminal's connection: frames out, frames in, answers matched on F11."""

    def __init__(self, scanner: ResponseScanner, codec: Codec) -> None:
        self.scanner = scanner
        self.codec = codec
        self.transport: asyncio.Transport | None = None
        self.pending: dict[str, asyncio.Future[tuple[float, bytes, dict[int, str]]]] = {}
        self.unmatched = 0
        self.closed = False
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self._buf
        buf += data
        while len(buf) >= LEN_BYTES:
            end = LEN_BYTES + int.from_bytes(buf[:LEN_BYTES], "big")
            if len(buf) < end:
                break
            body = bytes(buf[LEN_BYTES + ENVELOPE_LEN : end])
            del buf[:end]
            try:
                _, fields = self.scanner.scan(body)
            except ValueError:
                try:
                    _, full = self.codec.decode(body)
                except Exception:
                    self.unmatched += 1
                    continue
                fields = {k: v for k, v in full.items() if isinstance(v, str)}
            fut = self.pending.pop(fields.get(11, ""), None)
            if fut is None or fut.done():
                self.unmatched += 1
                continue
            fut.set_result((now, body, fields))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLost())
        self.pending.clear()

    def send(self, stan: int, frame: bytes) -> asyncio.Future[tuple[float, bytes, dict[int, str]]]:
        if self.closed or self.transport is None:
            raise ConnectionLost()
        fut: asyncio.Future[tuple[float, bytes, dict[int, str]]] = asyncio.get_running_loop().create_future()
        self.pending[f"{stan:06d}"] = fut
        self.transport.write(frame)
        return fut


@dataclass
class TxnStats:
    sent: int = 0
    answered: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    approved: int = 0
    approved_fen: int = 0


TIMELINE_SLOT = 0.5  # seconds per slot of worst_ms_by_slot


class Run:
    """The shared state of one generator run: budget, clocks, histogram and accounting."""

    def __init__(self, max_requests: int, duration: float) -> None:
        self.max_requests = max_requests
        self.duration = duration
        self.t0 = 0.0
        self.end = 0.0
        self.sent = 0
        self.answered = 0
        self.failed = 0  # connection lost before the answer
        self.stan_exhausted = 0
        self.last_recv = 0.0
        self.hist = HdrHistogram(1, HIST_MAX_US, 3)
        self.txns: dict[str, TxnStats] = {}
        self.delta_fen: Counter[str] = Counter()  # masked PAN -> expected available-balance movement
        self.worst: dict[int, float] = {}  # TIMELINE_SLOT-second slot of the start -> worst latency (s)

    def may_send(self) -> bool:
        return self.sent < self.max_requests and time.perf_counter() < self.end

    def txn(self, name: str) -> TxnStats:
        s = self.txns.get(name)
        if s is None:
            s = self.txns[name] = TxnStats()
        return s


class SimTerminal:
    """One simulated terminal: its connection, frame builder and STAN range."""

    def __init__(self, spec: TerminalSpec, conn: TerminalConnection, card: BenchCard, stan_base: int,
                 stan_span: int) -> None:
        self.spec = spec
        self.conn = conn
        self.card = card
        self.next_stan = stan_base
        self.stan_end = stan_base + stan_span  # exclusive
        self.builder: FrameBuilder | None = None
        self.flip = False

    def take_stan(self) -> int | None:
        if self.next_stan >= self.stan_end:
            return None
        stan = self.next_stan
        self.next_stan += 1
        return stan


async def call(run: Run, term: SimTerminal, txn: str, stan: int, frame: bytes, t_sched: float | None,
               amount_fen: int | None) -> dict[int, str] | None:
    """Send one request and wait for its answer; record latency (from ``t_sched`` when given,
    else from the send) and the response code. None when the connection was lost."""
    stats = run.txn(txn)
    t_send = time.perf_counter()
    try:
        fut = term.conn.send(stan, frame)
    except ConnectionLost:
        run.failed += 1
        return None
    run.sent += 1
    stats.sent += 1
    try:
        t_recv, _, fields = await fut
    except ConnectionLost:
        run.failed += 1
        return None
    start = t_sched if t_sched is not None else t_send
    run.hist.record_value(min(HIST_MAX_US, max(1, int((t_recv - start) * 1e6))))
    slot = int((start - run.t0) / TIMELINE_SLOT)
    if t_recv - start > run.worst.get(slot, 0.0):
        run.worst[slot] = t_recv - start
    run.answered += 1
    run.last_recv = max(run.last_recv, t_recv)
    stats.answered += 1
    code = fields.get(39, "")
    stats.codes[code] += 1
    if code == "00":
        stats.approved += 1
        stats.approved_fen += amount_fen or 0
    return fields


async def scenario(run: Run, term: SimTerminal, kind: str, t_sched: float | None) -> bool:
    """One scenario of the mix; False when the terminal cannot go on (STANs used up, connection
    lost). Follow-ups (completion, void, refund) are sent even when the budget ran out meanwhile,
    so no pre-auth is left holding funds because the clock stopped."""
    b = term.builder
    assert b is not None
    pan = mask_pan(term.card.pan)
    stan = term.take_stan()
    if stan is None:
        run.stan_exhausted += 1
        return False
    if kind == "consume":
        amount = 1 + stan % 9
        r = await call(run, term, "consume", stan, b.consume(stan, amount), t_sched, amount)
        if r is not None and r.get(39) == "00":
            run.delta_fen[pan] -= amount
        return r is not None
    if kind == "balance":
        r = await call(run, term, "balance_inquiry", stan, b.balance(stan), t_sched, None)
        return r is not None
    if kind == "pre_auth_completion":
        hold = 10 + stan % 10
        r = await call(run, term, "pre_auth", stan, b.pre_auth(stan, hold), t_sched, hold)
        if r is None or r.get(39) != "00":
            return r is not None
        run.delta_fen[pan] -= hold
        stan2 = term.take_stan()
        if stan2 is None:
            run.stan_exhausted += 1
            return False
        captured = hold - stan % 3
        r2 = await call(run, term, "completion", stan2, b.completion(stan2, captured, stan, r), None, captured)
        if r2 is not None and r2.get(39) == "00":
            run.delta_fen[pan] += hold - captured  # the hold is released, the captured part debited
        return r2 is not None
    if kind == "void_refund":
        amount = 1 + stan % 9
        r = await call(run, term, "consume", stan, b.consume(stan, amount), t_sched, amount)
        if r is None or r.get(39) != "00":
            return r is not None
        run.delta_fen[pan] -= amount
        stan2 = term.take_stan()
        if stan2 is None:
            run.stan_exhausted += 1
            return False
        term.flip = not term.flip
        if term.flip:
            r2 = await call(run, term, "consume_void", stan2, b.void(stan2, amount, stan, r), None, amount)
        else:
            r2 = await call(run, term, "refund", stan2, b.refund(stan2, amount, r), None, amount)
        if r2 is not None and r2.get(39) == "00":
            run.delta_fen[pan] += amount
        return r2 is not None
    raise ValueError(f"unknown scenario {kind!r}")


def picker(mix: str, seed: int) -> Any:
    rng = random.Random(seed)
    table = MIXES[mix]

    def pick() -> str:
        x = rng.random()
        acc = 0.0
        for name, weight in table:
            acc += weight
            if x < acc:
                return name
        return table[-1][0]

    return pick


async def sign_on(term: SimTerminal, codec: Codec) -> None:
    """0800 / 003 on the terminal's connection: fresh working keys and the current batch."""
    spec = term.spec
    client = TerminalClient("127.0.0.1", 1, spec.tid, spec.mid, spec.tmk, codec=codec)
    stan = term.take_stan()
    assert stan is not None
    frame, _ = client.build_frame(
        "0800", {11: f"{stan:06d}", 41: spec.tid, 42: spec.mid, 60: "00000001003", 63: "01 "}, mac=False
    )
    _, body, _ = await asyncio.wait_for(term.conn.send(stan, frame), SIGN_ON_TIMEOUT)
    _, fields = codec.decode(body)
    f62, f60 = fields.get(62), fields.get(60)
    if fields.get(39) != "00" or not isinstance(f62, bytes) or not isinstance(f60, str):
        raise SystemExit(f"sign-on of {spec.tid} answered {fields.get(39)!r}")
    keys = parse_f62(spec.tmk, "003", f62)
    term.builder = FrameBuilder(codec, spec.tid, spec.mid, spec.tmk, keys, f60[2:8], term.card)


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    codec = terminal_codec()
    scanner = ResponseScanner()
    specs = load_terminals(args.terminals_file, args.terminals)
    terms: list[SimTerminal] = []
    for i, spec in enumerate(specs):
        _, conn = await loop.create_connection(lambda: TerminalConnection(scanner, codec), args.host, args.port)
        terms.append(SimTerminal(spec, conn, CARDS[i % len(CARDS)], args.stan_base, args.stan_span))
    if args.dummy_keys:
        for t in terms:
            t.builder = FrameBuilder(codec, t.spec.tid, t.spec.mid, t.spec.tmk, dummy_keys(t.spec.tmk), "000001",
                                     t.card)
    else:
        await asyncio.gather(*(sign_on(t, codec) for t in terms))
    for t in terms:
        assert t.builder is not None
        t.builder.verify()

    run = Run(args.max_requests, args.duration)
    pick = picker(args.mix, args.seed)
    cpu0 = time.process_time()
    run.t0 = time.perf_counter()
    run.end = run.t0 + args.duration
    max_lag = 0.0
    scheduled = 0
    tasks: set[asyncio.Task[bool]] = set()
    if args.mode == "closed":

        async def worker(term: SimTerminal) -> bool:
            for _ in range(args.max_requests):  # bounded; ends on the clock or the budget first
                if not run.may_send() or not await scenario(run, term, pick(), None):
                    break
            return True

        tasks = {loop.create_task(worker(t)) for t in terms}
    else:
        interval = 1.0 / args.rate
        for i in range(args.max_requests):
            t_sched = run.t0 + i * interval
            if t_sched >= run.end or run.sent >= run.max_requests:
                break
            now = time.perf_counter()
            if t_sched > now:
                await asyncio.sleep(t_sched - now)
            max_lag = max(max_lag, time.perf_counter() - t_sched)
            task = loop.create_task(scenario(run, terms[i % len(terms)], pick(), t_sched))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            scheduled += 1
    remaining = max(0.0, run.end - time.perf_counter()) + args.drain
    if tasks:
        _, still = await asyncio.wait(set(tasks), timeout=remaining)
    else:
        still = set()
    lost = sum(len(t.conn.pending) for t in terms)
    for task in still:
        task.cancel()
    cpu = time.process_time() - cpu0
    stop = max(run.last_recv, run.t0 + 1e-9)
    elapsed = stop - run.t0
    for t in terms:
        if t.conn.transport is not None:
            t.conn.transport.close()
    h = run.hist
    latency = {
        "count": h.get_total_count(),
        "mean": h.get_mean_value(),
        "p50": h.get_value_at_percentile(50),
        "p90": h.get_value_at_percentile(90),
        "p99": h.get_value_at_percentile(99),
        "p999": h.get_value_at_percentile(99.9),
        "max": h.get_max_value(),
    }
    wall = time.perf_counter() - run.t0
    return {
        "target": f"{args.host}:{args.port}",
        "mode": args.mode,
        "mix": args.mix,
        "terminals": len(terms),
        "offered_rate": args.rate if args.mode == "open" else None,
        "scheduled_scenarios": scheduled if args.mode == "open" else None,
        "duration_s": args.duration,
        "elapsed_s": elapsed,
        "sent": run.sent,
        "answered": run.answered,
        "lost": lost,
        "connection_failures": run.failed,
        "stan_exhausted": run.stan_exhausted,
        "unmatched": sum(t.conn.unmatched for t in terms),
        "tps": run.answered / elapsed if elapsed > 0 else 0.0,
        "latency_us": latency,
        "latency_from": "scheduled time" if args.mode == "open" else "send time",
        "max_schedule_lag_ms": max_lag * 1e3 if args.mode == "open" else None,
        # when the slow answers happened: the worst latency of the requests started in each slot
        "worst_ms_by_slot": {f"{slot * TIMELINE_SLOT:.1f}": round(worst * 1e3, 2)
                             for slot, worst in sorted(run.worst.items())},
        "generator_cpu": cpu / wall if wall > 0 else 0.0,
        "by_txn": {
            name: {"sent": s.sent, "answered": s.answered, "approved": s.approved, "approved_fen": s.approved_fen,
                   "codes": dict(sorted(s.codes.items()))}
            for name, s in sorted(run.txns.items())
        },
        "expected_delta_fen": dict(sorted(run.delta_fen.items())),
        "stan_range": [args.stan_base, args.stan_base + args.stan_span - 1],
        "keys": "dummy" if args.dummy_keys else "sign-on 003",
        "hdr": base64.b64encode(h.encode()).decode("ascii") if h.get_total_count() else "",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description="POS load generator (see module doc).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--terminals", type=int, default=64)
    p.add_argument("--terminals-file", type=Path)
    p.add_argument("--dummy-keys", action="store_true", help="no sign-on (the echo baselines issue no keys)")
    p.add_argument("--mode", choices=("closed", "open"), default="closed")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: scenarios per second")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--mix", choices=sorted(MIXES), default="consume")
    p.add_argument("--stan-base", type=int, default=1)
    p.add_argument("--stan-span", type=int, default=20_000)
    p.add_argument("--drain", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.mode == "open" and a.rate <= 0:
        p.error("--mode open needs --rate > 0")
    if a.terminals < 1 or a.duration <= 0 or a.max_requests < 1:
        p.error("--terminals, --duration and --max-requests must be positive")
    if not 1 <= a.stan_base or a.stan_base + a.stan_span - 1 > 999_999 or a.stan_span < 2:
        p.error("the STAN range must lie within 1..999999")
    if a.terminals_file is None and not a.dummy_keys:
        p.error("--terminals-file is needed unless --dummy-keys")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(generate(args))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        result = asyncio.run(generate(args))
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
