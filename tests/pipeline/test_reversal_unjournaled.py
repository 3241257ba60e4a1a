"""A terminal's 0400 (protocol §11) for a request that has no journal row. When its journal commit
failed after the issuer was asked, the switch queued the reversal itself from the request's
write-ahead intent: the 0400 finds that queued reversal (by the request's TID|batch|STAN|MTI) and
is answered 00, "reversed by the switch", with nothing more sent. A write-ahead intent alone is
not enough: on a shared database it may be a request still at its issuer in another process, so
the 0400 gets 25 (no original), as for a request the switch never saw.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # fixtures come from conftest.py; its classes are imported for typing only
    from conftest import Harness

pytestmark = pytest.mark.anyio

CARD = "6222029375642931684"  # ICBC (§14)
REVERSAL_FIELDS = (2, 3, 4, 11, 14, 22, 25, 49, 60, 61, 38)


async def test_a_0400_finds_the_reversal_the_switch_queued_but_not_a_live_intent(harness: Harness) -> None:
    t = await harness.ready()
    sent: list[dict[int, object]] = []
    for stan in (t.take_stan(), t.take_stan(), t.take_stan()):
        f = t.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=500,
                          pin="123456", expiry="3012")
        f[11] = stan
        sent.append(dict(f))
    keys = [f"{t.tid}|{t.batch}|{f[11]}|0200" for f in sent]
    db = harness.store.db
    now = time.time()
    # the first: promoted to a queued reversal (its journal commit failed); the second: only an
    # intent (in flight somewhere); the third: nothing at all
    db.execute("INSERT INTO saf_queue (issuer, kind, mti, fields, journal_id, created_at, next_attempt, origin)"
               " VALUES ('ICBC', 'reversal', '0400', x'00', NULL, ?, ?, ?)", (now, now + 3600, keys[0]))
    db.execute("INSERT INTO intents (key, issuer, fields, created_at, origin) VALUES ('k', 'ICBC', x'00', ?, ?)",
               (now, keys[1]))
    reversals_before = len(harness.links["ICBC"].sent)
    codes = []
    for f in sent:
        r = {k: f[k] for k in REVERSAL_FIELDS if k in f}
        r.update({39: "98", 41: t.tid, 42: t.mid})
        codes.append((await harness.send(t, "0400", r, mac=True)).code)
    assert codes == ["00", "25", "25"]
    assert len(harness.links["ICBC"].sent) == reversals_before  # the 0400 itself sent nothing
    rows = harness.store.query("SELECT response_code, note FROM journal WHERE txn = 'reversal' ORDER BY id")
    assert rows[0]["response_code"] == "00" and rows[0]["note"].startswith("original never journaled")
