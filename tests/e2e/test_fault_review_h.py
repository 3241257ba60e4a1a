"""Fault review H: store-write failures on the transaction types other than a consume, a
reversal whose own commit fails, duplicates racing a failed commit, the orphan sweep racing a
slow store, store-and-forward through a flapping link and through unexpected reversal answers,
sign-off while a request is at the issuer, and monthly-limit headroom after failed commits.

The invariant checked throughout (specs/decisions.md "A journal commit that fails"): money the
issuer moved is either in the journal or undone by a queued reversal; never both, never neither.
Every wait is a bounded poll; nothing asserts on elapsed time; no PIN or full PAN is printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from switch.app import Running
from switch.issuers.mock import MockIssuer
from switch.issuers.run import demo_mocks
from switch.pos.client import Response, TerminalClient, TerminalError

from .helpers import (
    drop_trigger,
    fail_inserts,
    CMB_CARD,
    CMB_DEST,
    ICBC_CARD,
    PIN,
    card_request,
    do,
    in_process_demo,
    metric,
    pre_auth_extra,
    record_mtis,
    reversal_of,
    signed_on,
    terminal_client,
    void_extra,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CARD = ICBC_CARD
MICRO_LIMIT_FEN = 300_000_00  # merchant 898310048990001 of terminal 10000001 (§13, §14)


# ---- harness --------------------------------------------------------------------------------
def client(running: Running, tid: str = "10000001", first_stan: int = 1) -> TerminalClient:
    return terminal_client("127.0.0.1", running.port, tid, first_stan)


def exposition(running: Running) -> str:
    return running.metrics.exposition().decode()


def saf_rows(running: Running) -> list[dict[str, Any]]:
    return running.store.query("SELECT * FROM saf_queue ORDER BY id")


def journal(running: Running, where: str = "1=1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    return running.store.query(f"SELECT * FROM journal WHERE {where} ORDER BY id", params)


def intents(running: Running) -> int:
    return int(running.store.query("SELECT COUNT(*) AS n FROM intents")[0]["n"])


async def no_answer(term: TerminalClient, request: tuple[str, dict[int, Any]]) -> None:
    """The request's journal commit fails: the switch closes without answering (decisions.md)."""
    mti, fields = request
    with pytest.raises(TerminalError):
        await term.send_fields(mti, fields)


def settled(running: Running) -> bool:
    """No write-ahead intent left and nothing pending in store-and-forward."""
    return intents(running) == 0 and all(r["state"] != "pending" for r in saf_rows(running))


# ---- a store write failure on other transaction types ---------------------------------------
async def test_void_whose_commit_fails_is_undone_at_the_issuer_and_the_sale_stays(tmp_path: Path) -> None:
    """The void is credited at the issuer, its journal commit fails: the void's intent becomes a
    queued reversal (the card is debited again), the consume stays approved in the journal, and
    the terminal's retry of the same void is processed afresh and voids once."""
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    start = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks, issuer_timeout=1.0) as running:
        term = client(running)
        async with signed_on(term):
            consume = await do(term, "consume", CARD, 3_100)
            assert consume.code == "00"
            fail_inserts(tmp_path, "fail_void", "journal", "NEW.txn = 'consume_void'")
            void = card_request(term, "void", CARD, 3_100, pin=PIN[CARD], extra=void_extra(consume))
            await no_answer(term, void)
        assert await wait_until(lambda: len(icbc.applied("reversal")) == 1 and settled(running), 10.0)
        assert [e.reverses for e in icbc.applied("reversal")] == ["void"]
        assert icbc.balance_of(CARD) == start - 3_100  # the sale stands, as the journal says
        [sale] = journal(running, "txn = 'consume'")
        assert sale["state"] == "approved"
        assert journal(running, "txn = 'consume_void'") == []
        drop_trigger(tmp_path, "fail_void")
        async with term.connect():  # a new connection, the same working keys
            mti, fields = void
            again = await term.send_fields(mti, fields)  # the terminal's retry (same STAN, same bytes)
            assert again.code == "00"
        assert icbc.balance_of(CARD) == start
        assert [r["state"] for r in journal(running, "txn = 'consume'")] == ["voided"]


