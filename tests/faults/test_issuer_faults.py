"""Issuer faults end to end (issue 7): the switch and the mock issuers in this process
(``run_demo(mocks=...)``) on real 127.0.0.1 sockets; a fault is switched on at ICBC
(switch/issuers/faults.py), two terminals send a burst of consumes, the fault is cleared.

For every fault:
- every terminal request gets exactly one answer, ``00`` or ``98``/``91`` (the client's timeout,
  ``ANSWER_BOUND``, turns a hang into a failure), over a terminal connection that stays open;
- every ``00`` carries the auth code ICBC issued for that very request (matching by STAN held);
- store-and-forward delivers the queued reversals once the fault is cleared, and ICBC's balance
  ends exactly at start − the approved amounts of the switch's journal;
- late and duplicate replies are counted (``switch_issuer_late_replies_total``) and never reach a
  terminal a second time;
- afterwards normal traffic is approved again (the link recovered).

Every wait is a bounded poll on a condition; nothing asserts on elapsed time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest

from switch.app import Running
from switch.core.codec import Fields
from switch.issuers.mock import MockIssuer
from switch.issuers.run import demo_mocks
from switch.pos.client import Response, TerminalClient

from tests.e2e.helpers import ICBC_CARD, do, in_process_demo, metric, signed_on, terminal_client, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CARD = ICBC_CARD
ISSUER_TIMEOUT = 0.5
PER_TERMINAL = 6
TIDS = ("10000001", "20000001")  # two merchants' main terminals
# A 98 is answered after the issuer timeout plus one attempt to deliver the queued reversals
# (each bounded by the issuer timeout); the bound is generous and only turns a hang into a failure.
ANSWER_BOUND = ISSUER_TIMEOUT * (2 * PER_TERMINAL * len(TIDS) + 4) + 5.0
SAF_BOUND = 30.0  # seconds for store-and-forward to get through once the fault is cleared
ANSWERS = frozenset({"00", "98", "91"})


def exposition(running: Running) -> str:
    return running.metrics.exposition().decode()


def late_replies(running: Running) -> float:
    return metric(exposition(running), "switch_issuer_late_replies_total", issuer="ICBC")


def record_auth_codes(mock: MockIssuer) -> dict[str, str]:
    """RRN -> the auth code the mock put in its approval of that request (wraps ``handle``)."""
    issued: dict[str, str] = {}
    inner = mock.handle

    def handle(mti: str, fields: Fields) -> tuple[str, Fields] | None:
        reply = inner(mti, fields)
        if reply is not None and reply[0] == "0210" and reply[1].get(39) == "00":
            issued[str(reply[1][37])] = str(reply[1][38])
        return reply

    mock.handle = handle  # type: ignore[method-assign]
    return issued


async def burst(terms: list[TerminalClient], per_terminal: int, first_amount_fen: int) -> list[Response]:
    """``per_terminal`` concurrent consumes from each terminal, distinct amounts; every answer."""
    answers: list[Response] = []

    async def one(term: TerminalClient, amount_fen: int) -> None:
        answers.append(await do(term, "consume", CARD, amount_fen))

    async with anyio.create_task_group() as tg:
        amount = first_amount_fen
        for term in terms:
            for _ in range(per_terminal):
                tg.start_soon(one, term, amount)
                amount += 1
    return answers


def saf_pending(running: Running) -> list[dict[str, Any]]:
    return running.store.query("SELECT * FROM saf_queue WHERE state != 'done' ORDER BY id")


def approved_fen(running: Running) -> int:
    rows = running.store.query(
        "SELECT COALESCE(SUM(amount_fen), 0) AS s FROM journal WHERE txn = 'consume' AND response_code = '00'")
    return int(rows[0]["s"])


async def scenario(
    tmp_path: Path,
    knobs: dict[str, Any],
    check_during: Callable[[Running, MockIssuer, list[Response]], None] | None = None,
    check_after: Callable[[Running, MockIssuer, list[Response]], Awaitable[None]] | None = None,
) -> None:
    """Run the burst under ``knobs`` at ICBC, clear the fault, check the invariants above;
    ``check_during`` right after the burst, ``check_after`` once recovered (switch still up)."""
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    issued = record_auth_codes(icbc)
    start = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks, issuer_timeout=ISSUER_TIMEOUT) as running:
        async with AsyncExitStack() as stack:
            terms = []
            for n, tid in enumerate(TIDS):
                term = terminal_client("127.0.0.1", running.port, tid, 1 + 1000 * n)
                term.timeout = ANSWER_BOUND
                terms.append(await stack.enter_async_context(signed_on(term)))
            icbc.faults.set(**knobs)
            answers = await burst(terms, PER_TERMINAL, 1_000)
            icbc.faults.clear()

            assert len(answers) == PER_TERMINAL * len(TIDS)
            assert {r.code for r in answers} <= ANSWERS, sorted(r.code for r in answers)
            for r in answers:
                if r.code == "00":
                    assert r.fields.get(38) == issued[str(r.fields[37])], "a reply matched to the wrong request"
                else:
                    assert 38 not in r.fields
            if check_during is not None:
                check_during(running, icbc, answers)

            # store-and-forward gets through once the fault is gone
            assert await wait_until(lambda: not saf_pending(running), SAF_BOUND), saf_pending(running)
            # the link recovered: normal traffic is approved again, on the same terminal connections
            assert await wait_until(
                lambda: metric(exposition(running), "switch_issuer_link_up", issuer="ICBC") == 1, 10.0)
            for term in terms:
                again = await do(term, "consume", CARD, 777)
                assert again.code == "00", again
            # the books: exactly the journal's approvals left the card
            assert icbc.balance_of(CARD) == start - approved_fen(running)
            # one answer per request: nothing arrived that no request waited for
            assert all(term.unmatched == [] for term in terms)
            # no terminal connection was dropped
            assert metric(exposition(running), "switch_connections_closed_total") == 0
            if check_after is not None:
                await check_after(running, icbc, answers)


# ---- the faults ---------------------------------------------------------------------------
async def test_delay_beyond_the_timeout(tmp_path: Path) -> None:
    def during(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert {r.code for r in answers} == {"98"}  # every reply came after the timeout

    async def after(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert icbc.faults.counts["delayed"] >= len(answers)
        assert len(icbc.applied("reversal")) == len(answers)
        # every consume's reply still arrives, late, and is counted (not answered to a terminal)
        assert await wait_until(lambda: late_replies(running) >= len(answers), 10.0)

    await scenario(tmp_path, {"delay": 3 * ISSUER_TIMEOUT}, during, after)


async def test_drop_every_second_reply(tmp_path: Path) -> None:
    def during(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert "98" in {r.code for r in answers} and "00" in {r.code for r in answers}

    async def after(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert icbc.faults.counts["dropped"] >= 1
        assert len(icbc.applied("reversal")) == sum(r.code == "98" for r in answers)
        assert late_replies(running) == 0  # a dropped reply never comes

    await scenario(tmp_path, {"drop": 2}, during, after)


async def test_drop_with_probability(tmp_path: Path) -> None:
    async def after(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert icbc.faults.counts["dropped"] >= 1

    await scenario(tmp_path, {"drop": 0.4, "seed": 2024}, check_after=after)


async def test_disconnect_mid_message(tmp_path: Path) -> None:
    def during(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert {r.code for r in answers} & {"98", "91"}

    async def after(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert icbc.faults.counts["disconnected"] >= 1

    await scenario(tmp_path, {"disconnect_mid_message": 3}, during, after)


async def test_garbage_instead_of_the_reply(tmp_path: Path) -> None:
    def during(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert "98" in {r.code for r in answers}
        assert metric(exposition(running), "switch_malformed_frames_total", reason="issuer") >= 1

    async def after(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert icbc.faults.counts["garbage"] >= 1

    await scenario(tmp_path, {"garbage": 2}, during, after)


async def test_unframed_garbage_before_the_reply(tmp_path: Path) -> None:
    def during(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert {r.code for r in answers} & {"98", "91"}

    async def after(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert icbc.faults.counts["garbage"] >= 1

    await scenario(tmp_path, {"garbage": 4, "garbage_mode": "before", "garbage_framed": False}, during, after)


async def test_duplicate_replies(tmp_path: Path) -> None:
    def during(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert {r.code for r in answers} == {"00"}

    async def after(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert icbc.faults.counts["duplicated"] >= len(answers)
        # every second copy was counted as late, and none reached a terminal (``unmatched``)
        assert late_replies(running) == icbc.faults.counts["duplicated"]

    await scenario(tmp_path, {"duplicate": True}, during, after)


async def test_reorder_within_the_timeout(tmp_path: Path) -> None:
    def during(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert {r.code for r in answers} == {"00"}
        assert late_replies(running) == 0

    async def after(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert icbc.faults.counts["reordered"] >= 4

    await scenario(tmp_path, {"reorder": 4, "reorder_hold": ISSUER_TIMEOUT / 5}, during, after)


async def test_reorder_held_beyond_the_timeout(tmp_path: Path) -> None:
    def during(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        assert "98" in {r.code for r in answers}

    async def after(running: Running, icbc: MockIssuer, answers: list[Response]) -> None:
        # the held batch is sent once its hold ends: every reply in it is late
        assert await wait_until(lambda: icbc.faults.counts["reordered"] >= 1, 10.0)
        assert await wait_until(lambda: late_replies(running) >= 1, 10.0)

    await scenario(tmp_path, {"reorder": 5, "reorder_hold": 3 * ISSUER_TIMEOUT}, during, after)
