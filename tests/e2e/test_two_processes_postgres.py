"""Two switch processes on one PostgreSQL: two terminals of the same merchant, each served by its
own process, race for the last monthly-limit headroom (§13). The database arbitrates: exactly one
purchase is approved, the other gets 61, and the usage the database keeps is the approved amount.
(Other per-process state is listed in specs/decisions.md "Storage".)"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import psycopg
import pytest

from switch.adapters.pg_store import open_store_for
from switch.adapters.sqlite_store import SqliteStore
from switch.app import load_master_key, seed_demo
from switch.demo_fixture import TERMINALS_BY_TID
from switch.pos.client import TerminalClient

from procs import StartError, Watched
from tests.adapters.pg_cluster import pg_cluster, pg_database  # noqa: F401  (fixtures)

# three processes start per test: room for a loaded machine beyond the 60 s default, still bounded
pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(180)]

CARD = "6222029375642931684"
M1 = "898310048990001"


# what the processes log once they listen (on stderr, text or JSON): the ports they bound
ISSUER_LISTENING = re.compile(r"mock issuer ICBC listening on 127\.0\.0\.1:(\d+)")
SWITCH_READY = re.compile(r"switch ready: terminal port (\d+), metrics port (\d+)")
# for the issuer and both switches together: ~1 s on an idle 2-core machine, a few seconds with
# both cores busy; a bound that a loaded machine does not reach and a hang still does
START_TIMEOUT_S = 60.0


def config(path: Path, data: Path, dsn: str, icbc: int) -> None:
    """Port 0 everywhere: each process binds a free port itself and logs it (ports picked here
    and bound later by the process could be taken in between by anything on the host)."""
    path.write_text(
        f'[switch]\nport = 0\nmetrics_port = 0\nadmin_port = 0\nportal_port = 0\n'
        f'data_dir = "{data}"\nlog_format = "text"\nlog_level = "INFO"\n[store]\ndsn = "{dsn}"\n'
        f'[[issuers]]\nname = "ICBC"\nport = {icbc}\nprefixes = ["622202"]\n',
        encoding="utf-8",
    )


@asynccontextmanager
async def two_switches(
    tmp_path: Path, dsn: str, *, limit_fen: int | None = None,
    before_start: Callable[[SqliteStore], None] | None = None,
) -> AsyncIterator[list[int]]:
    """ICBC and two `switch serve` processes on one seeded database (``before_start`` may add to
    it); yields their terminal ports and checks on the way out that neither switch printed a
    traceback. A process that does not start (exits, or says nothing within START_TIMEOUT_S)
    fails the test with what every process wrote to stderr."""
    store = open_store_for(dsn, load_master_key(tmp_path, create=True))
    try:
        seed_demo(store)
        if before_start is not None:
            before_start(store)
    finally:
        store.close()
    if limit_fen is not None:
        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute("UPDATE merchants SET monthly_limit_fen = %s WHERE mid = %s", (limit_fen, M1))
    deadline = time.monotonic() + START_TIMEOUT_S
    procs = [Watched("issuer ICBC", "issuer", "--name", "ICBC", "--port", "0")]
    switches: list[Watched] = []
    try:
        try:
            icbc = int(procs[0].wait_for(ISSUER_LISTENING, deadline).group(1))
            for i in (0, 1):
                config(tmp_path / f"switch-{i}.toml", tmp_path, dsn, icbc)
                switches.append(Watched(f"switch {i}", "serve", "--config", str(tmp_path / f"switch-{i}.toml")))
                procs.append(switches[-1])
            ports = [int(sw.wait_for(SWITCH_READY, deadline).group(1)) for sw in switches]
        except StartError as exc:
            outputs = [f"--- {p.name} (pid {p.proc.pid}):\n{p.stop()[-2000:]}" for p in reversed(procs)]
            procs = []
            raise AssertionError(f"a process did not start: {exc}\n" + "\n".join(outputs)) from None
        yield ports
    finally:
        errs = {p.name: p.stop() for p in reversed(procs)}
    for sw in switches:
        assert "Traceback" not in errs[sw.name], f"{sw.name}:\n{errs[sw.name][-1500:]}"


async def test_two_processes_race_for_the_last_headroom(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    async with two_switches(tmp_path, pg_database, limit_fen=10000) as ports:
        terms = []
        for tid, port, stan in (("10000001", ports[0], 1), ("10000002", ports[1], 50_001)):
            t = TERMINALS_BY_TID[tid]
            c = TerminalClient("127.0.0.1", port, tid, t.mid, bytes.fromhex(t.tmk_hex or ""))
            c.next_stan = stan
            terms.append(c)
        codes: list[str] = []
        for _ in range(3):  # three races; from the second on the usage is reset to 4000 before it
            with psycopg.connect(pg_database, autocommit=True) as db:
                db.execute("UPDATE limit_usage SET used_fen = 4000 WHERE mid = %s", (M1,))
            got: list[str] = []

            async def buy(c: TerminalClient) -> None:
                async with c.connect():
                    if c.keys is None:
                        assert (await c.sign_on("003")).code == "00"
                    got.append((await c.consume(CARD, 6000, pin="123456", expiry="3012")).code)

            async with anyio.create_task_group() as tg:
                for c in terms:
                    tg.start_soon(buy, c)
            codes.extend(got)
            assert sorted(got) == ["00", "61"], got
        with psycopg.connect(pg_database) as db:
            used = db.execute("SELECT used_fen FROM limit_usage WHERE mid = %s", (M1,)).fetchone()[0]
            pending = db.execute("SELECT COUNT(*) FROM limit_reservations").fetchone()[0]
        assert used == 10000 and pending == 0


async def test_a_terminal_moving_between_processes_keeps_its_keys(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    """One-shot connections behind a load balancer land on either process: a sign-on served by
    one process gives keys the other one learns from the database (on the MAC that does not match
    what it holds), so the terminal's purchases are approved wherever they land."""
    async with two_switches(tmp_path, pg_database) as ports:
        t = TERMINALS_BY_TID["10000001"]
        term = TerminalClient("127.0.0.1", ports[0], t.tid, t.mid, bytes.fromhex(t.tmk_hex or ""))
        for sign_on_at, buy_at in ((0, 1), (1, 0), (0, 0), (1, 1)):
            term.port = ports[sign_on_at]
            async with term.connect():
                assert (await term.sign_on("003")).code == "00"
            term.port = ports[buy_at]
            async with term.connect():
                r = await term.consume(CARD, 100, pin="123456", expiry="3012")
            assert (r.code, r.mac_ok) == ("00", True), (sign_on_at, buy_at, r.code)