async def test_refund_whose_commit_fails_is_recorded_or_undone(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    async with in_process_demo(tmp_path, mocks, issuer_timeout=1.0) as running:
        async with signed_on(client(running)) as term:
            consume = await do(term, "consume", CARD, 5_000)
            assert consume.code == "00"
            after_sale = icbc.balance_of(CARD)
            fail_inserts(tmp_path, "fail_refund", "journal", "NEW.txn = 'refund'")
            await no_answer(term, card_request(term, "refund", CARD, 2_000, extra=void_extra(consume)))
        assert len(icbc.applied("refund")) == 1  # the issuer credited the card
        recorded = bool(journal(running, "txn = 'refund' AND response_code = '00'"))
        queued = [r for r in saf_rows(running) if r["kind"] == "reversal"]
        assert recorded or queued, "refund credited at the issuer with no journal row and no reversal"
        assert await wait_until(lambda: icbc.balance_of(CARD) == after_sale, 5.0)


async def test_retried_refund_after_a_failed_commit_credits_once(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    async with in_process_demo(tmp_path, mocks, issuer_timeout=1.0) as running:
        term = client(running)
        async with signed_on(term):
            consume = await do(term, "consume", CARD, 5_000)
            assert consume.code == "00"
            after_sale = icbc.balance_of(CARD)
            fail_inserts(tmp_path, "fail_refund", "journal", "NEW.txn = 'refund'")
            refund = card_request(term, "refund", CARD, 2_000, extra=void_extra(consume))
            await no_answer(term, refund)
        drop_trigger(tmp_path, "fail_refund")
        async with term.connect():
            again = await term.send_fields(*refund)  # the advice is retried until answered (§11)
            assert again.code == "00"
        assert await wait_until(lambda: settled(running), 5.0)
        [row] = journal(running, "txn = 'consume'")
        assert row["refunded_fen"] == 2_000
        assert icbc.balance_of(CARD) == after_sale + 2_000, "credited twice for one recorded refund"


async def test_completion_advice_whose_commit_fails_is_recorded_or_undone(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    start = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks, issuer_timeout=1.0) as running:
        async with signed_on(client(running)) as term:
            pre_auth = await do(term, "pre_auth", CARD, 10_000)
            assert pre_auth.code == "00"
            fail_inserts(tmp_path, "fail_advice", "journal", "NEW.txn = 'completion_advice'")
            await no_answer(term, card_request(term, "completion_advice", CARD, 8_000,
                                               extra=pre_auth_extra(pre_auth)))
        assert len(icbc.applied("completion_advice")) == 1
        [pa] = journal(running, "txn = 'pre_auth'")
        recorded = bool(journal(running, "txn = 'completion_advice' AND response_code = '00'"))
        assert recorded or await wait_until(
            lambda: icbc.balance_of(CARD) == start and icbc.available_of(CARD) == start - 10_000, 5.0), (
            f"pre-auth {pa['state']}, card debited {start - icbc.balance_of(CARD)} fen with nothing recorded")


async def test_completion_whose_commit_fails_reopens_the_hold_and_a_retry_completes(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    start = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks, issuer_timeout=1.0) as running:
        term = client(running)
        async with signed_on(term):
            pre_auth = await do(term, "pre_auth", CARD, 10_000)
            assert pre_auth.code == "00"
            fail_inserts(tmp_path, "fail_completion", "journal", "NEW.txn = 'completion'")
            completion = card_request(term, "completion", CARD, 9_000, pin=PIN[CARD], extra=pre_auth_extra(pre_auth))
            await no_answer(term, completion)
        assert await wait_until(lambda: len(icbc.applied("reversal")) == 1 and settled(running), 10.0)
        assert icbc.balance_of(CARD) == start and icbc.available_of(CARD) == start - 10_000  # hold open again
        assert [r["state"] for r in journal(running, "txn = 'pre_auth'")] == ["approved"]
        drop_trigger(tmp_path, "fail_completion")
        async with term.connect():
            again = await term.send_fields(*completion)
            assert again.code == "00"
        assert icbc.balance_of(CARD) == start - 9_000 and icbc.available_of(CARD) == start - 9_000
        assert [r["state"] for r in journal(running, "txn = 'pre_auth'")] == ["completed"]


async def test_transfer_whose_commit_fails_is_undone_on_both_legs(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc, cmb = mocks["ICBC"], mocks["CMB"]
    src, dst = icbc.balance_of(CARD), cmb.balance_of(CMB_DEST)
    async with in_process_demo(tmp_path, mocks, issuer_timeout=1.0) as running:
        async with signed_on(client(running)) as term:
            fail_inserts(tmp_path, "fail_transfer", "journal", "NEW.txn = 'transfer'")
            await no_answer(term, card_request(term, "transfer", CARD, 4_000, pin=PIN[CARD], extra={48: CMB_DEST}))
        assert len(icbc.applied("transfer_debit")) == 1 and len(cmb.applied("transfer_credit")) == 1
        assert await wait_until(lambda: settled(running) and len(saf_rows(running)) == 2, 10.0)
        assert (icbc.balance_of(CARD), cmb.balance_of(CMB_DEST)) == (src, dst)
        assert [e.reverses for e in icbc.applied("reversal")] == ["transfer_debit"]
        assert [e.reverses for e in cmb.applied("reversal")] == ["transfer_credit"]


# ---- a reversal whose own journal commit fails ----------------------------------------------
async def test_reversal_whose_commit_fails_still_reverses_once_and_the_retry_is_00(tmp_path: Path) -> None:
    """The 0400's issuer reversal and the original's new state are committed before its journal
    row; that row failing leaves the terminal unanswered, and its retry finds the original
    reversed: 00, nothing reversed twice."""
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    start = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks, issuer_timeout=1.0) as running:
        term = client(running)
        async with signed_on(term):
            consume = await do(term, "consume", CARD, 2_500)
            assert consume.code == "00"
            fail_inserts(tmp_path, "fail_0400", "journal", "NEW.mti = '0400'")
            reversal = reversal_of(term, consume.request_fields, "98")
            with pytest.raises(TerminalError):
                await term.send_fields("0400", reversal)
        assert await wait_until(lambda: icbc.balance_of(CARD) == start and settled(running), 5.0)
        assert [r["state"] for r in journal(running, "txn = 'consume'")] == ["reversed"]
        drop_trigger(tmp_path, "fail_0400")
        async with term.connect():
            again = await term.send_fields("0400", reversal)
            assert again.code == "00"
        assert len(icbc.applied("reversal")) == 1 and icbc.balance_of(CARD) == start
        assert [r["response_code"] for r in journal(running, "mti = '0400'")] == ["00"]


async def test_reversal_whose_commit_fails_gives_the_limit_headroom_back(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    start = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks, issuer_timeout=1.0) as running:
        term = client(running)
        async with signed_on(term):
            big = await do(term, "consume", CARD, MICRO_LIMIT_FEN)
            assert big.code == "00"
            assert (await do(term, "consume", CARD, 100)).code == "61"
            fail_inserts(tmp_path, "fail_0400", "journal", "NEW.mti = '0400'")
            reversal = reversal_of(term, big.request_fields, "98")
            with pytest.raises(TerminalError):
                await term.send_fields("0400", reversal)
        assert await wait_until(lambda: icbc.balance_of(CARD) == start and settled(running), 5.0)
        drop_trigger(tmp_path, "fail_0400")
        async with term.connect():
            assert (await term.send_fields("0400", reversal)).code == "00"  # the terminal's retry
            assert (await do(term, "consume", CARD, 100)).code == "00"  # §13: minus reversals


async def test_consume_whose_commit_fails_gives_the_limit_headroom_back(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    start = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks, issuer_timeout=1.0) as running:
        async with signed_on(client(running)) as term:
            fail_inserts(tmp_path, "fail_big", "journal", f"NEW.txn = 'consume' AND NEW.amount_fen = {MICRO_LIMIT_FEN}")
            await no_answer(term, card_request(term, "consume", CARD, MICRO_LIMIT_FEN, pin=PIN[CARD]))
        assert await wait_until(lambda: icbc.balance_of(CARD) == start and settled(running), 10.0)
        drop_trigger(tmp_path, "fail_big")
        async with signed_on(client(running, first_stan=50)) as term:
            assert (await do(term, "consume", CARD, MICRO_LIMIT_FEN)).code == "00"
            assert (await do(term, "consume", CARD, 1)).code == "61"
        assert icbc.balance_of(CARD) == start - MICRO_LIMIT_FEN


# ---- duplicates and the orphan sweep racing a failed or taken-over commit -------------------
def twin(running: Running, term: TerminalClient) -> TerminalClient:
    """A second connection of the same terminal: same keys, batch and STAN counter (no sign-on)."""
    other = client(running, first_stan=term.next_stan)
    other.keys, other.key_mode, other.batch = term.keys, term.key_mode, term.batch
    return other


async def test_copy_waiting_on_a_first_whose_commit_fails_is_processed_once_more(tmp_path: Path) -> None:
    """A retransmission on another connection waits for the first copy (§11); the first's journal
    commit fails (its issuer debit is reversed), so the copy is processed on its own: the issuer
    ends with one net debit and the journal with one approval, the copy's."""
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    start = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks, issuer_timeout=3.0) as running:
        term = client(running)
        async with signed_on(term):
            pass
        other = twin(running, term)
        mti, fields = card_request(term, "consume", CARD, 1_700, pin=PIN[CARD])
        frame, _ = term.build_frame(mti, fields, mac=True)
        fail_inserts(tmp_path, "fail_first", "journal", "NEW.txn = 'consume' AND NEW.amount_fen = 1700")
        answers: dict[str, Response | None] = {}

        async def send(name: str, t: TerminalClient) -> None:
            try:
                answers[name] = await t.send_raw(frame)
            except TerminalError:
                answers[name] = None

        gate1 = icbc.hold(CARD)
        async with term.connect(), other.connect(), anyio.create_task_group() as tg:
            tg.start_soon(send, "first", term)
            assert await wait_until(lambda: icbc.frames_received >= 1 and intents(running) == 1)
            tg.start_soon(send, "copy", other)
            assert await wait_until(lambda: metric(exposition(running), "switch_requests_in_flight") == 2)
            gate2 = icbc.hold(CARD)  # the copy's own issuer request (and the first's reversal) wait here
            gate1.set()
            assert await wait_until(lambda: metric(exposition(running), "switch_store_write_failures_total") >= 1)
            drop_trigger(tmp_path, "fail_first")
            gate2.set()
        assert answers["first"] is None
        copy = answers["copy"]
        assert copy is not None and copy.code == "00" and copy.mac_ok is True
        assert await wait_until(lambda: settled(running) and icbc.balance_of(CARD) == start - 1_700, 10.0)
        assert len(icbc.applied("consume")) == 2 and len(icbc.applied("reversal")) == 1
        assert [(r["state"], r["amount_fen"]) for r in journal(running, "txn = 'consume'")] == [("approved", 1_700)]


async def test_intent_taken_over_by_a_sweep_while_at_the_issuer_is_never_journaled_approved(
    tmp_path: Path,
) -> None:
    """Another process's orphan sweep (shared store) promotes this request's intent while the
    consume is at the issuer: the approval must not be journaled (IntentTakenOver), the terminal
    gets no answer and the queued reversal restores the card."""
    from switch.pipeline.saf import StoreAndForward

    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    start = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks, issuer_timeout=3.0) as running:
        async with signed_on(client(running)) as term:
            gate = icbc.hold(CARD)
            outcome: list[object] = []

            async def send() -> None:
                try:
                    outcome.append(await term.send_fields(*card_request(term, "consume", CARD, 2_900, pin=PIN[CARD])))
                except TerminalError as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                assert await wait_until(lambda: intents(running) == 1 and icbc.frames_received >= 1)
                sweeper = StoreAndForward(running.store, {}, running.metrics)
                await running.store.write(sweeper.op_promote_intents())  # the other process's sweep
                assert intents(running) == 0
                gate.set()
            assert isinstance(outcome[0], TerminalError), outcome
        assert await wait_until(lambda: settled(running) and icbc.balance_of(CARD) == start, 10.0)
        assert [e.reverses for e in icbc.applied("reversal")] == ["consume"]
        assert journal(running, "txn = 'consume' AND state = 'approved'") == []
        assert metric(exposition(running), "switch_store_write_failures_total") >= 1


