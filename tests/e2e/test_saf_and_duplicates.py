"""Duplicates and store-and-forward end to end, with the switch and the mock issuers in this
process (``run_demo(mocks=...)``) on real 127.0.0.1 sockets, so a test can read the issuers'
books and flip their behaviour mid-flight (protocol §7, §11, §15; specs/issuer.md).

- duplicates (§11): a retransmitted request gets the same bytes back and reaches the issuer
  once, also when the copy arrives while the first is in flight; the same key with other
  bytes is ``94``; a retransmitted sign-on gives the same keys, and they work;
- store-and-forward (§11): a consume whose answer is lost is ``98``, its reversal is queued in
  the same commit and delivered once the issuer answers again (retransmissions as 0401), also
  across a restart; a refund advice the issuer cannot take now is ``00``, queued, delivered once.

Every wait is a bounded poll on a condition; nothing asserts on elapsed time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from switch.app import Running
from switch.crypto.working_keys import parse_f62
from switch.demo_fixture import TERMINALS_BY_TID
from switch.issuers.mock import MockIssuer
from switch.issuers.run import demo_mocks
from switch.pos.client import Response, TerminalClient, TerminalError

from .helpers import (
    drop_trigger,
    fail_inserts,
    ICBC_CARD,
    PIN,
    Received,
    card_request,
    do,
    in_process_demo,
    metric,
    record_mtis,
    reversal_of,
    signed_on,
    terminal_client,
    void_extra,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CARD = ICBC_CARD


def client(running: Running, tid: str = "10000001", first_stan: int = 1) -> TerminalClient:
    return terminal_client("127.0.0.1", running.port, tid, first_stan)


def exposition(running: Running) -> str:
    return running.metrics.exposition().decode()


def saf_rows(running: Running) -> list[dict[str, Any]]:
    return running.store.query("SELECT * FROM saf_queue ORDER BY id")


def journal_by_stan(running: Running, stan: str) -> list[dict[str, Any]]:
    return running.store.query("SELECT * FROM journal WHERE stan = ? ORDER BY id", (stan,))


async def consume_with_lost_answer(term: TerminalClient, issuer: MockIssuer, amount_fen: int) -> Response:
    """A consume the issuer applies (``blackhole``) and never answers; once it is applied the
    issuer turns ``silent``, so the reversal the switch sends next is neither applied nor
    answered: the money stays debited until store-and-forward gets through."""
    applied_before = len(issuer.applied("consume"))
    issuer.behaviour = "blackhole"
    answer: list[Response] = []

    async def send_consume() -> None:
        answer.append(await do(term, "consume", CARD, amount_fen))

    async with anyio.create_task_group() as tg:
        tg.start_soon(send_consume)
        assert await wait_until(lambda: len(issuer.applied("consume")) > applied_before, 5.0)
        issuer.behaviour = "silent"
    return answer[0]


# ---- duplicates (§11) ----------------------------------------------------------------------
async def test_same_consume_bytes_twice_same_answer_one_debit(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    before = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks) as running, signed_on(client(running)) as term:
        mti, fields = card_request(term, "consume", CARD, 1_000, pin=PIN[CARD])
        frame, _ = term.build_frame(mti, fields, mac=True)
        first = await term.send_raw(frame)
        second = await term.send_raw(frame)
        assert first is not None and second is not None
        assert first.code == "00" and second.raw == first.raw
        assert len(icbc.applied("consume")) == 1
        assert icbc.balance_of(CARD) == before - 1_000
        rows = journal_by_stan(running, str(fields[11]))
        assert [(r["txn"], r["state"]) for r in rows] == [("consume", "approved"), ("consume", "duplicate")]
        assert metric(exposition(running), "switch_duplicates_total", outcome="resent") == 1
        # §15: both answers are requests answered
        assert metric(exposition(running), "switch_requests_total", transaction="consume", response_code="00") == 2


async def test_concurrent_copies_wait_for_the_first(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    before = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks) as running, signed_on(client(running)) as term:
        mti, fields = card_request(term, "consume", CARD, 1_500, pin=PIN[CARD])
        frame, _ = term.build_frame(mti, fields, mac=True)
        gate = icbc.hold(CARD)  # the issuer keeps its answer until the copy is in the switch too
        answers: list[Response | None] = []

        async def send_copy() -> None:
            answers.append(await term.send_raw(frame))

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_copy)
            tg.start_soon(send_copy)
            both_in = await wait_until(
                lambda: metric(exposition(running), "switch_requests_in_flight") == 2
                and icbc.frames_received >= 1, 10.0)
            gate.set()
            assert both_in
        assert len(answers) == 2 and answers[0] is not None and answers[1] is not None
        assert answers[0].code == "00" and answers[0].raw == answers[1].raw
        assert icbc.frames_received == 1  # the copy never reached the issuer
        assert len(icbc.applied("consume")) == 1
        assert icbc.balance_of(CARD) == before - 1_500


async def test_same_key_with_other_bytes_is_94(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    before = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks) as running, signed_on(client(running)) as term:
        mti, fields = card_request(term, "consume", CARD, 1_000, pin=PIN[CARD])
        first = await term.send_fields(mti, fields)
        assert first.code == "00"
        clash = await term.send_fields(mti, {**fields, 4: "000000002000"})  # same TID, batch, STAN, MTI
        assert clash.code == "94" and 38 not in clash.fields and 64 not in clash.fields
        assert len(icbc.applied("consume")) == 1
        assert icbc.balance_of(CARD) == before - 1_000
        assert metric(exposition(running), "switch_duplicates_total", outcome="94") == 1


async def test_retransmitted_sign_on_gives_the_same_keys_and_they_work(tmp_path: Path) -> None:
    mocks = demo_mocks()
    async with in_process_demo(tmp_path, mocks) as running:
        term = client(running)
        async with term.connect():
            sign_on = {11: term.take_stan(), 41: term.tid, 42: term.mid, 60: "00" + term.batch + "003", 63: "01 "}
            frame, _ = term.build_frame("0800", sign_on, mac=False)
            first = await term.send_raw(frame)
            again = await term.send_raw(frame)
            assert first is not None and again is not None
            assert first.code == "00" and again.raw == first.raw
            f62 = first.fields[62]
            assert isinstance(f62, bytes)
            tmk = TERMINALS_BY_TID[term.tid].tmk_hex
            assert tmk is not None
            term.keys = parse_f62(bytes.fromhex(tmk), "003", f62)
            term.key_mode = "003"
            r = await do(term, "consume", CARD, 800)
            assert r.code == "00" and r.mac_ok is True
        assert len(mocks["ICBC"].applied("consume")) == 1


# ---- store-and-forward (§11) ---------------------------------------------------------------


def reversals(seen: list[Received]) -> list[Received]:
    return [m for m in seen if m.mti in ("0400", "0401")]


async def queue_a_reversal(running: Running, term: TerminalClient, icbc: MockIssuer, amount_fen: int) -> Response:
    """A consume whose answer is lost, its reversal queued and its first delivery attempt gone
    unanswered (the issuer is silent): the money is still debited."""
    r = await consume_with_lost_answer(term, icbc, amount_fen)
    assert r.code == "98" and 38 not in r.fields
    assert await wait_until(lambda: bool(saf_rows(running)) and saf_rows(running)[0]["attempts"] >= 1)
    return r


async def test_lost_answer_is_98_and_the_reversal_is_queued_durably(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    seen = record_mtis(icbc)
    before = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks) as running, signed_on(client(running)) as term:
        r = await queue_a_reversal(running, term, icbc, 2_000)
        [row] = journal_by_stan(running, r.stan)
        assert (row["response_code"], row["state"], row["needs_reversal"]) == ("98", "reversed", 1)
        [queued] = saf_rows(running)
        assert (queued["issuer"], queued["kind"], queued["mti"], queued["state"]) == (
            "ICBC", "reversal", "0400", "pending")
        assert await wait_until(lambda: metric(exposition(running), "switch_saf_depth", issuer="ICBC") == 1)
        assert metric(exposition(running), "switch_saf_attempts_total", issuer="ICBC", outcome="timeout") >= 1
        assert icbc.balance_of(CARD) == before - 2_000  # the issuer has not seen the reversal apply
        assert icbc.applied("reversal") == []
    first = reversals(seen)[0]
    assert first.mti == "0400" and first.f90.startswith("0200") and not first.answered


async def test_queued_reversal_is_forwarded_as_0401_and_restores_the_balance_once(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    seen = record_mtis(icbc)
    before = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks) as running, signed_on(client(running)) as term:
        await queue_a_reversal(running, term, icbc, 2_000)
        icbc.behaviour = "normal"
        assert await wait_until(lambda: icbc.balance_of(CARD) == before, 5.0)
        assert [e.reverses for e in icbc.applied("reversal")] == ["consume"]
    sent = reversals(seen)
    assert len(sent) >= 2 and sent[0].mti == "0400"
    assert all(m.mti == "0401" for m in sent[1:])  # every retransmission is a 0401
    assert any(m.answered for m in sent[1:])
    assert len({m.f90 for m in sent}) == 1  # all name the same original issuer request


async def test_forwarded_reversal_is_acknowledged_and_leaves_the_queue(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    before = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks) as running, signed_on(client(running)) as term:
        await queue_a_reversal(running, term, icbc, 2_000)
        icbc.behaviour = "normal"
        assert await wait_until(lambda: icbc.balance_of(CARD) == before, 5.0)  # the issuer applied it
        # the issuer answered 0410 at once; the switch must take that as the acknowledgement
        assert await wait_until(lambda: saf_rows(running)[0]["state"] == "done", 3.0), saf_rows(running)
        assert saf_rows(running)[0]["last_response"] == "00"
        assert await wait_until(lambda: metric(exposition(running), "switch_saf_depth", issuer="ICBC") == 0)
        assert metric(exposition(running), "switch_saf_attempts_total", issuer="ICBC", outcome="acknowledged") == 1


async def test_blackhole_reversal_restores_the_balance_exactly_once(tmp_path: Path) -> None:
    """In ``blackhole`` the issuer applies the 0400 too but its answer is lost; the 0401 that
    store-and-forward sends once the issuer answers again must not undo the consume twice."""
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    seen = record_mtis(icbc)
    before = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks) as running, signed_on(client(running)) as term:
        icbc.behaviour = "blackhole"
        r = await do(term, "consume", CARD, 2_100)
        assert r.code == "98"
        assert await wait_until(lambda: bool(saf_rows(running)) and saf_rows(running)[0]["attempts"] >= 1)
        assert saf_rows(running)[0]["state"] == "pending"
        icbc.behaviour = "normal"
        assert await wait_until(lambda: any(m.mti == "0401" and m.answered for m in seen), 5.0)
        assert icbc.balance_of(CARD) == before
        assert len(icbc.applied("reversal")) == 1


async def test_a_journal_write_that_fails_leaves_no_answer_and_the_issuer_is_reversed(tmp_path: Path) -> None:
    """The journal commit of an approved consume fails (a trigger aborts that one row): the
    terminal gets no answer (the connection is closed: no answer may exist outside the journal),
    the switch keeps serving, and the request's write-ahead intent becomes a queued reversal at
    once, delivered to the issuer. The terminal's own 0400 finds that reversal: the original was
    "reversed by the switch", 00 with nothing more to do (§11), not 25 (no original)."""
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    before = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks) as running:  # the default orphan age: 30 s
        fail_inserts(tmp_path, "fail_one", "journal", "NEW.amount_fen = 4242 AND NEW.txn = 'consume'")
        async with signed_on(client(running)) as term:
            mti, fields = card_request(term, "consume", CARD, 4_242, pin=PIN[CARD])
            with pytest.raises(TerminalError):
                await term.send_fields(mti, fields)
        async with signed_on(client(running, first_stan=500)) as term:
            assert (await do(term, "consume", CARD, 100)).code == "00"  # the switch goes on
            assert (await term.send_fields("0400", reversal_of(term, fields))).code == "00"
        assert await wait_until(lambda: icbc.balance_of(CARD) == before - 100, 10.0)
        assert [(e.kind, e.amount_fen) for e in icbc.applied("consume")] == [("consume", 4_242), ("consume", 100)]
        assert [e.reverses for e in icbc.applied("reversal")] == ["consume"]  # once: the 0400 added none
        assert [r["kind"] for r in saf_rows(running)] == ["reversal"]
        rows = running.store.query("SELECT response_code, note FROM journal WHERE txn = 'reversal'")
        assert [r["response_code"] for r in rows] == ["00"]
        assert rows[0]["note"].startswith("original never journaled")
        assert metric(exposition(running), "switch_store_write_failures_total") == 1
        assert running.store.query("SELECT COUNT(*) AS n FROM intents")[0]["n"] == 0


async def test_when_the_reversal_cannot_be_queued_either_the_orphan_sweep_does_it(tmp_path: Path) -> None:
    """The store refuses the journal row and then the queued reversal too (a full disk stays
    full): the intent stays, and once the store takes writes again the orphan-intent sweep
    (here after 2 s) reverses the consume at the issuer, without a restart."""
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    before = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks, orphan_intent_timeout=2.0) as running:
        fail_inserts(tmp_path, "fail_row", "journal", "NEW.amount_fen = 4343 AND NEW.txn = 'consume'")
        fail_inserts(tmp_path, "fail_saf", "saf_queue")
        async with signed_on(client(running)) as term:
            mti, fields = card_request(term, "consume", CARD, 4_343, pin=PIN[CARD])
            with pytest.raises(TerminalError):
                await term.send_fields(mti, fields)
        assert await wait_until(lambda: metric(exposition(running), "switch_store_write_failures_total") >= 2)
        assert icbc.balance_of(CARD) == before - 4_343  # approved at the issuer, not yet reversed
        assert running.store.query("SELECT COUNT(*) AS n FROM intents")[0]["n"] == 1
        drop_trigger(tmp_path, "fail_saf")  # the disk has room again
        assert await wait_until(lambda: icbc.balance_of(CARD) == before, 15.0)
        assert [e.reverses for e in icbc.applied("reversal")] == ["consume"]
        assert running.store.query("SELECT COUNT(*) AS n FROM intents")[0]["n"] == 0


async def test_a_settlement_waits_for_the_batch_requests_still_at_the_issuer(tmp_path: Path) -> None:
    """§1 lets a terminal have several requests in flight, so a 0500 may arrive while a consume of
    the same batch is at its issuer. The totals are counted once it is journaled: the 0500 is
    answered after the consume, with the consume in the switch's totals (here unbalanced against
    the terminal's zeros), never a closed batch that an approval then lands in."""
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    async with in_process_demo(tmp_path, mocks, issuer_timeout=3.0) as running:
        async with signed_on(client(running)) as term:
            gate = icbc.hold(CARD)
            mti, fields = card_request(term, "consume", CARD, 700, pin=PIN[CARD])
            zeros = f"{0:012d}{0:03d}{0:012d}{0:03d}0" + "0" * 31
            settle = {11: term.take_stan(), 41: term.tid, 42: term.mid, 48: zeros, 49: "156",
                      60: f"00{term.batch}201"}
            answers: dict[str, Response] = {}

            async def send(name: str, request_mti: str, request: dict[int, Any], mac: bool) -> None:
                answers[name] = await term.send_fields(request_mti, request, mac=mac)

            async with anyio.create_task_group() as tg:
                tg.start_soon(send, "consume", mti, fields, True)
                # the consume is at the issuer once its write-ahead intent exists
                assert await wait_until(lambda: bool(running.store.query("SELECT 1 FROM intents")))
                tg.start_soon(send, "settle", "0500", settle, False)
                await anyio.sleep(0.3)  # not an assertion on time: the 0500 must still be waiting
                assert "settle" not in answers
                gate.set()
            assert answers["consume"].code == "00"
            r = answers["settle"]
            assert r.code == "00"
            assert r.fields[48] == f"{700:012d}{1:03d}{0:012d}{0:03d}2" + "0" * 30 + "1"  # the switch's totals


