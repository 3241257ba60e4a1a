"""Logs are JSON lines, one `transaction` event per answered request with a masked card, and no
secret reaches them (issue: operations)."""

from __future__ import annotations

import json

import pytest

from .conftest import DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CARD = "6222029375642931684"


async def test_one_json_transaction_event_per_request_with_masked_card(demo: DemoSwitch) -> None:
    term = demo.terminal()
    async with term.connect():
        await term.sign_on("004")
        approved = await term.consume(CARD, 321, pin="123456", expiry="3012", encrypt_track=True)
        declined = await term.consume(CARD, 321, pin="000000", expiry="3012")
    assert term.keys is not None
    assert demo.wait_log(str(declined.fields[37]))
    lines = [line for line in demo.log_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        if line.startswith(("switch ready:", "merchant portal http")):
            continue  # the lines the demo prints for a person, on stdout (not log records)
        records.append(json.loads(line))  # every log line is a JSON object
    events = [r for r in records if r.get("event") == "transaction"]
    by_rrn = {e["rrn"]: e for e in events if e.get("rrn")}
    a, d = by_rrn[approved.fields[37]], by_rrn[declined.fields[37]]
    assert (a["rc"], a["txn"], a["amount_fen"], a["fee_fen"], a["issuer"]) == ("00", "consume", 321, 2, "ICBC")
    assert a["pan"] == "622202*********1684" and a["tid"] == "10000001"
    assert d["rc"] == "55" and "ts" in d and d["level"] == "INFO"
    assert sum(1 for e in events if e["rrn"] == approved.fields[37]) == 1
    text = demo.log_text()
    for secret in (CARD, "=3012", term.keys.pik.hex().upper(), term.keys.mak.hex().upper(),
                   term.keys.pik.hex(), term.keys.mak.hex()):
        assert secret not in text, secret[:4]