# ---- store-and-forward through a flapping link and unexpected answers -----------------------
async def lost_answer_consume(term: TerminalClient, icbc: MockIssuer, amount_fen: int) -> Response:
    """A consume the issuer applies without answering (``blackhole``), then the issuer goes silent."""
    icbc.behaviour = "blackhole"
    r = await do(term, "consume", CARD, amount_fen)
    icbc.behaviour = "silent"
    assert r.code == "98"
    return r


async def test_queued_reversal_survives_a_flapping_link_and_applies_once(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    seen = record_mtis(icbc)
    start = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks, issuer_timeout=0.5) as running:
        async with signed_on(client(running)) as term:
            await lost_answer_consume(term, icbc, 2_300)
            assert await wait_until(lambda: bool(saf_rows(running)) and saf_rows(running)[0]["attempts"] >= 1)
            # the issuer answers again, but every reply is cut mid-frame and the link drops
            icbc.faults.set(disconnect_mid_message=True)
            icbc.behaviour = "normal"
            assert await wait_until(lambda: icbc.faults.counts.get("disconnected", 0) >= 2, 10.0)
            assert saf_rows(running)[0]["state"] == "pending"
            assert icbc.balance_of(CARD) == start  # applied by the first cut-off attempt
            icbc.faults.clear()
            assert await wait_until(lambda: saf_rows(running)[0]["state"] == "done", 10.0), saf_rows(running)
            assert (await do(term, "consume", CARD, 100)).code == "00"  # the link serves again
        assert len(icbc.applied("reversal")) == 1
        assert icbc.balance_of(CARD) == start - 100
        assert {m.mti for m in seen if m.mti.startswith("04")} <= {"0400", "0401"}