async def test_a_request_sent_to_both_processes_reaches_the_issuer_once(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    """§11 across processes: the same bytes arriving at two processes at once (a terminal retrying
    through the load balancer) are processed once — one issuer debit, the same answer twice — and
    other bytes under the same key get 94."""
    async with two_switches(tmp_path, pg_database) as ports:
        t = TERMINALS_BY_TID["10000001"]
        term = TerminalClient("127.0.0.1", ports[0], t.tid, t.mid, bytes.fromhex(t.tmk_hex or ""))
        async with term.connect():
            assert (await term.sign_on("003")).code == "00"
            before = await term.balance(CARD, pin="123456", expiry="3012")
        fields = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=777,
                                  pin="123456", expiry="3012")
        frame, _ = term.build_frame("0200", fields, mac=True)
        answers: list[bytes] = []

        async def send_to(port: int) -> None:
            c = TerminalClient("127.0.0.1", port, t.tid, t.mid, bytes.fromhex(t.tmk_hex or ""))
            async with c.connect():
                r = await c.send_raw(frame)
            assert r is not None
            answers.append(r.raw)

        async with anyio.create_task_group() as tg:
            for port in ports:
                tg.start_soon(send_to, port)
        assert len(answers) == 2 and answers[0] == answers[1]
        other, _ = term.build_frame("0200", {**fields, 4: "000000000778"}, mac=True)
        async with term.connect():
            clash = await term.send_raw(other)
            after = await term.balance(CARD, pin="123456", expiry="3012")
        assert clash is not None and clash.code == "94"
        assert int(str(before.fields[54])[8:]) - int(str(after.fields[54])[8:]) == 777  # debited once

