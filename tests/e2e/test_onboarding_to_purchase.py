"""The merchant lifecycle through the public surface: the back-office CLI onboards a merchant and a
terminal while the switch runs, the terminal activates over TCP (§9.1), signs on with the TMK it
received, downloads its parameters (§9.3) and makes a purchase; a wrong code is refused, five wrong
codes lock the address out (75), and disabling the terminal from the CLI takes effect at once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from switch.admin.onboarding import id_card_check_char
from switch.crypto.activation import generate_terminal_key, public_key_der, unwrap_tmk
from switch.crypto.des import check_value
from switch.pos.client import TerminalClient

from .conftest import DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ID17 = "11010519491231002"
ID_CARD = ID17 + id_card_check_char(ID17)
ACCOUNT = "6222020200112233445"
CARD = "6222029375642931684"


def cli(data_dir: Path, *args: str) -> str:
    env = dict(os.environ)
    env.pop("SWITCH_MASTER_KEY", None)
    out = subprocess.run(
        [sys.executable, "-m", "switch.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


async def activate(port: int, code: str, stan: str) -> tuple[str, dict, object]:
    key = generate_terminal_key()
    client = TerminalClient("127.0.0.1", port, " " * 8, " " * 15, bytes(16))
    fields = {11: stan, 41: " " * 8, 42: " " * 15, 60: "00000000351", 62: code.encode() + public_key_der(key)}
    async with client.connect():
        r = await client.send_fields("0800", fields, mac=False)
    return r.code, r.fields, (key, r.header_digit6)


async def test_cli_onboarding_activation_sign_on_purchase_and_disable(tmp_path: Path) -> None:
    sw = DemoSwitch(tmp_path)
    sw.start()
    try:
        out = cli(tmp_path, "merchant", "add", "--type", "micro", "--name", "测试小店", "--owner", "张三",
                  "--id-card", ID_CARD, "--account", ACCOUNT, "--bank", "ICBC")
        mid = re.search(r"\b(\d{15})\b", out)
        assert mid is not None, out
        out = cli(tmp_path, "terminal", "add", "--mid", mid.group(1), "--role", "main", "--serial", "SN-0001")
        tid = re.search(r"TID\s+(\d{8})", out)
        code = re.search(r"activation code\s+(\d{8})", out)
        assert tid is not None and code is not None, out
        shown = cli(tmp_path, "terminal", "show", tid.group(1))
        assert "张三" in shown and ID_CARD not in shown and ACCOUNT not in shown and ACCOUNT[-4:] in shown

        rc, fields, (key, digit6) = await activate(sw.port, code.group(1), "000001")
        assert rc == "00"
        assert fields[41] == tid.group(1) and fields[42] == mid.group(1) and fields[63] == "测试小店"
        blob = fields[62]
        assert isinstance(blob, bytes) and len(blob) == 260
        tmk = unwrap_tmk(key, blob)
        assert check_value(tmk) == blob[256:]
        assert digit6 == 3  # activated, no working keys yet (§2)

        term = TerminalClient("127.0.0.1", sw.port, tid.group(1), mid.group(1), tmk)
        term.next_stan = 10
        async with term.connect():
            signed = await term.sign_on("003")
            assert signed.code == "00" and signed.header_digit6 == 1  # never downloaded parameters (§2)
            params = await term.parameter_download()
            assert params.code == "00" and params.header_digit6 == 0 and term.parameters["01"] == "测试小店"
            assert term.parameters["07"] == str(300_000_00) and term.parameters["04"] == "MAIN"
            r = await term.consume(CARD, 888, pin="123456", expiry="3012")
            assert r.code == "00" and r.mac_ok and r.header_digit6 == 0

            # the back office changes the merchant's parameters: digit 6 = 1 until the next download
            cli(tmp_path, "merchant", "upgrade", mid.group(1), "--licence", "91110105MA01ABCD2X")
            deadline = time.monotonic() + 10
            digit6 = 0
            while time.monotonic() < deadline and digit6 != 1:  # bounded: the switch polls for changes
                digit6 = (await term.echo_test()).header_digit6
                await anyio.sleep(0.1)
            assert digit6 == 1
            params = await term.parameter_download()
            assert params.header_digit6 == 0 and term.parameters["07"] == str(5_000_000_00)

        # the code was single use
        assert (await activate(sw.port, code.group(1), "000002"))[0] == "97"

        # disabling from the back office reaches the running switch
        cli(tmp_path, "terminal", "disable", tid.group(1))
        deadline = time.monotonic() + 10
        code_now = ""
        while time.monotonic() < deadline:
            async with term.connect():
                code_now = (await term.echo_test()).code
            if code_now == "97":
                break
            await anyio.sleep(0.2)
        assert code_now == "97"
    finally:
        sw.kill()


async def test_five_wrong_codes_lock_the_address_out(tmp_path: Path) -> None:
    sw = DemoSwitch(tmp_path)
    sw.start()
    try:
        for i in range(5):
            assert (await activate(sw.port, f"{11111110 + i}", f"{i + 1:06d}"))[0] == "97"
        # the sixth attempt is refused even with the right code (20000002's, §14)
        assert (await activate(sw.port, "48213579", "000006"))[0] == "75"
        text = sw.metrics_text()
        assert re.search(r'switch_activation_failures_total\{reason="wrong_code"\} 5\.0', text)
        assert re.search(r'switch_activation_failures_total\{reason="lockout"\} 1\.0', text)
    finally:
        sw.kill()


async def test_secondary_activation_of_the_fixture(demo: DemoSwitch) -> None:
    """20000002 (secondary of 20000001) activates with its §14 code while its main is active."""
    rc, fields, (key, _) = await activate(demo.port, "48213579", "000007")
    assert rc == "00" and fields[41] == "20000002" and fields[42] == "898310058120002"
    assert fields[63] == "星河超市"


async def test_fresh_terminals_with_the_same_trace_number_activate_independently(tmp_path: Path) -> None:
    """Factory-fresh terminals all start at trace number 000001 and send F41 as spaces: wrong codes
    from one are answered 97 (not 94 as a duplicate of another's), and five of them lock out (§9.1)."""
    sw = DemoSwitch(tmp_path)
    sw.start()
    try:
        codes = [(await activate(sw.port, f"{22222220 + i}", "000001"))[0] for i in range(5)]
        assert codes == ["97"] * 5
        assert (await activate(sw.port, "48213579", "000001"))[0] == "75"
    finally:
        sw.kill()
