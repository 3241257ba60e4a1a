"""Merchant notifications end to end: the back office binds a webhook, the terminal's purchases
(approved and declined) reach a local HTTP receiver as signed JSON events, a receiver failure is
retried, and the terminal's answers never wait for the deliveries."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from switch.adapters.webhooks import verify

from .conftest import DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CARD = "6222029375642931684"
POOR = "6222028992986377539"
M1 = "898310048990001"


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.events: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self.calls = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls += 1
                if receiver.calls <= receiver.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.events.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def wait(self, n: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.events) >= n, f"{len(self.events)} of {n} events after {timeout}s"


def bind(data_dir: Path, url: str) -> bytes:
    env = {k: v for k, v in os.environ.items() if k != "SWITCH_MASTER_KEY"}
    out = subprocess.run([sys.executable, "-m", "switch.cli", "merchant", "webhook", M1, "--url", url,
                          "--data-dir", str(data_dir)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    m = re.search(r"signing secret \(shown once\) ([0-9a-f]{64})", out.stdout)
    assert m is not None, out.stdout
    return bytes.fromhex(m.group(1))


async def test_signed_events_for_approvals_and_declines_with_a_retry(tmp_path: Path) -> None:
    receiver = Receiver(fail_first=1)
    sw = DemoSwitch(tmp_path, extra_args=["--webhook-allow-private"])  # the receiver is on loopback
    sw.start()
    try:
        secret = bind(tmp_path, f"http://127.0.0.1:{receiver.port}/hook")
        time.sleep(1.0)  # the running switch picks up the binding (change_seq poll)
        term = sw.terminal()
        async with term.connect():
            await term.sign_on("003")
            ok = await term.consume(CARD, 12345, pin="123456", expiry="3012")
            declined = await term.consume(POOR, 20000, pin="123456", expiry="3012")
        assert (ok.code, declined.code) == ("00", "51")
        receiver.wait(2)
        assert receiver.calls >= 3  # the first delivery got a 500 and was retried
        events = []
        for headers, body in receiver.events:
            assert verify(secret, headers["x-switch-timestamp"], body, headers["x-switch-signature"], now=time.time())
            assert not verify(b"x" * 32, headers["x-switch-timestamp"], body, headers["x-switch-signature"],
                              now=time.time())
            assert CARD.encode() not in body and POOR.encode() not in body
            events.append(json.loads(body))
        by_rrn = {e["rrn"]: e for e in events}
        a, d = by_rrn[ok.fields[37]], by_rrn[declined.fields[37]]
        assert a["approved"] is True and a["amount_fen"] == 12345 and a["fee_fen"] == 74 and a["txn"] == "consume"
        assert a["card"] == "622202*********1684" and a["mid"] == M1 and a["tid"] == "10000001"
        assert d["approved"] is False and d["response_code"] == "51"
    finally:
        sw.kill()
        receiver.close()
