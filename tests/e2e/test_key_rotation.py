"""Master-key rotation without downtime: `switch keys rotate-master` re-encrypts the stored keys
while the switch serves; terminals keep transacting, and a restart works with the new key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CARD = "6222029375642931684"


def rotate(data: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SWITCH_MASTER_KEY"}
    out = subprocess.run([sys.executable, "-m", "switch.cli", "keys", "rotate-master", "--data-dir", str(data)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_rotation_while_serving_then_restart(tmp_path: Path) -> None:
    sw = DemoSwitch(tmp_path)
    sw.start()
    try:
        term = sw.terminal()
        async with term.connect():
            await term.sign_on("003")
            assert (await term.consume(CARD, 100, pin="123456", expiry="3012")).code == "00"
            old_key = (tmp_path / "master.key").read_text()
            rotate(tmp_path)
            assert (tmp_path / "master.key").read_text() != old_key
            assert any(p.name.startswith("master.key.old.") for p in tmp_path.iterdir())
            # the running switch keeps working on rows the rotation re-encrypted
            assert (await term.consume(CARD, 101, pin="123456", expiry="3012")).code == "00"
            await term.sign_on("003")
            assert (await term.consume(CARD, 102, pin="123456", expiry="3012")).code == "00"
        assert sw.stop() == 0
        again = DemoSwitch(tmp_path)
        again.start()
        try:
            term.port = again.port
            async with term.connect():  # keys written before and after the rotation both unwrap
                assert (await term.consume(CARD, 103, pin="123456", expiry="3012")).code == "00"
        finally:
            again.kill()
    finally:
        sw.kill()
