"""Instructions per request of ``switch serve``, counted by callgrind: a figure the shared
machine's load cannot move (TPS moved by +-25 % between runs minutes apart; CPU seconds per
request by +-15 %), so an optimisation's effect can be read off one run.

``switch serve`` runs under ``valgrind --tool=callgrind`` (with the mock issuers ICBC and CMB as
ordinary processes, as in ``bench.run``) twice: once for ``--base`` consumes, once for
``--base + --requests``, each from the §14 terminal 20000001 (pre-keyed from the fixture, so no
activation) with the bench generator, closed loop, one request in flight. The difference of the
two totals divided by ``--requests`` is the switch's own work per consume: start-up, sign-on and
shutdown cancel out. One in flight means no group commit or write batching: this is the cost of
one request on its own, a different figure from a loaded run's CPU per request, and the right
one for comparing code paths.

    python -m bench.instructions [--base 50] [--requests 300] [--mix consume|realistic]

needs valgrind (Debian's package); prints ``instructions: per_request=<n> base=<I1> total=<I2>``.
Must not: be run by ``make test`` (minutes under valgrind), or assert anything about speed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import MAIN_TID, SwitchWithIssuers
from switch.demo_fixture import TERMINALS_BY_TID

COLLECTED = re.compile(r"Collected : (\d+)")


def run_once(work: Path, requests: int, stan_base: int, mix: str = "consume") -> int:
    """Total instructions of one ``switch serve`` life that answered ``requests`` consumes."""
    data = work / f"data-{requests}"
    server = SwitchWithIssuers(data, wrapper=("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"))
    port = server.start(timeout=600.0)[0]
    t = TERMINALS_BY_TID[MAIN_TID]
    terminals = work / "terminals.json"
    terminals.write_text(json.dumps([{"tid": t.tid, "mid": t.mid, "tmk": t.tmk_hex}]))
    out = work / f"loadgen-{requests}.json"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--terminals", "1",
             "--terminals-file", str(terminals), "--mode", "closed", "--mix", mix,
             "--duration", "900", "--max-requests", str(requests), "--stan-base", str(stan_base),
             "--drain", "60", "--out", str(out)],
            capture_output=True, text=True, timeout=1200,
        )
        if done.returncode != 0:
            raise RuntimeError(f"loadgen failed:\n{done.stderr[-2000:]}")
        answered = int(json.loads(out.read_text())["answered"])
        if answered != requests:
            raise RuntimeError(f"{answered} of {requests} answered")
    finally:
        server.stop(timeout=300.0)
    totals = [int(m.group(1)) for line in server.output if (m := COLLECTED.search(line))]
    if not totals:
        raise RuntimeError("no callgrind total in the switch's output:\n" + "".join(server.output[-20:]))
    return totals[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n")[0])
    p.add_argument("--base", type=int, default=50, help="consumes of the first run (start-up cancels out)")
    p.add_argument("--requests", type=int, default=300, help="extra consumes of the second run")
    p.add_argument("--mix", default="consume", help="the generator's mix (consume, realistic)")
    a = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("bench.instructions: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="switch-instructions-") as tmp:
        work = Path(tmp)
        base = run_once(work, a.base, 1, a.mix)
        total = run_once(work, a.base + a.requests, 1, a.mix)
    per = (total - base) / a.requests
    print(f"instructions: per_request={per:.0f} base={base} total={total}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
