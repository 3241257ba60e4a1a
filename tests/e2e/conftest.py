"""End-to-end harness: the real ``switch demo`` command in a subprocess (switch + mock issuers
+ fixture) on free 127.0.0.1 ports, driven over TCP by the terminal client as a POS would."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from switch.demo_fixture import TERMINALS_BY_TID
from switch.pos.client import TerminalClient

STAN_BLOCKS = itertools.count(1, 1000)  # each client gets its own block of trace numbers
READY = re.compile(
    r"switch ready: terminal port (\d+), metrics port (\d+)(?:.*admin port (\d+))?(?:.*portal port (\d+))?"
)
ADMIN_TOKEN = "e2e-admin-token-0123456789"


@dataclass
class DemoSwitch:
    data_dir: Path
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    metrics_port: int = 0
    admin_port: int = 0
    portal_port: int = 0
    output: list[str] = field(default_factory=list)
    _pump: threading.Thread = field(default_factory=lambda: threading.Thread(target=lambda: None))
    # the port arguments; None: every port 0 (free ones), the admin API and the portal on
    port_args: list[str] | None = None
    extra_args: list[str] = field(default_factory=list)  # more `switch demo` options

    def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ)
        env.pop("SWITCH_MASTER_KEY", None)
        env["SWITCH_ADMIN_TOKEN"] = ADMIN_TOKEN
        ports = self.port_args if self.port_args is not None else [
            "--port", "0", "--metrics-port", "0", "--admin-port", "0", "--portal-port", "0"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "switch.cli", "demo", *ports,
             "--data-dir", str(self.data_dir), "--issuer-timeout", "2", *self.extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                m = READY.search(line)
                if m and not ready.is_set():
                    self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                    self.admin_port = int(m.group(3) or 0)
                    self.portal_port = int(m.group(4) or 0)
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(timeout) or not self.port:
            self.kill()
            raise RuntimeError("switch demo did not become ready:\n" + "".join(self.output[-40:]))

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._pump.join(5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._pump.join(5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def __enter__(self) -> DemoSwitch:
        """``with DemoSwitch(tmp_path) as sw:`` a fresh demo switch of its own, killed at the end."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def terminal(self, tid: str = "10000001", **kw: object) -> TerminalClient:
        """A terminal client whose trace numbers never repeat those of earlier clients: the switch
        treats a repeated TID + batch + STAN + MTI as a duplicate (§11), as a real terminal's
        ever-increasing trace number never does."""
        t = TERMINALS_BY_TID[tid]
        assert t.tmk_hex is not None
        client = TerminalClient("127.0.0.1", self.port, tid, t.mid, bytes.fromhex(t.tmk_hex), **kw)  # type: ignore[arg-type]
        client.next_stan = next(STAN_BLOCKS)
        return client

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def log_text(self) -> str:
        return "".join(self.output)

    def wait_log(self, pattern: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log_text()):
                return True
            time.sleep(0.05)
        return False


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoSwitch]:
    sw = DemoSwitch(tmp_path_factory.mktemp("demo"))
    sw.start()
    try:
        yield sw
    finally:
        sw.kill()
