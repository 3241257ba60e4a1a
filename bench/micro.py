"""Micro benches of the pure core: µs per operation and the ratio to a terminal decode
measured in the same run (the machine is noisy; ratios travel better than absolute times).

    .venv/bin/python bench/micro.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

from switch.core.codec import Codec, load_dialect
from switch.core.framing import FrameReader
from switch.core.messages import read_request
from switch.crypto.mac import cup_mac
from switch.crypto.pin import translate_pin_block

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors.json"


def per_op(fn: Callable[[], object], seconds: float) -> float:
    """Seconds per call, best of 5 rounds of about ``seconds / 5`` each."""
    n = 1
    while True:  # calibrate
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 > 0.02 or n > 1_000_000:
            break
        n *= 2
    rounds = []
    per_round = max(1, int(n * (seconds / 5) / max(time.perf_counter() - t0, 1e-9)))
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(per_round):
            fn()
        rounds.append((time.perf_counter() - t0) / per_round)
    return min(rounds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    vectors = {v["name"]: v for v in json.loads(VECTORS.read_text())["vectors"]}
    codec = Codec(load_dialect("terminal"))
    frame_bytes = bytes.fromhex(vectors["consume_request_swipe_pin"]["frame_hex"])
    body = frame_bytes[13:]
    mti, fields = codec.decode(body)
    mak = bytes.fromhex(vectors["sign_on_response_004"]["clear_mak"])
    pik = bytes.fromhex(vectors["sign_on_response_004"]["clear_pik"])
    zpk = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    block = bytes(fields[52])  # type: ignore[arg-type]
    pan = "6222029375642931684"

    def frame_and_type() -> None:
        r = FrameReader()
        r.receive_data(frame_bytes)
        f = r.next_frame()
        assert f is not None
        read_request(codec, f)

    cases: dict[str, Callable[[], object]] = {
        "decode (baseline)": lambda: codec.decode(body),
        "encode": lambda: codec.encode(mti, fields),
        "frame + read_request": frame_and_type,
        "cup_mac": lambda: cup_mac(mak, body[:-8]),
        "translate_pin_block": lambda: translate_pin_block(pik, zpk, pan, block),
    }
    results = {name: per_op(fn, args.seconds) for name, fn in cases.items()}
    base = results["decode (baseline)"]
    print(f"{'operation':24} {'µs/op':>8} {'× decode':>9}")
    for name, sec in results.items():
        print(f"{name:24} {sec * 1e6:8.1f} {sec / base:9.2f}")


if __name__ == "__main__":
    main()
