"""The atheris harness (fuzz/atheris_frames.py) runs its property on the golden frames and on
hostile bytes without atheris installed, so it cannot rot between long fuzzing runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "fuzz" / "atheris_frames.py"
VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors.json"


def _harness():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("atheris_frames", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_property_holds_for_golden_and_hostile_input(tmp_path: Path) -> None:
    h = _harness()
    frames = [bytes.fromhex(v["frame_hex"]) for v in json.loads(VECTORS.read_text())["vectors"] if "frame_hex" in v]
    assert frames
    for data in [*frames, b"".join(frames), b"", b"\x00", b"\xff\xff" + bytes(40), frames[0][:20]]:
        h.check(data)
    h.seed_corpus(tmp_path)
    assert len(list(tmp_path.iterdir())) == len(frames)


def test_the_property_fails_on_a_broken_30() -> None:
    # the check is real: a 30 that does not carry 39 = 30 is reported
    h = _harness()
    body = bytes.fromhex(  # a sign-on whose F60 has a bad pad nibble: decodes far enough for a 30
        "0800" "0020000000C00010" "000001" "3130303030303031" "383938333130303438393930303031"
        "0011" "000000010045"
    )
    bad = (11 + len(body)).to_bytes(2, "big") + bytes.fromhex("6000030000603100000000") + body
    h.check(bad)  # the real 30 passes
    h.format_error_response = lambda codec, parsed: bytes(13) + codec.encode("0810", {39: "00"})
    with pytest.raises(AssertionError):
        h.check(bad)
