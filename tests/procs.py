"""Helpers for tests that run the switch's commands as separate processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def spawn(*args: str, stderr: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """``switch ARGS`` in its own process (no master key from the environment)."""
    env = {k: v for k, v in os.environ.items() if k != "SWITCH_MASTER_KEY"}
    return subprocess.Popen([sys.executable, "-m", "switch.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr)


def reap(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> bytes:
    """Stop a process (signal, then kill after 20 s) and return what it wrote to stderr, if piped."""
    if p.poll() is None:
        p.send_signal(sig)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)
    if p.stderr is None:
        return b""
    err = p.stderr.read()
    p.stderr.close()
    return err
