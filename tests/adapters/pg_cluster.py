"""A throwaway PostgreSQL cluster for the store tests (issue 7).

Owns: ``initdb`` into a temporary directory owned by the ``postgres`` user (trust auth, no
password), ``pg_ctl start`` on a free 127.0.0.1 port with the unix socket inside that directory,
a DSN for the session, a fresh database per test (``pg_database``), and ``pg_ctl stop`` plus the
directory's removal afterwards. Every wait is bounded (``pg_ctl -w -t``, subprocess timeouts).

Must not: touch any other cluster, port or data directory, or keep running after the session.
When the binaries (or the ``postgres`` user) are missing the tests that need the cluster are
skipped with the reason.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/bin")
START_TIMEOUT_S = 30
_DB_NAMES = itertools.count(1)


def _find(tool: str) -> str | None:
    for d in PG_BIN_DIRS:
        p = Path(d) / tool
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return shutil.which(tool)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        runuser = shutil.which("runuser")
        prefix = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
        if not runuser:
            return subprocess.run([*prefix, " ".join(args)], capture_output=True, text=True,
                                  timeout=timeout, check=False)
    return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[str]:
    """The admin DSN of a cluster started for this test session."""
    initdb, pg_ctl = _find("initdb"), _find("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: PostgreSQL store tests skipped")
    try:
        pg_user = pwd.getpwnam("postgres")
    except KeyError:
        if os.geteuid() == 0:
            pytest.skip("no 'postgres' user to run the throwaway cluster as (we are root)")
        pg_user = None
    base = Path(tempfile.mkdtemp(prefix="switch-pg-"))
    data = base / "data"
    if pg_user is not None and os.geteuid() == 0:
        os.chown(base, pg_user.pw_uid, pg_user.pw_gid)
    os.chmod(base, 0o700)
    started = False
    try:
        r = _as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                          "--no-sync"], timeout=120)
        if r.returncode != 0:
            pytest.fail(f"initdb failed: {r.stderr[-2000:]}")
        port = _free_port()
        opts = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base}"
                " -c fsync=off -c max_connections=100")
        r = _as_postgres([pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w",
                          "-t", str(START_TIMEOUT_S), "start"], timeout=START_TIMEOUT_S + 10)
        started = True
        if r.returncode != 0:
            log = (base / "log").read_text(errors="replace") if (base / "log").exists() else ""
            pytest.fail(f"pg_ctl start failed: {r.stdout[-1000:]} {r.stderr[-1000:]} {log[-2000:]}")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            _as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"], timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_database(pg_cluster: str) -> Iterator[str]:
    """A fresh, empty database in the session's cluster; its DSN. Dropped after the test."""
    import psycopg

    name = f"t{os.getpid()}_{next(_DB_NAMES)}"
    with psycopg.connect(pg_cluster, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_cluster.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(pg_cluster, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
