"""§14: `switch demo --port P --metrics-port Q --data-dir D` opens the terminal port even when the
merchant portal's default port (8080) or the admin API's (9200) is taken by something else: those
surfaces are the demo's extras, logged and left off, never a reason not to serve terminals."""

from __future__ import annotations

import socket
from contextlib import ExitStack
from pathlib import Path

import pytest

from .conftest import DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hold(stack: ExitStack, port: int) -> bool:
    """Listen on 127.0.0.1:port for the test's duration; False when something else already does
    (the port is taken either way, which is the condition under test)."""
    s = stack.enter_context(socket.socket())
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        return False
    s.listen(1)
    return True


async def test_the_section_14_command_serves_terminals_with_8080_and_9200_taken(tmp_path: Path) -> None:
    with ExitStack() as stack:
        hold(stack, 8080)
        hold(stack, 9200)
        sw = DemoSwitch(tmp_path, port_args=["--port", str(free_port()), "--metrics-port", str(free_port())])
        sw.start()
        try:
            term = sw.terminal("10000001")
            async with term.connect():
                assert (await term.sign_on("003")).code == "00"
                r = await term.consume("6222029375642931684", 100, pin="123456", entry="manual", expiry="3012")
                assert r.code == "00"
            assert sw.wait_log(r"merchant portal not started")
            assert sw.wait_log(r"admin API not started")
            assert "Traceback" not in sw.log_text()
        finally:
            assert sw.stop() == 0
