"""Duplicates (§11) when several processes share the store (PostgreSQL, where keys are claimed in
the database): a copy of a request whose first transmission another process answered between the
copy's look at the journal and its claim on the key gets the first's answer, and never reaches the
issuer a second time. Seen under load in the two-process e2e test (two approvals, two RRNs).

The second "process" is a second SwitchState and TransactionManager on the same database file
(tests/manager_io.py); its claims stand in for the database's at the moment the race leaves them:
the first process's journal commit has released the key, so the claim succeeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.manager_io import round_trip, second_process

if TYPE_CHECKING:  # fixtures come from conftest.py; its classes are imported for typing only
    from conftest import Harness

pytestmark = pytest.mark.anyio

CARD = "6222029375642931684"  # ICBC (§14)


class ReleasedClaims:
    """Dup claims of a shared database in which every key is free (its holder committed)."""

    def __init__(self) -> None:
        self.claimed: list[str] = []
        self.released: list[str] = []

    def claim(self, key: str, digest: str) -> str | None:
        self.claimed.append(key)
        return None

    def release(self, key: str) -> None:
        self.released.append(key)

    def held(self, prefix: str, mtis: tuple[str, ...]) -> bool:
        return False

    @staticmethod
    def op_release(key: str) -> Any:
        return lambda db: None

    def close(self) -> None:
        pass


async def test_a_copy_answered_elsewhere_just_before_its_claim_gets_that_answer(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = await harness.ready()
    f = t.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=1_234,
                      pin="123456", expiry="3012")
    raw, _ = t.build_frame("0200", f, mac=True)
    first = await harness.exchange(raw)
    assert first is not None and first.code == "00"
    sent = len(harness.links["ICBC"].sent)
    async with second_process(harness.state, tmp_path / "switch.db", harness.metrics) as (other, state):
        claims = ReleasedClaims()
        state.dup_claims = claims  # type: ignore[assignment]
        store = state.store
        assert store is not None
        query = store.query
        looks: list[str] = []

        def journal_not_yet(sql: str, args: tuple[Any, ...] = ()) -> Any:
            if "WHERE dup_key" in sql:
                looks.append(sql)
                if len(looks) == 1:
                    return []  # the first's journal row was not committed yet at the first look
            return query(sql, args)

        monkeypatch.setattr(store, "query", journal_not_yet)
        mti, again = await round_trip(other, raw)
    assert mti == "0210"
    assert len(harness.links["ICBC"].sent) == sent  # the issuer saw the purchase once
    assert (again[39], again[37], again[38]) == ("00", first.fields[37], first.fields[38])
    key = claims.claimed[0]
    assert claims.released == [key]  # the copy's own claim, given back: it processed nothing
    assert len(looks) == 2
    rows = harness.store.query("SELECT rrn, state FROM journal WHERE txn = 'consume' ORDER BY id")
    assert [(r["rrn"], r["state"]) for r in rows] == [(first.fields[37], "approved"), (None, "duplicate")]
