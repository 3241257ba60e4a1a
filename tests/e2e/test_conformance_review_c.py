"""Conformance review (C): the §6 key, §3 track nibbles, §4 F53 digit 1 and §9.1 activation codes,
over TCP against the real ``switch demo``.

Each test drives the switch exactly as protocol.md says and asserts what the contract says; the
choices the contract leaves open are the ones written in specs/decisions.md.

Must not: sleep as an assertion, print a PIN or a full PAN, or edit anything but this file.
"""

from __future__ import annotations

import pytest

from switch.crypto.activation import generate_terminal_key, public_key_der
from switch.pos.client import TerminalClient

from .conftest import DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CARD = "6222029375642931684"  # ICBC, PIN 123456, expiry 3012
TRACK2 = CARD + "=30121010000000000"
TRACK3 = "99" + CARD + "=1561560000000000000003000000214=000000000000=000000000000=0000000000"


def consume(term: TerminalClient, *, pin: bool = True, track2: str = TRACK2) -> dict:
    return term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=1,
                            pin="123456" if pin else None, expiry="3012", track2=track2)


# ---- §6: the key is MTI + 60.3 (management) / MTI + F3 + F25 + 60.1 (financial) -----------------
async def test_management_key_ignores_60_1_and_financial_key_ignores_60_3(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        r = await term.send_fields("0800", {11: term.take_stan(), 41: term.tid, 42: term.mid,
                                            60: "01" + term.batch + "003"}, mac=False)
        assert (r.mti, r.code) == ("0810", "00") and isinstance(r.fields.get(62), bytes)
        assert (await term.sign_on("003")).code == "00"  # the client keeps the keys of its own
        f = consume(term)
        f[60] = "22" + term.batch + "001"
        sale = await term.send_fields("0200", f)
        assert sale.code == "00" and sale.fields[60] == f[60]  # §5: field 60 echoed as sent
        echo = await term.send_fields("0820", {11: term.take_stan(), 41: term.tid, 42: term.mid,
                                               60: "99" + term.batch + "301"}, mac=False)
        assert (echo.mti, echo.code) == ("0830", "00")


# ---- §3 / §12.1 step 1: a clear track with a non-digit nibble ---------------------------------
async def test_clear_track2_with_a_hex_nibble_is_30_at_step_1_before_77(demo: DemoSwitch) -> None:
    """Step 1 (format) comes before step 4 (signed on): a signed-off terminal gets 30, not 77."""
    term = demo.terminal("10000002")
    async with term.connect():
        await term.sign_on("003")
        assert (await term.sign_off()).code == "00"
        good = await term.send_fields("0200", consume(term, pin=False))
        assert good.code == "77"
        r = await term.send_fields("0200", consume(term, pin=False, track2=TRACK2[:-1] + "A"))
        assert (r.mti, r.code) == ("0210", "30")
        assert {11, 39, 41} <= set(r.fields) and 35 not in r.fields


async def test_clear_track3_with_a_hex_nibble_is_30(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume(term, pin=False)
        f[36] = TRACK3
        assert (await term.send_fields("0200", f)).code == "00"  # a clean track 3 is accepted
        f = consume(term, pin=False)
        f[36] = TRACK3[:-1] + "B"
        assert (await term.send_fields("0200", f)).code == "30"


async def test_encrypted_track3_that_does_not_decrypt_is_30(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("004")
        f = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=1,
                             expiry="3012", encrypt_track=True)
        assert str(f[53])[2] == "1"
        f[36] = "0123456789ABCDEF0123456789ABCDEF"  # hex, but not a track under this TDK
        assert (await term.send_fields("0200", f)).code == "30"


# ---- §4 F53 digit 1: 2 with a PIN, else 0 ------------------------------------------------------
async def test_f53_digit1_must_say_whether_a_pin_block_is_carried(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        with_pin = consume(term)
        assert str(with_pin[53])[0] == "2"
        with_pin[53] = "0" + str(with_pin[53])[1:]
        r = await term.send_fields("0200", with_pin)
        assert r.code == "30" and 64 not in r.fields
        without_pin = consume(term, pin=False)
        without_pin[53] = "2600000000000000"
        assert (await term.send_fields("0200", without_pin)).code == "30"
        without_pin[53] = "0600000000000000"  # declared: no PIN, double-length keys
        without_pin[11] = term.take_stan()
        assert (await term.send_fields("0200", without_pin)).code == "00"


# ---- §9.1: a code that is not 8 digits is a wrong code -----------------------------------------
async def test_activation_code_that_is_not_8_digits_is_97(demo: DemoSwitch) -> None:
    key = public_key_der(generate_terminal_key())
    term = TerminalClient("127.0.0.1", demo.port, " " * 8, " " * 15, bytes(16))
    term.next_stan = 950001
    for code in (b"4821357", b"4821357X"):
        r = await term.send_fields("0800", {11: term.take_stan(), 41: " " * 8, 42: " " * 15,
                                            60: "00000001351", 62: code + key}, mac=False, oneshot=True)
        assert (r.mti, r.code) == ("0810", "97")
        assert set(r.fields) == {11, 39, 60}


async def test_activation_30_layout_and_digit6_follow_f41(demo: DemoSwitch) -> None:
    """§6.1: a 30 carries 11, 39, 41 and the echo list; §2 digit 6 of a 30 is that of the terminal
    F41 names (decisions.md): 3 for 20000002 (no keys yet), 0 for spaces (no terminal)."""
    for stan, tid, mid, digit6 in ((960001, "20000002", "898310058120002", 3), (960002, " " * 8, " " * 15, 0)):
        term = TerminalClient("127.0.0.1", demo.port, tid, mid, bytes(16))
        term.next_stan = stan  # without F62 both would share one duplicate key (§11): not the point here
        r = await term.send_fields("0800", {11: term.take_stan(), 41: tid, 42: mid, 60: "00000001351"},
                                   mac=False, oneshot=True)  # no F62
        assert (r.mti, r.code) == ("0810", "30")
        assert set(r.fields) == {11, 39, 41, 42, 60} and r.fields[41] == tid
        assert r.header_digit6 == digit6