async def test_queued_reversal_is_delivered_after_a_restart(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    seen = record_mtis(icbc)
    before = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks) as running:
        async with signed_on(client(running)) as term:
            await queue_a_reversal(running, term, icbc, 2_200)
    # the switch stopped with the reversal still queued and the issuer still not answering
    assert icbc.balance_of(CARD) == before - 2_200
    sent_before_restart = len(seen)

    icbc.behaviour = "normal"
    async with in_process_demo(tmp_path, mocks) as again:
        [queued] = saf_rows(again)
        assert queued["kind"] == "reversal" and queued["attempts"] >= 1
        assert await wait_until(lambda: icbc.balance_of(CARD) == before, 10.0)
        assert len(icbc.applied("reversal")) == 1
    after_restart = [m.mti for m in reversals(seen[sent_before_restart:])]
    assert after_restart and set(after_restart) == {"0401"}


async def queue_a_refund_advice(
    running: Running, term: TerminalClient, icbc: MockIssuer, behaviour: str
) -> tuple[Response, int]:
    """An approved consume, then its refund while the issuer does not answer: ``00`` once the
    advice is durably queued, and its first store-and-forward attempt gone unanswered.
    Returns the consume and the card's balance just before the refund."""
    consume = await do(term, "consume", CARD, 5_000)
    assert consume.code == "00"
    before = icbc.balance_of(CARD)
    icbc.behaviour = behaviour  # type: ignore[assignment]
    refund = await do(term, "refund", CARD, 2_000, pin=False, extra=void_extra(consume))
    assert refund.mti == "0230" and refund.code == "00"  # durably queued is as good as delivered
    [queued] = saf_rows(running)
    assert (queued["issuer"], queued["kind"], queued["mti"]) == ("ICBC", "advice", "0220")
    assert await wait_until(lambda: saf_rows(running)[0]["attempts"] >= 1)
    return consume, before


