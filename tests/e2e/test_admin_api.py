"""The admin API of a running switch (bearer token, JSON): journal search, terminal lookup and
disable (taking effect on the wire), store-and-forward view; wrong or missing tokens refused."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import anyio
import pytest

from .conftest import ADMIN_TOKEN, DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CARD = "6222029375642931684"


def call(demo: DemoSwitch, method: str, path: str, token: str | None = ADMIN_TOKEN) -> tuple[int, object]:
    req = urllib.request.Request(f"http://127.0.0.1:{demo.admin_port}{path}", method=method,
                                 data=b"" if method == "POST" else None)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        exc.close()
        return int(exc.code), body


async def test_admin_api_over_a_running_switch(demo: DemoSwitch) -> None:
    assert demo.admin_port
    assert call(demo, "GET", "/journal", token=None)[0] == 401
    assert call(demo, "GET", "/journal", token="wrong")[0] == 403
    term = demo.terminal("10000002")
    async with term.connect():
        await term.sign_on("003")
        r = await term.consume(CARD, 4321, pin="123456", expiry="3012")
    status, body = call(demo, "GET", f"/journal?rrn={r.fields[37]}")
    assert status == 200 and isinstance(body, dict) and body["count"] == 1
    rows = body["rows"]
    row = rows[0]
    assert row["response_code"] == "00" and row["amount_fen"] == 4321 and row["pan_masked"] == "622202*********1684"
    assert CARD not in json.dumps(rows) and "pan_token" not in row
    status, view = call(demo, "GET", "/terminals/10000002")
    assert status == 200 and isinstance(view, dict) and json.dumps(view).find("10000002") >= 0
    status, _ = call(demo, "GET", "/saf")
    assert status == 200
    # disabling through the API reaches the wire (97), enabling brings it back
    assert call(demo, "POST", "/terminals/10000002/disable")[0] == 200
    code = ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with term.connect():
            code = (await term.echo_test()).code
        if code == "97":
            break
        await anyio.sleep(0.2)
    assert code == "97"
    assert call(demo, "POST", "/terminals/10000002/enable")[0] == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with term.connect():
            code = (await term.echo_test()).code
        if code == "00":
            break
        await anyio.sleep(0.2)
    assert code == "00"
