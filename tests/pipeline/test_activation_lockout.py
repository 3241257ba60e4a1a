"""The §9.1 activation lockout through TransactionManager.handle: five wrong codes from one peer
address within 10 minutes, then ``75`` for every activation from it (the right code too), counted
in the store so that every switch process on that store shares one count (issue 7).

A second "process" here is a second SwitchState and TransactionManager on a second SqliteStore
opened on the same database file, with its own group-commit writer, as ``switch serve`` builds it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from switch.adapters.sqlite_store import SqliteStore
from switch.crypto.activation import generate_terminal_key, public_key_der
from switch.crypto.keystore import MasterKey
from switch.pipeline.activation import MAX_WRONG, WINDOW_SECONDS, ActivationGuard
from switch.pipeline.context import SwitchState
from switch.pipeline.manager import TransactionManager
from switch.pos.client import TerminalClient
from tests.manager_io import round_trip
from tests.manager_io import second_process as shared_second_process

if TYPE_CHECKING:  # fixtures come from conftest.py; its classes are imported for typing only
    from conftest import Harness, RecordingMetrics

pytestmark = pytest.mark.anyio

RIGHT_CODE = "48213579"  # 20000002's one-time code (§14)
ATTACKER, NEIGHBOUR = "192.0.2.66", "198.51.100.7"
_PUBLIC_KEY: list[bytes] = []


def public_key() -> bytes:
    if not _PUBLIC_KEY:  # one RSA key for the module: generating one costs ~0.1 s
        _PUBLIC_KEY.append(public_key_der(generate_terminal_key()))
    return _PUBLIC_KEY[0]


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def activate(manager: TransactionManager, code: str, peer: str, stan: int) -> str:
    """One 0800/351 from ``peer`` through the manager; its F39."""
    client = TerminalClient("127.0.0.1", 1, " " * 8, " " * 15, bytes(16))
    raw, _ = client.build_frame("0800", {11: f"{stan:06d}", 41: " " * 8, 42: " " * 15, 60: "00000001351",
                                         62: code.encode() + public_key()}, mac=False)
    _, fields = await round_trip(manager, raw, peer)
    code39 = fields[39]
    assert isinstance(code39, str)
    return code39


def wrong_code(i: int) -> str:
    return f"{11_111_110 + i}"


@asynccontextmanager
async def second_process(h: Harness, tmp_path: Path) -> AsyncIterator[TransactionManager]:
    """Another switch process on the harness's database file, on the harness's clock."""
    async with shared_second_process(h.state, tmp_path / "switch.db", h.metrics) as (manager, state):
        state.activation_guard = ActivationGuard(h.state.activation_guard.clock)
        yield manager


class CountingMetrics:
    """Activation failures reported to the harness's metrics, by reason."""

    def __init__(self, metrics: RecordingMetrics) -> None:
        self.reasons: list[str] = []
        metrics.activation_failure = self.reasons.append  # type: ignore[method-assign]


async def test_five_wrong_codes_then_75_even_for_the_right_code(harness: Harness) -> None:
    counted = CountingMetrics(harness.metrics)
    codes = [await activate(harness.manager, wrong_code(i), ATTACKER, 100 + i) for i in range(MAX_WRONG)]
    assert codes == ["97"] * MAX_WRONG
    assert await activate(harness.manager, RIGHT_CODE, ATTACKER, 200) == "75"
    assert counted.reasons == ["wrong_code"] * MAX_WRONG + ["lockout"]
    # the count is the store's, per address: another address is not locked out
    assert harness.store.activation_failures_since(ATTACKER, 0.0) == MAX_WRONG
    assert await activate(harness.manager, RIGHT_CODE, NEIGHBOUR, 300) == "00"


@pytest.mark.parametrize("bad", ["4821357", "4821357X", "4821 579", "--------"])
async def test_a_code_that_is_not_8_digits_is_a_wrong_code(harness: Harness, bad: str) -> None:
    """§9.1: a mistyped code (seven digits, a letter, a space) is a wrong code: 97, and it counts
    toward the lockout like any other guess (not a 30 that an attacker could repeat for free)."""
    counted = CountingMetrics(harness.metrics)
    codes = [await activate(harness.manager, bad, ATTACKER, 100 + i) for i in range(MAX_WRONG)]
    assert codes == ["97"] * MAX_WRONG
    assert harness.store.activation_failures_since(ATTACKER, 0.0) == MAX_WRONG
    assert await activate(harness.manager, RIGHT_CODE, ATTACKER, 200) == "75"
    assert counted.reasons == ["wrong_code"] * MAX_WRONG + ["lockout"]


async def test_a_right_code_with_a_key_that_does_not_load_is_30_and_the_code_stays_valid(
    harness: Harness,
) -> None:
    client = TerminalClient("127.0.0.1", 1, " " * 8, " " * 15, bytes(16))
    raw, _ = client.build_frame("0800", {11: "000100", 41: " " * 8, 42: " " * 15, 60: "00000001351",
                                         62: RIGHT_CODE.encode() + b"not a DER key"}, mac=False)
    _, fields = await round_trip(harness.manager, raw, ATTACKER)
    assert fields[39] == "30"
    assert harness.store.activation_failures_since(ATTACKER, 0.0) == 0
    assert await activate(harness.manager, RIGHT_CODE, ATTACKER, 101) == "00"