async def test_reversal_answered_96_is_retried_until_acknowledged(tmp_path: Path) -> None:
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    start = icbc.balance_of(CARD)
    answers = iter(["96", "96"])
    inner = icbc.handle

    def handle(mti: str, fields: dict[int, Any]) -> Any:
        if mti in ("0400", "0401") and icbc.behaviour == "normal":
            code = next(answers, None)
            if code is not None:  # answered without applying anything
                return "0410", {**{k: fields[k] for k in (3, 4, 7, 11, 32, 37, 41, 42, 49) if k in fields}, 39: code}
        return inner(mti, fields)

    icbc.handle = handle  # type: ignore[method-assign]
    async with in_process_demo(tmp_path, mocks, issuer_timeout=0.5) as running:
        async with signed_on(client(running)) as term:
            await lost_answer_consume(term, icbc, 2_400)
            icbc.behaviour = "normal"
            assert await wait_until(lambda: saf_rows(running)[0]["state"] == "done", 15.0), saf_rows(running)
        row = saf_rows(running)[0]
        assert row["attempts"] >= 3 and row["last_response"] == "00"
        assert icbc.balance_of(CARD) == start and len(icbc.applied("reversal")) == 1


async def test_reversal_refused_with_another_code_is_set_aside_for_reconciliation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Debatable but documented (saf.py): an answer other than 00/25/91/96 to a queued reversal is
    final, ``refused``, and logged as an error for reconciliation; the money stays where it is."""
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    start = icbc.balance_of(CARD)
    inner = icbc.handle

    def handle(mti: str, fields: dict[int, Any]) -> Any:
        if mti in ("0400", "0401") and icbc.behaviour == "normal":
            return "0410", {**{k: fields[k] for k in (3, 4, 7, 11, 32, 37, 41, 42, 49) if k in fields}, 39: "05"}
        return inner(mti, fields)

    icbc.handle = handle  # type: ignore[method-assign]
    async with in_process_demo(tmp_path, mocks, issuer_timeout=0.5) as running:
        async with signed_on(client(running)) as term:
            await lost_answer_consume(term, icbc, 2_600)
            icbc.behaviour = "normal"
            assert await wait_until(lambda: saf_rows(running)[0]["state"] != "pending", 10.0)
        row = saf_rows(running)[0]
        assert (row["state"], row["last_response"], row["attempts"]) == ("refused", "05", row["attempts"])
        assert icbc.balance_of(CARD) == start - 2_600  # not reversed: left for reconciliation
        assert any(r.levelname == "ERROR" and "reconcile" in r.getMessage() for r in caplog.records)
        assert [r["state"] for r in journal(running, "txn = 'consume'")] == ["reversed"]


# ---- management while a request is at the issuer, management whose commit fails -------------
async def test_sign_off_while_a_consume_is_at_the_issuer(tmp_path: Path) -> None:
    """§1 allows several requests in flight: a sign-off (0820/002) overtakes a consume at the issuer.
    Whatever the consume's answer, the terminal must be able to trust it: an approval carries a
    MAC that verifies under the keys the request was sent with (§6.1), or the money is given back."""
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    start = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks, issuer_timeout=3.0) as running:
        async with signed_on(client(running)) as term:
            gate = icbc.hold(CARD)
            answers: dict[str, Response] = {}

            async def consume() -> None:
                answers["consume"] = await term.send_fields(*card_request(term, "consume", CARD, 1_300, pin=PIN[CARD]))

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                assert await wait_until(lambda: intents(running) == 1 and icbc.frames_received >= 1)
                off = {11: term.take_stan(), 41: term.tid, 42: term.mid, 60: f"00{term.batch}002"}
                answers["off"] = await term.send_fields("0820", off, mac=False)
                gate.set()
            assert answers["off"].code == "00"
            r = answers["consume"]
        assert await wait_until(lambda: settled(running), 5.0)
        if r.code == "00":
            assert r.mac_ok is True, f"approved 0210, F64 present: {64 in r.fields}, mac_ok={r.mac_ok}"
            assert icbc.balance_of(CARD) == start - 1_300
        else:
            assert icbc.balance_of(CARD) == start


async def test_parameter_download_whose_commit_fails_leaves_the_terminal_due(tmp_path: Path) -> None:
    mocks = demo_mocks()
    async with in_process_demo(tmp_path, mocks) as running:
        term = client(running)
        async with signed_on(term):
            echo = await term.echo_test()
            assert echo.code == "00" and echo.header_digit6 == 1  # the demo terminals never downloaded
            fail_inserts(tmp_path, "fail_download", "journal", "NEW.txn = 'parameter_download'")
            with pytest.raises(TerminalError):
                await term.parameter_download()
        drop_trigger(tmp_path, "fail_download")
        async with term.connect():
            again = await term.echo_test()
            assert again.code == "00"
            assert again.header_digit6 == 1


async def test_sign_on_whose_commit_fails_leaves_the_old_keys_working(tmp_path: Path) -> None:
    """The terminal never got the new keys: the ones it holds must keep working (decisions.md:
    keys are re-read from the store when a MAC does not verify)."""
    mocks = demo_mocks()
    icbc = mocks["ICBC"]
    start = icbc.balance_of(CARD)
    async with in_process_demo(tmp_path, mocks) as running:
        term = client(running)
        async with signed_on(term):
            fail_inserts(tmp_path, "fail_sign_on", "journal", "NEW.txn = 'sign_on'")
            with pytest.raises(TerminalError):
                await term.sign_on("003")
        drop_trigger(tmp_path, "fail_sign_on")
        async with term.connect():  # still the first sign-on's keys
            r = await do(term, "consume", CARD, 900)
            assert r.code == "00" and r.mac_ok is True
        assert icbc.balance_of(CARD) == start - 900


async def test_batch_upload_whose_store_write_fails_is_unanswered_and_the_retry_records_once(
    tmp_path: Path,
) -> None:
    mocks = demo_mocks()
    async with in_process_demo(tmp_path, mocks) as running:
        term = client(running)
        async with signed_on(term):
            consume = await do(term, "consume", CARD, 1_100)
            assert consume.code == "00"
            record = "00" + consume.stan + CARD.rjust(20, "0") + f"{1_100:012d}"
            upload = {11: term.take_stan(), 41: term.tid, 42: term.mid, 48: "01" + record, 60: f"00{term.batch}201"}
            fail_inserts(tmp_path, "fail_upload", "batch_uploads")
            with pytest.raises(TerminalError):
                await term.send_fields("0320", upload, mac=False)
            assert journal(running, "mti = '0320'") == []
        drop_trigger(tmp_path, "fail_upload")
        async with term.connect():
            again = await term.send_fields("0320", upload, mac=False)
            assert again.code == "00"
        assert len(running.store.query("SELECT * FROM batch_uploads")) == 1
        assert [r["response_code"] for r in journal(running, "mti = '0320'")] == ["00"]
