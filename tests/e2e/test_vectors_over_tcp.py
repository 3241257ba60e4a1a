"""The golden vectors' sign-on, sent byte for byte to a fresh `switch demo`: the 0810 carries the
vector response's TPDU, header (but digit 6), MTI, bitmap and length, and its keys decrypt under
the TMK with the check values the response carries. Digit 6 is §2's `1`: the fixture's terminal has
never downloaded its parameters; the vectors' responses copy the request's header (they are
composed, not recorded: F12 holds the STAN as its seconds, and a 51 answers the card holding
1,000,000.00), see specs/decisions.md. (The vectors' consume and balance frames carry a MAC under
the vectors' own MAK, which a real sign-on never issues, so they cannot be replayed.)"""

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
        assert r.raw[2:9] == expected[2:9] and r.raw[10:13] == expected[10:13]  # TPDU, header but byte 3
        assert r.raw[9] >> 4 == expected[9] >> 4 and r.header_digit6 == 1  # never downloaded (§2)
        assert r.raw[13:23] == expected[13:23]  # MTI and bitmap
        f62 = r.fields[62]
        assert isinstance(f62, bytes)
        keys = parse_f62(tmk, "004", f62)  # raises unless every check value matches
        assert keys.tdk is not None and len(keys.pik) == 16
    finally:
        assert sw.stop() == 0
