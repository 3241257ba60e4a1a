"""/readyz follows the store: when its files cannot be written (made immutable with chattr, which
binds root too), the switch reports not ready; once writable again, ready (§15)."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import DemoSwitch

pytestmark = [pytest.mark.e2e]


def status(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def wait_status(port: int, want: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    got = status(port)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.2)
        got = status(port)
    return got


def chattr(flag: str, *paths: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True).returncode == 0


def test_readyz_follows_a_read_only_store(tmp_path: Path) -> None:
    sw = DemoSwitch(tmp_path)
    sw.start()
    files = [p for p in tmp_path.iterdir() if p.name.startswith("switch.db")]
    try:
        assert wait_status(sw.metrics_port, 200) == 200
        if not chattr("+i", *files):
            pytest.skip("chattr +i is not available on this file system (cannot make the store read-only)")
        try:
            assert wait_status(sw.metrics_port, 503) == 503
            with urllib.request.urlopen(f"http://127.0.0.1:{sw.metrics_port}/healthz", timeout=5) as r:
                assert r.status == 200  # alive, just not ready
        finally:
            chattr("-i", *files)
        assert wait_status(sw.metrics_port, 200) == 200
    finally:
        chattr("-i", *files)
        sw.kill()
