"""Security review I: weaknesses found by an independent review, each shown through a public
surface (terminal TCP port, merchant portal HTTP, admin API HTTP, the store file), plus a few
guards the existing tests do not have.

Findings (``xfail(strict=True)``: they pass while the weakness exists and fail once it is fixed):

- the merchant portal (uvicorn, inside the switch process) has no header-read timeout and no
  connection cap: idle half-requests from an unauthenticated client are held forever and exhaust
  the process's file descriptors, and the terminal port stops answering;
- a terminal-port peer that never reads its answers keeps its connection (and slot) forever:
  answers blocked in the transport's write buffer stop the idle timeout;
- a merchant can point its webhook at loopback / internal services (SSRF): the switch POSTs there
  and the portal shows the internal service's status (a port-scan oracle);
- the admin API's journal search (and ``switch journal``) shows an activation's ``dup_key``, an
  unkeyed truncated SHA-256 of the activation code: a code still valid (its activation failed for
  another reason than the code) is recovered offline in about a minute (10**8 candidates);
- ``terminals.activation_code_hash`` at rest is the unkeyed SHA-256 of the 8-digit code;
- the portal lockout tells a merchant that has a portal account from a MID that has none.

Guards: an activation's answer cannot be obtained for another RSA key by reusing its code and
trace number (94, no F62); no admin token, portal password, webhook secret, activation code,
master key, TMK or clear card reaches the JSON log, /metrics, or the store file in clear.

Every wait is bounded; only 127.0.0.1 is used; every process and server started here is stopped.
"""

from __future__ import annotations

import hashlib
import http.cookiejar
import http.server
import json
import os
import re
import resource
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

from switch.app import AppConfig, load_master_key, run_switch
from switch.crypto.activation import generate_terminal_key, public_key_der, unwrap_tmk
from switch.demo_fixture import TERMINALS_BY_TID
from switch.pos.client import TerminalClient
from switch.portal.demo import DEMO_PASSWORDS

from .conftest import ADMIN_TOKEN, READY, DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

M1, M2 = "898310048990001", "898310058120002"
CARD = "6222029375642931684"
CODE_20000002 = "48213579"  # protocol §14: 20000002's activation code
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')

# secrets seen during the module, scanned for by the last test
SEEN: dict[str, str] = {}


# ---- helpers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sw(demo: DemoSwitch) -> DemoSwitch:
    """The module's demo switch (conftest's ``demo``: admin API and portal on)."""
    return demo