@pytest.mark.parametrize("behaviour", ["silent", "blackhole"])
async def test_refund_advice_is_queued_and_delivered_once(tmp_path: Path, behaviour: str) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    seen = record_mtis(icbc)
    async with in_process_demo(tmp_path, mocks) as running, signed_on(client(running)) as term:
        consume, before = await queue_a_refund_advice(running, term, icbc, behaviour)
        [original] = running.store.query("SELECT refunded_fen FROM journal WHERE rrn = ?", (consume.fields[37],))
        assert original["refunded_fen"] == 2_000
        assert saf_rows(running)[0]["state"] == "pending"
        # silent: nothing applied yet; blackhole: applied at the first transmission, answer lost
        assert icbc.balance_of(CARD) == before + (2_000 if behaviour == "blackhole" else 0)

        icbc.behaviour = "normal"
        assert await wait_until(lambda: any(m.mti == "0221" and m.answered for m in seen), 5.0)
        assert icbc.balance_of(CARD) == before + 2_000
        assert len(icbc.applied("refund")) == 1
    advices = [m.mti for m in seen if m.f3 == "200000"]
    assert advices[0] == "0220" and set(advices[1:]) <= {"0220", "0221"}  # the first attempt may repeat 0220


async def test_forwarded_refund_advice_is_acknowledged_and_leaves_the_queue(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    seen = record_mtis(icbc)
    async with in_process_demo(tmp_path, mocks) as running, signed_on(client(running)) as term:
        await queue_a_refund_advice(running, term, icbc, "silent")
        icbc.behaviour = "normal"
        assert await wait_until(lambda: any(m.mti == "0221" and m.answered for m in seen), 5.0)
        assert await wait_until(lambda: saf_rows(running)[0]["state"] == "done", 3.0), saf_rows(running)
        assert saf_rows(running)[0]["last_response"] == "00"
