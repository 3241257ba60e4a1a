"""End of day over TCP (§9.4-§9.6): a terminal's sales, void and refund settle balanced, the batch
closes and the next sign-on opens the next batch; an unbalanced settlement answers the switch's
totals; the batch upload is answered 00."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CARD = "6214834474520070"  # CMB, PIN 888888


def settlement(term, debit: int, dn: int, credit: int, cn: int) -> dict:  # type: ignore[no-untyped-def]
    f48 = f"{debit:012d}{dn:03d}{credit:012d}{cn:03d}0" + "0" * 31
    return {11: term.take_stan(), 41: term.tid, 42: term.mid, 48: f48, 49: "156", 60: f"00{term.batch}201",
            63: "01 "}


async def test_end_of_day(tmp_path: Path) -> None:
    sw = DemoSwitch(tmp_path)
    sw.start()
    try:
        term = sw.terminal("20000001")
        async with term.connect():
            await term.sign_on("003")
            a = await term.consume(CARD, 10_000, pin="888888", entry="manual", expiry="2912")
            b = await term.consume(CARD, 2_000, pin="888888", entry="manual", expiry="2912")
            assert (await term.void(b, pin="888888")).code == "00"
            assert (await term.refund(a, 1_500)).code == "00"
            r = await term.send_fields("0500", settlement(term, 12_000, 2, 3_500, 2), mac=False)
            assert (r.mti, r.code) == ("0510", "00")
            assert str(r.fields[48])[:31] == "000000012000002000000003500002" + "1"
            up = {11: term.take_stan(), 41: term.tid, 42: term.mid, 48: "0000", 60: f"00{term.batch}207"}
            assert (await term.send_fields("0320", up, mac=False)).code == "00"
            # the batch is closed: the next sign-on opens 000002 and business goes on
            assert (await term.sign_on("003")).fields[60][2:8] == "000002"  # type: ignore[index]
            c = await term.consume(CARD, 700, pin="888888", entry="manual", expiry="2912")
            assert c.code == "00"
            wrong = await term.send_fields("0500", settlement(term, 1, 1, 0, 0), mac=False)
            assert wrong.code == "00" and str(wrong.fields[48])[:31] == "000000000700001000000000000000" + "2"
    finally:
        sw.kill()


async def test_format_errors_come_before_the_batch_lookup(demo: DemoSwitch) -> None:
    """specs/decisions.md: a 0500 with a bad F48 (step 7, 30) for a batch that is neither open nor
    settled (step 9, 25) is 30; the same for a well-formed F48 is 25. A 0320/201 whose record count
    is not 1-8, or whose F48 is shorter than its records, is 30."""
    term = demo.terminal("10000002")
    async with term.connect():
        assert (await term.sign_on("003")).code == "00"
        other = f"{(int(term.batch) + 5) % 1_000_000:06d}"
        short = settlement(term, 0, 0, 0, 0)
        short[48] = str(short[48])[:-1]
        short[60] = f"00{other}201"
        assert (await term.send_fields("0500", short, mac=False)).code == "30"
        elsewhere = settlement(term, 0, 0, 0, 0)
        elsewhere[60] = f"00{other}201"
        assert (await term.send_fields("0500", elsewhere, mac=False)).code == "25"
        record = "00" + "000001" + "6214834474520070".rjust(20, "0") + f"{100:012d}"
        for f48 in ("00", "09" + record * 8, "02" + record):
            upload = {11: term.take_stan(), 41: term.tid, 42: term.mid, 48: f48, 60: f"00{term.batch}201"}
            r = await term.send_fields("0320", upload, mac=False)
            assert (r.mti, r.code) == ("0330", "30"), f48[:2]
        ok = {11: term.take_stan(), 41: term.tid, 42: term.mid, 48: "01" + record, 60: f"00{term.batch}201"}
        assert (await term.send_fields("0320", ok, mac=False)).code == "00"
