"""Two `switch serve` processes on one PostgreSQL database, over TCP (issue 7): the activation
lockout (§9.1) and batch settlement (§9.4) are decided by the database, not by each process.

- Wrong activation codes sent to both processes add up: after five (spread over both) every
  activation from that address gets 75 at either process, right code or not; eight wrong codes
  sent to both at once get exactly five 97s.
- The same batch settled at both processes at once (the same frame, or a retry with a new STAN)
  gets one answer from both, and the database holds one settlements row.
- Starting a process reverses the write-ahead intents old enough to be orphans (once, whichever
  process takes them), never a young one: that may be another live process's request in flight.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import psycopg
import pytest

from switch.adapters.sqlite_store import SqliteStore
from switch.crypto.activation import generate_terminal_key, public_key_der
from switch.demo_fixture import TERMINALS_BY_TID
from switch.pipeline.saf import StoreAndForward
from switch.pos.client import Response, TerminalClient
from switch.ports import NullMetrics
from tests.adapters.pg_cluster import pg_cluster, pg_database  # noqa: F401  (fixtures)
from tests.e2e.test_two_processes_postgres import two_switches

# three processes start per test (two_switches): room for a loaded machine beyond the 60 s default
pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(180)]

CARD = "6222029375642931684"
RIGHT_CODE = "48213579"  # 20000002's one-time code (§14)


async def activation(port: int, code: str, stan: int, public_key: bytes) -> str:
    term = TerminalClient("127.0.0.1", port, " " * 8, " " * 15, bytes(16))
    r = await term.send_fields("0800", {11: f"{stan:06d}", 41: " " * 8, 42: " " * 15, 60: "00000001351",
                                        62: code.encode() + public_key}, mac=False, oneshot=True)
    return r.code


async def test_wrong_activation_codes_at_both_processes_add_up_to_one_lockout(
    tmp_path: Path, pg_database: str  # noqa: F811
) -> None:
    key = public_key_der(generate_terminal_key())
    async with two_switches(tmp_path, pg_database) as ports:
        # five wrong codes, alternating between the processes (three at one, two at the other)
        codes = [await activation(ports[i % 2], f"{11_111_110 + i}", 100 + i, key) for i in range(5)]
        assert codes == ["97"] * 5
        # the sixth attempt is refused at both, even with the right code
        assert await activation(ports[1], RIGHT_CODE, 200, key) == "75"
        assert await activation(ports[0], RIGHT_CODE, 201, key) == "75"
        with psycopg.connect(pg_database, autocommit=True) as db:
            assert db.execute("SELECT COUNT(*) FROM activation_failures").fetchone()[0] == 5
            assert db.execute("SELECT state FROM terminals WHERE tid = '20000002'").fetchone()[0] \
                == "awaiting_activation"


async def test_wrong_activation_codes_sent_to_both_at_once_get_exactly_five_97s(
    tmp_path: Path, pg_database: str  # noqa: F811
) -> None:
    """Eight wrong codes at once, four to each process: five are answered 97 and three 75 (with a
    count per process, or a count that is not atomic, more than five would be answered 97)."""
    key = public_key_der(generate_terminal_key())
    async with two_switches(tmp_path, pg_database) as ports:
        got: list[str] = []

        async def guess(i: int) -> None:
            got.append(await activation(ports[i % 2], f"{22_222_220 + i}", 300 + i, key))

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(guess, i)
        assert sorted(got) == ["75"] * 3 + ["97"] * 5, got


async def test_one_batch_settled_at_both_processes_at_once_gets_one_answer(
    tmp_path: Path, pg_database: str  # noqa: F811
) -> None:
    async with two_switches(tmp_path, pg_database) as ports:
        t = TERMINALS_BY_TID["10000001"]
        term = TerminalClient("127.0.0.1", ports[0], t.tid, t.mid, bytes.fromhex(t.tmk_hex or ""))
        async with term.connect():
            assert (await term.sign_on("003")).code == "00"
            assert (await term.consume(CARD, 700, pin="123456", expiry="3012")).code == "00"

        def settlement(debit: int, count: int) -> bytes:
            f48 = f"{debit:012d}{count:03d}{0:012d}{0:03d}0" + "0" * 31
            fields = {11: term.take_stan(), 41: t.tid, 42: t.mid, 48: f48, 49: "156", 60: f"00{term.batch}201"}
            return term.build_frame("0500", fields, mac=False)[0]

        async def both_at_once(frames: list[bytes]) -> list[Response]:
            answers: list[Response] = []

            async def send(port: int, frame: bytes) -> None:
                c = TerminalClient("127.0.0.1", port, t.tid, t.mid, bytes.fromhex(t.tmk_hex or ""))
                async with c.connect():
                    r = await c.send_raw(frame)
                assert r is not None, "a process closed instead of answering"
                answers.append(r)

            async with anyio.create_task_group() as tg:
                for port, frame in zip(ports, frames):
                    tg.start_soon(send, port, frame)
            return answers

        # a terminal retrying through the load balancer with a new STAN (and, here, other totals)
        first = await both_at_once([settlement(700, 1), settlement(999, 9)])
        assert [r.code for r in first] == ["00", "00"]
        assert first[0].fields[48] == first[1].fields[48]
        with psycopg.connect(pg_database, autocommit=True) as db:
            rows = db.execute("SELECT batch, response_f48 FROM settlements WHERE tid = %s", (t.tid,)).fetchall()
        assert rows == [("000001", first[0].fields[48])]
        # the same bytes at both at once: one answer too (a duplicate, §11)
        same = settlement(700, 1)
        again = await both_at_once([same, same])
        assert [r.code for r in again] == ["00", "00"]
        assert again[0].fields[48] == again[1].fields[48] == first[0].fields[48]
        # the batch is closed at both processes: the next sign-on opens batch 2 wherever it lands
        for port in ports:
            term.port = port
            async with term.connect():
                assert str((await term.sign_on("003")).fields[60])[2:8] == "000002"
        with psycopg.connect(pg_database, autocommit=True) as db:
            assert db.execute("SELECT COUNT(*) FROM settlements").fetchone()[0] == 1


async def test_starting_processes_reverse_only_orphaned_intents(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    reversal = {2: CARD, 3: "000000", 4: "000000000100", 11: "000001", 90: "0200000001" + "0" * 32}

    def intents(store: SqliteStore) -> None:
        for key, created in (("orphan", time.time() - 3600), ("in-flight", time.time())):
            saf = StoreAndForward(store, {}, NullMetrics(), clock=lambda created=created: created)
            store.db.execute("BEGIN")
            saf.op_intent(key, "ICBC", dict(reversal))(store.db)
            store.db.execute("COMMIT")

    async with two_switches(tmp_path, pg_database, before_start=intents):
        with psycopg.connect(pg_database, autocommit=True) as db:
            left = [r[0] for r in db.execute("SELECT key FROM intents ORDER BY key")]
            queued = db.execute("SELECT COUNT(*) FROM saf_queue WHERE kind = 'reversal'").fetchone()
    assert left == ["in-flight"]  # another process's request: not reversed under its feet
    assert queued is not None and queued[0] == 1  # the orphan, once, by whichever process took it