async def test_the_window_slides_and_a_right_code_does_not_clear_it(harness: Harness) -> None:
    clock = FakeClock()
    harness.state.activation_guard = ActivationGuard(clock)
    for i in range(MAX_WRONG - 1):
        assert await activate(harness.manager, wrong_code(i), ATTACKER, 100 + i) == "97"
        clock.now += 60
    # four wrong codes at t0, +60 .. +180; a right code is accepted and does not reset the count
    assert await activate(harness.manager, RIGHT_CODE, ATTACKER, 150) == "00"
    assert await activate(harness.manager, RIGHT_CODE, ATTACKER, 151) == "97"  # used now: the fifth
    assert await activate(harness.manager, wrong_code(9), ATTACKER, 152) == "75"
    # 10 minutes after the first wrong code it leaves the window: one more attempt is let through
    clock.now = 1_700_000_000.0 + WINDOW_SECONDS + 1
    assert await activate(harness.manager, wrong_code(10), ATTACKER, 160) == "97"
    assert await activate(harness.manager, wrong_code(11), ATTACKER, 161) == "75"


async def test_wrong_codes_spread_over_two_processes_share_one_count(harness: Harness, tmp_path: Path) -> None:
    """Three wrong codes at one process and two at the other lock the address out at both (with
    per-process counters each would still let a guess through)."""
    async with second_process(harness, tmp_path) as other:
        managers = [harness.manager, harness.manager, other, harness.manager, other]
        codes = [await activate(m, wrong_code(i), ATTACKER, 100 + i) for i, m in enumerate(managers)]
        assert codes == ["97"] * MAX_WRONG
        assert await activate(other, RIGHT_CODE, ATTACKER, 200) == "75"
        assert await activate(harness.manager, RIGHT_CODE, ATTACKER, 201) == "75"


async def test_a_fifth_wrong_code_counted_meanwhile_by_another_process_makes_this_one_a_lockout(
    harness: Harness, tmp_path: Path
) -> None:
    """The race the atomic count-and-insert settles: this process finds four wrong codes (not
    locked), another process counts the fifth before this one records its own; this attempt is
    then answered 75 (a sixth guess is never answered 97) and is not counted."""
    counted = CountingMetrics(harness.metrics)
    for i in range(MAX_WRONG - 1):
        assert await activate(harness.manager, wrong_code(i), ATTACKER, 100 + i) == "97"
    other = SqliteStore(tmp_path / "switch.db", MasterKey(bytes(range(32))))
    other.open()

    class Interleaved(ActivationGuard):
        def locked(self, store: SqliteStore, peer: str, now: float) -> bool:
            answer = super().locked(store, peer, now)
            assert other.add_activation_failure(peer, now, now - WINDOW_SECONDS, MAX_WRONG)
            return answer

    try:
        harness.state.activation_guard = Interleaved()
        assert await activate(harness.manager, wrong_code(8), ATTACKER, 200) == "75"
    finally:
        other.close()
    assert counted.reasons == ["wrong_code"] * (MAX_WRONG - 1) + ["lockout"]
    assert harness.store.activation_failures_since(ATTACKER, 0.0) == MAX_WRONG


async def test_a_code_kept_by_an_older_version_still_activates(harness: Harness) -> None:
    """Codes are kept as a keyed HMAC (``code_token``); one issued before that, kept as the plain
    SHA-256 a store of an older version holds, still works for the rest of its 24 hours. A wrong
    code is still wrong either way."""
    from switch.adapters.sqlite_store import legacy_code_hash

    harness.store.db.execute("UPDATE terminals SET activation_code_hash = ? WHERE tid = '20000002'",
                             (legacy_code_hash(RIGHT_CODE),))
    assert await activate(harness.manager, wrong_code(1), NEIGHBOUR, 1) == "97"
    assert await activate(harness.manager, RIGHT_CODE, NEIGHBOUR, 2) == "00"


async def test_one_code_activates_one_device_when_two_arrive_at_once(harness: Harness) -> None:
    """Two devices send 20000002's code at the same moment (other STANs, other keys): one gets the
    TMK, the other 97, in one process as across processes (the code is used up atomically in the
    store before the answer; before, both read it before either commit and both got a TMK, found
    by a stress review with two processes). The loser meets a used code, counted as any is."""
    got: list[str] = []

    async def one(stan: int, peer: str) -> None:
        got.append(await activate(harness.manager, RIGHT_CODE, peer, stan))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, 1, ATTACKER)
        tg.start_soon(one, 2, NEIGHBOUR)
    assert sorted(got) == ["00", "97"]
    rows = harness.store.query("SELECT state, activation_code_hash FROM terminals WHERE tid = '20000002'")
    assert (rows[0]["state"], rows[0]["activation_code_hash"]) == ("active", None)
