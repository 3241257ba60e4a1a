"""Helpers for tests that run the switch's commands as separate processes on 127.0.0.1."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

_handed_out: set[int] = set()  # free_port never hands a port out twice in one test session
_handed_lock = threading.Lock()
_pick = random.SystemRandom()  # not the seeded `random`: two sessions must not pick alike


def _ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (what bind(0) and connect() use)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:  # no SO_REUSEADDR: a port in any use (even TIME_WAIT) is refused
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A 127.0.0.1 port nothing is bound to now, for a process the test starts to bind soon.

    Only a pick: something else may bind the port before that process does. To make that
    unlikely the port is taken below the kernel's ephemeral range when there is room (every
    ``bind(port 0)`` and every outgoing connection on the host, ours or another session's, takes
    its port from that range, so none of them can take this one), and never handed out twice in
    one session. Where the process can bind port 0 itself and report the port, prefer that
    (``Watched`` and ``wait_for``): then no collision is possible at all."""
    low, high = 10_000, _ephemeral_low() - 1
    with _handed_lock:
        if high - low >= 1_000:
            for _ in range(200):
                port = _pick.randint(low, high)
                if port not in _handed_out and _bindable(port):
                    _handed_out.add(port)
                    return port
        for _ in range(200):  # no room below the ephemeral range: a kernel-chosen port
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no free 127.0.0.1 port found")


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


class StartError(Exception):
    """A process did not report that it was ready: it exited first, or the deadline passed."""


class Watched:
    """``switch ARGS`` in its own process, with a thread reading its stderr as it comes: the pipe
    never fills (a process blocked writing a log line would look like a hang), ``wait_for`` sees
    the line saying on which port it listens, and ``output`` says what it did if it fails.

    No ``SWITCH_*`` variable is passed on (they override the configuration file: a port, the log
    level that must stay INFO for the ready line, the master key)."""

    def __init__(self, name: str, *args: str) -> None:
        self.name = name
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCH_")}
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "switch.cli", *args], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        self._pump = threading.Thread(target=self._read, name=f"stderr of {name}", daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        try:
            for raw in self.proc.stderr:
                with self._cond:
                    self._lines.append(raw.decode(errors="replace"))
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def output(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def wait_for(self, pattern: re.Pattern[str], deadline: float) -> re.Match[str]:
        """The match of the first stderr line matching ``pattern``, waiting until ``deadline``
        (``time.monotonic()``) at most; ``StartError`` with the process's output as soon as it
        exits (or closes stderr) without one, or at the deadline."""
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    m = pattern.search(line)
                    if m:
                        return m
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
        try:
            code: int | None = self.proc.wait(5) if self._eof else self.proc.poll()
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - self.started_at
        state = f"exited with {code}" if code is not None else "still running"
        raise StartError(f"{self.name} (pid {self.proc.pid}) {state} after {took:.1f}s without a line "
                         f"matching {pattern.pattern!r}; its stderr:\n{self.output()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Stop the process (``sig``, then SIGKILL after 20 s); everything it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._pump.join(10)
        if self.proc.stderr is not None and not self._pump.is_alive():  # else the thread holds it
            self.proc.stderr.close()
        return self.output()
