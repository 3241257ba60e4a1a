"""The golden vectors' sign-on, sent byte for byte to a fresh `switch demo`: the 0810 carries the
vector response's TPDU, header (digit 6 = 0: the fixture's terminals hold their merchant's current
parameters, specs/decisions.md), MTI, bitmap and length, and its keys decrypt under the TMK with the
check values the response carries. (The vectors' consume and balance frames carry a MAC under the
vectors' own MAK, which a real sign-on never issues, so they cannot be replayed.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from switch.crypto.working_keys import parse_f62
from switch.pos.client import TerminalClient

from .conftest import DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

VECTORS = {v["name"]: v for v in json.loads(
    (Path(__file__).resolve().parents[3] / "shared" / "vectors.json").read_text())["vectors"]}


async def test_the_vector_sign_on_gets_the_vector_response_layout(tmp_path: Path) -> None:
    request = bytes.fromhex(VECTORS["sign_on_request_004"]["frame_hex"])
    expected = bytes.fromhex(VECTORS["sign_on_response_004"]["frame_hex"])
    tmk = bytes.fromhex(VECTORS["sign_on_response_004"]["tmk"])
    sw = DemoSwitch(tmp_path)
    sw.start()
    try:
        client = TerminalClient("127.0.0.1", sw.port, "10000001", "898310048990001", tmk)
        async with client.connect():
            r = await client.send_raw(request)
        assert r is not None and r.mti == "0810" and r.code == "00"
        assert r.raw[:2] == expected[:2]  # the same length: the same fields at the same sizes
        assert r.raw[2:13] == expected[2:13]  # TPDU and header, digit 6 included
        assert r.raw[13:23] == expected[13:23]  # MTI and bitmap
        f62 = r.fields[62]
        assert isinstance(f62, bytes)
        keys = parse_f62(tmk, "004", f62)  # raises unless every check value matches
        assert keys.tdk is not None and len(keys.pik) == 16
    finally:
        assert sw.stop() == 0