class PortalSession:
    """A browser-like portal client (cookies, redirects) over urllib."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def request(self, method: str, path: str, data: dict[str, str] | None = None) -> tuple[int, str]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body, method=method)
        try:
            with self.opener.open(req, timeout=10) as r:
                return int(r.status), r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            try:
                return int(exc.code), exc.read().decode("utf-8", "replace")
            finally:
                exc.close()

    def csrf(self, path: str) -> str:
        status, text = self.request("GET", path)
        m = CSRF_RE.search(text)
        assert m is not None, (status, text[:300])
        return m.group(1)

    def login(self, mid: str, password: str) -> tuple[int, str]:
        return self.request("POST", "/login", {"mid": mid, "password": password, "csrf": self.csrf("/login")})


def admin_get(sw: DemoSwitch, path: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{sw.admin_port}{path}",
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


async def activation(port: int, payload: bytes, stan: str) -> tuple[str, dict[Any, Any]]:
    client = TerminalClient("127.0.0.1", port, " " * 8, " " * 15, bytes(16), timeout=15.0)
    fields = {11: stan, 41: " " * 8, 42: " " * 15, 60: "00000000351", 62: payload}
    async with client.connect():
        r = await client.send_fields("0800", fields, mac=False)
    return r.code, dict(r.fields)


async def echo_code(port: int, stan: int, timeout: float = 4.0) -> str:
    """The F39 of a one-shot echo test from 10000001, or the error that stopped it."""
    t = TERMINALS_BY_TID["10000001"]
    assert t.tmk_hex is not None
    client = TerminalClient("127.0.0.1", port, "10000001", t.mid, bytes.fromhex(t.tmk_hex), timeout=timeout)
    client.next_stan = stan
    try:
        with anyio.fail_after(timeout + 1):
            return (await client.echo_test(oneshot=True, timeout=timeout)).code
    except Exception as exc:  # the point of the test: the switch did not answer
        return type(exc).__name__


# ---- findings ------------------------------------------------------------------------------------
def _start_demo_with_fd_limit(data_dir: Path, nofile: int) -> tuple[subprocess.Popen[str], dict[str, int], list[str]]:
    env = dict(os.environ)
    env.pop("SWITCH_MASTER_KEY", None)
    env.pop("SWITCH_ADMIN_TOKEN", None)

    def limit() -> None:  # runs in the child before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen(
        [sys.executable, "-m", "switch.cli", "demo", "--port", "0", "--metrics-port", "0",
         "--admin-port", "0", "--portal-port", "0", "--data-dir", str(data_dir), "--issuer-timeout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=limit,
    )
    ports: dict[str, int] = {}
    output: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            m = READY.search(line)
            if m and not ready.is_set():
                ports.update(terminal=int(m.group(1)), portal=int(m.group(4) or 0))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(30)
    return proc, ports, output


async def test_idle_portal_connections_do_not_take_the_terminal_port_down(tmp_path: Path) -> None:
    """Found: the portal (uvicorn) had no request timeout and no connection cap, so idle
    half-requests exhausted the switch process's file descriptors and the terminal port stopped
    answering. Now portal connections are capped (a quarter of the descriptors at most) and one
    that sends no whole request within 10 s is closed."""
    nofile = 256  # a small limit stands for the real one (20000 here): same effect, fewer sockets
    proc, ports, output = _start_demo_with_fd_limit(tmp_path, nofile)
    held: list[socket.socket] = []
    try:
        assert ports.get("portal") and ports.get("terminal"), "".join(output[-20:])
        assert await echo_code(ports["terminal"], 100) == "00"  # healthy before
        for _ in range(nofile):  # unauthenticated: a TCP connect and half a request line
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", ports["portal"]))
                s.sendall(b"GET / HT")
            except OSError:
                s.close()
                break
            held.append(s)
        # a header-read timeout of up to ~10 s, or a connection cap, would give the descriptors back;
        # the terminal port must keep answering
        codes = []
        deadline = time.monotonic() + 16
        while time.monotonic() < deadline:
            codes.append(await echo_code(ports["terminal"], 200 + len(codes)))
            if codes[-1] == "00":
                break
            await anyio.sleep(0.5)
        assert codes[-1] == "00", f"terminal port while {len(held)} idle portal connections are held: {codes}"
    finally:
        for s in held:
            s.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _metric_sum(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


async def test_terminal_peer_that_never_reads_is_aborted(tmp_path: Path) -> None:
    """An unauthenticated peer: unknown TID, no keys. It pipelines requests on one connection and
    never reads; once the switch's send buffers are full its 32 handlers wait on the write side.
    Found: they waited for ever, and the connection outlived idle_timeout (1 s here) indefinitely.
    Now the connection is aborted after read_timeout (1 s here) without a read, counted as
    write_timeout."""
    cfg = AppConfig(data_dir=tmp_path, port=0, metrics_port=0, admin_port=None, portal_port=None,
                    idle_timeout=1.0, read_timeout=1.0)
    master = load_master_key(tmp_path, create=True)
    builder = TerminalClient("127.0.0.1", 1, "99999999", "999999999999999", bytes(16))
    frames = b"".join(
        builder.build_frame("0200", {2: CARD, 3: "000000", 4: "000000000100", 11: f"{n + 1:06d}", 22: "012",
                                     25: "00", 41: "99999999", 42: "999999999999999", 49: "156",
                                     60: "22000001000600000"}, mac=True)[0]
        for n in range(40_000)
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # a peer that reads nothing

    def flood(port: int) -> None:
        sock.settimeout(20)
        sock.connect(("127.0.0.1", port))
        try:
            sock.sendall(frames)
        except OSError:  # the switch stopped reading: that is what we wanted
            pass

    try:
        with anyio.fail_after(55):
            async with anyio.create_task_group() as tg:
                running = await tg.start(lambda task_status: run_switch(
                    cfg, master, handle_signals=False, task_status=task_status))
                try:
                    await anyio.to_thread.run_sync(flood, running.port)
                    # wait until the switch stops answering (its write buffers are full)
                    last, still_since = -1.0, time.monotonic()
                    while time.monotonic() - still_since < 2.0:
                        await anyio.sleep(0.25)
                        total = _metric_sum(running.metrics.exposition().decode(), "switch_requests_total{")
                        if total != last:
                            last, still_since = total, time.monotonic()
                    if last >= 40_000:
                        pytest.skip("every request was answered: the send buffers never filled")
                    await anyio.sleep(3.0)  # three idle timeouts without a byte from the peer
                    text = running.metrics.exposition().decode()
                    open_now = _metric_sum(text, "switch_connections_open")
                    assert open_now == 0, (f"{last:.0f} answers written, then nothing read for 5 s: the connection "
                                           f"is still open (idle_timeout 1 s)")
                    closed = _metric_sum(text, 'switch_connections_closed_total{reason="write_timeout"}')
                    assert closed == 1
                finally:
                    running.shutdown()
    finally:
        sock.close()


class _InternalService(http.server.BaseHTTPRequestHandler):
    hits: list[tuple[str, str, dict[str, str]]] = []

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(min(length, 65536))
        self.hits.append(("POST", self.path, dict(self.headers)))
        body = b"internal only\n"
        self.send_response(418)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def test_merchant_webhook_does_not_reach_loopback_services(sw: DemoSwitch) -> None:
    """Found: a merchant could bind its webhook to loopback/internal hosts; the switch POSTed there
    (SSRF) and the portal showed the internal answer's status. Now such an attempt fails as
    'address not allowed' before a packet is sent (unless [webhooks] allow_private)."""
    _InternalService.hits = []
    internal = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _InternalService)
    server_thread = threading.Thread(target=internal.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    server_thread.start()
    try:
        assert sw.portal_port
        portal = PortalSession(sw.portal_port)
        status, _ = portal.login(M1, DEMO_PASSWORDS[M1])
        assert status == 200  # 303 to / followed
        target = f"http://127.0.0.1:{internal.server_address[1]}/internal/admin"
        status, page = portal.request("POST", "/notifications/webhook",
                                      {"url": target, "csrf": portal.csrf("/notifications")})
        secret = re.search(r'id="webhook-secret"[^>]*>([0-9a-f]{64})<', page)
        if secret:
            SEEN["webhook secret"] = secret.group(1)
        assert status == 200  # bound: names are judged at delivery, on what they resolve to then
        portal.request("POST", "/notifications/test", {"csrf": portal.csrf("/notifications")})
        page = ""
        deadline = time.monotonic() + 20  # the outbox worker polls every 5 s
        while time.monotonic() < deadline and not _InternalService.hits and "address not allowed" not in page:
            page = portal.request("GET", "/notifications")[1]
            time.sleep(0.2)
        assert "address not allowed" in page  # the attempt was made, and refused: all the merchant learns
        assert not _InternalService.hits and "http 418" not in page, (
            f"the switch POSTed to {_InternalService.hits[0][1] if _InternalService.hits else '?'} on loopback "
            f"and the portal shows {'http 418' if 'http 418' in page else 'nothing'}")
    finally:
        internal.shutdown()
        internal.server_close()
        server_thread.join(5)


def test_activation_code_at_rest_is_keyed(sw: DemoSwitch) -> None:
    """Found: terminals.activation_code_hash was the unkeyed SHA-256 of the 8-digit code, so anyone
    reading the store recovered a live code by trying 10**8 candidates. Now a keyed HMAC."""
    db = sqlite3.connect(f"file:{sw.data_dir / 'switch.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT activation_code_hash FROM terminals WHERE tid = '20000002'").fetchone()
    finally:
        db.close()
    assert row is not None and row[0]
    assert row[0] != hashlib.sha256(CODE_20000002.encode()).hexdigest(), (
        "the stored value is sha256(code): an offline dictionary of 10**8 codes inverts it")


async def test_admin_journal_does_not_reveal_a_still_valid_activation_code(sw: DemoSwitch) -> None:
    """Found: the admin API's /journal (and `switch journal`) showed an activation's dup_key, an
    unkeyed SHA-256 prefix of the code, also for a code that stays valid (its activation failed
    for another reason): recovered offline in about a minute. Now the key names a keyed HMAC."""
    # a terminal's activation with its real code fails for another reason (a key that is not RSA 2048)
    code, _ = await activation(sw.port, CODE_20000002.encode() + b"\x30\x03\x02\x01\x01", "000101")
    assert code == "30"
    rows = admin_get(sw, "/journal?rc=30&limit=1000")["rows"]
    dup_keys = [str(r["dup_key"]) for r in rows if r["txn"] == "activation"]
    assert dup_keys
    # the code stays valid (decisions.md): whoever recovers it activates a terminal of M2 with it
    key = generate_terminal_key()
    code, fields = await activation(sw.port, CODE_20000002.encode() + public_key_der(key), "000102")
    assert code == "00" and fields[41] == "20000002"
    SEEN["tmk 20000002"] = unwrap_tmk(key, fields[62]).hex()
    # guard: the same code and trace number with another RSA key is a 94, never a second answer
    other = generate_terminal_key()
    code2, fields2 = await activation(sw.port, CODE_20000002.encode() + public_key_der(other), "000102")
    assert code2 == "94" and 62 not in fields2
    # finding: what the admin API returned determines the code (10**8 candidates, ~80 s in Python)
    leaked = hashlib.sha256(CODE_20000002.encode()).hexdigest()[:16]
    assert not any(leaked in k for k in dup_keys), f"admin API journal row dup_key {dup_keys[0]!r}"


def test_portal_lockout_does_not_tell_existing_accounts_apart(sw: DemoSwitch) -> None:
    """Found: the lockout was per existing account, so after 5 failures a MID with an account
    answered 429 'locked' while an unknown MID kept answering 401. Now both lock alike."""
    assert sw.portal_port
    answers: dict[str, list[int]] = {}
    for mid in (M2, "898310099990009"):
        portal = PortalSession(sw.portal_port)
        answers[mid] = [portal.login(mid, f"wrong-password-{i}")[0] for i in range(6)]
    assert answers[M2] == answers["898310099990009"], answers


# ---- guards --------------------------------------------------------------------------------------
async def test_no_secret_in_logs_metrics_or_store_file(sw: DemoSwitch) -> None:
    """After the flows above (portal logins, webhook binding, activations) and a purchase: none of
    the admin token, portal passwords, webhook secret, activation code, master key, TMKs or the
    clear card is in a JSON log record, /metrics or the SQLite files."""
    term = sw.terminal()
    async with term.connect():
        assert (await term.sign_on("004")).code == "00"
        r = await term.consume(CARD, 1234, pin="123456", expiry="3012", encrypt_track=True)
        assert r.code == "00"
    assert sw.wait_log(str(r.fields[37]))
    master_hex = (sw.data_dir / "master.key").read_text().strip().lower()
    secrets_: dict[str, str] = {
        "admin token": ADMIN_TOKEN, "M1 password": DEMO_PASSWORDS[M1], "M2 password": DEMO_PASSWORDS[M2],
        "activation code": CODE_20000002, "master key": master_hex, "card": CARD,
        **{f"tmk {tid}": t.tmk_hex for tid, t in TERMINALS_BY_TID.items() if t.tmk_hex},
        **SEEN,
    }
    records = []
    for line in sw.log_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))  # every log record (the person-facing lines are not JSON)
    log_text = json.dumps(records, ensure_ascii=False).lower()
    metrics = sw.metrics_text().lower()
    raw = b"".join(p.read_bytes() for p in sw.data_dir.glob("switch.db*"))
    store_text = raw.lower()
    found = []
    for name, value in secrets_.items():
        form = value.lower()
        if form in log_text:
            found.append(f"{name} in the log")
        if form in metrics:
            found.append(f"{name} in /metrics")
        if form.encode() in store_text:
            found.append(f"{name} in the store file")
        if len(form) >= 32 and re.fullmatch("[0-9a-f]+", form) and bytes.fromhex(form) in raw:
            found.append(f"{name} (raw bytes) in the store file")
    assert len(secrets_) >= 10 and not found, found
