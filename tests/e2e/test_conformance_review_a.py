"""Conformance review (A) of the switch against protocol §1-§6.1, §8, §10, §12 and §12.1.

Owns: tests that drive the real ``switch demo`` over TCP exactly as the contract says and assert
what the CONTRACT says (field sets per response type, echo rules, header digit 6, the 40 / close
rules, F53, mandatory fields, the order of checks, PIN block, sign-on key layouts, sign-off and
revocation, five MAC failures). Where the switch differs, the test is a strict xfail naming the
section and what the switch does instead.

Must not: edit or depend on switch internals beyond the codec, framing, crypto helpers and the
terminal client; sleep as an assertion; log or print a PIN or a full PAN.
"""

from __future__ import annotations

import pytest

from switch.core.codec import Codec, Fields, load_dialect
from switch.core.framing import encode_frame
from switch.crypto.des import check_value, des_ecb_decrypt, des_ecb_encrypt
from switch.pos.client import Response, TerminalClient

from .conftest import DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CODEC = Codec(load_dialect("terminal"))
CARD = "6222029375642931684"  # ICBC, PIN 123456, 3012
CARD_BOC = "6216611771534246833"  # route configured, link down -> 91
CARD_NO_ROUTE = "4111237450925694"
ACQ = "48521000"
ECHO = {2, 3, 4, 11, 25, 41, 42, 49, 60}
FIN_DECLINE = {2, 3, 4, 11, 12, 13, 15, 25, 32, 37, 39, 41, 42, 44, 49, 60, 63}


def consume_fields(term: TerminalClient, *, pin: bool = True, card: str = CARD, amount: int = 1234,
                   type_code: str = "22", entry: str = "swipe") -> Fields:
    return term.card_fields(processing_code="000000", type_code=type_code, card=card, amount_fen=amount,
                            pin="123456" if pin else None, expiry="3012", entry=entry)


async def send_bad_mac(term: TerminalClient, fields: Fields) -> Response:
    bad = dict(fields)
    bad[64] = b"\x00" * 8
    return await term.send_fields("0200", bad, mac=False)


def raw_frame(term: TerminalClient, mti: str, fields: Fields) -> bytes:
    return encode_frame(term.tpdu, term.header, CODEC.encode(mti, dict(sorted(fields.items()))))


# ---- §6.1 field sets ------------------------------------------------------------------------
async def test_sign_on_response_fields_and_key_layouts(demo: DemoSwitch) -> None:
    """§6.1 0810 sign-on: 11 12 13 32 37 39 41 42 60 62; §8 layouts and check values under the TMK."""
    term = demo.terminal("10000002")
    tmk = term._tmk
    lengths = {"001": 24, "003": 40, "004": 60}
    async with term.connect():
        for mode, length in lengths.items():
            r = await term.sign_on(mode)
            assert r.code == "00" and r.mti == "0810"
            assert set(r.fields) == {11, 12, 13, 32, 37, 39, 41, 42, 60, 62}
            assert r.fields[32] == ACQ and len(str(r.fields[37])) == 12
            assert str(r.fields[60])[8:11] == mode and str(r.fields[60])[2:8] == term.batch
            f62 = r.fields[62]
            assert isinstance(f62, bytes) and len(f62) == length
            pik_len = 8 if mode == "001" else 16
            pik = des_ecb_decrypt(tmk, f62[:pik_len])
            assert f62[pik_len:pik_len + 4] == check_value(pik)[:4]
            mak = des_ecb_decrypt(tmk, f62[pik_len + 4:pik_len + 12])
            off = pik_len + 12
            if mode != "001":
                assert f62[off:off + 8] == bytes(8)
                off += 8
            assert f62[off:off + 4] == check_value(mak)[:4]
            if mode == "004":
                tdk = des_ecb_decrypt(tmk, f62[off + 4:off + 20])
                assert f62[off + 20:off + 24] == check_value(tdk)[:4]
            assert term.keys is not None and term.keys.mak == mak


async def test_sign_on_decline_keeps_sign_on_layout(demo: DemoSwitch) -> None:
    """§6.1: a 03 sign-on (F42 not the terminal's merchant) still carries 11 12 13 32 37 39 41 42 60, no 62."""
    term = demo.terminal("10000002")
    fields = {11: term.take_stan(), 41: term.tid, 42: "898310058120002", 60: "00000001003"}
    r = await term.send_fields("0800", fields, mac=False, oneshot=True)
    assert r.code == "03"
    assert set(r.fields) == {11, 12, 13, 32, 37, 39, 41, 42, 60}


async def test_echo_and_parameter_download_field_sets(demo: DemoSwitch) -> None:
    """§6.1: 0830 = 11 12 13 39 41 42 60; 0810 parameter download = 11 39 41 42 60 62; §2 digit 6."""
    term = demo.terminal("20000001")
    async with term.connect():
        assert (await term.sign_on("003")).code == "00"
        e = await term.echo_test()
        assert e.mti == "0830" and set(e.fields) == {11, 12, 13, 39, 41, 42, 60}
        assert e.header_digit6 == 1  # signed on, parameters never downloaded
        p = await term.parameter_download()
        assert p.code == "00" and set(p.fields) == {11, 39, 41, 42, 60, 62}
        assert p.header_digit6 == 0
        e2 = await term.echo_test()
        assert e2.header_digit6 == 0


async def test_echo_test_without_f11(demo: DemoSwitch) -> None:
    """§6.1: echo test 11 is C; the 0830 echoes 11 only when the request carried it."""
    term = demo.terminal("10000001")
    r = await term.send_raw(raw_frame(term, "0820", {41: term.tid, 42: term.mid, 60: "00000001301"}),
                            oneshot=True)
    assert r is not None and r.code == "00" and 11 not in r.fields
    assert set(r.fields) == {12, 13, 39, 41, 42, 60}


async def test_approved_consume_field_set(demo: DemoSwitch) -> None:
    """§6.1: echoes + 12 13 15 32 37 38 39 44 63 64; F2 from track 2; nothing of 22/26/35/52/53."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        r = await term.send_fields("0200", consume_fields(term))
        assert r.code == "00", r
        assert set(r.fields) == FIN_DECLINE | {38, 64}
        assert r.fields[2] == CARD and r.mac_ok is True
        assert r.fields[44] == "ICBC".ljust(11) + ACQ.ljust(11) and r.fields[63] == "CUP"
        assert r.fields[32] == ACQ and len(str(r.fields[38]).strip()) == 6


async def test_decline_field_sets_no_route_and_link_down(demo: DemoSwitch) -> None:
    """§6.1 / §4 F44: a 15 names no issuer (spaces), a 91 names the chosen issuer; no 38, no 64."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        r15 = await term.send_fields("0200", consume_fields(term, pin=False, card=CARD_NO_ROUTE))
        assert r15.code == "15"
        assert set(r15.fields) == FIN_DECLINE and r15.fields[44] == " " * 11 + ACQ.ljust(11)
        r91 = await term.send_fields("0200", consume_fields(term, pin=False, card=CARD_BOC))
        assert r91.code == "91"
        assert set(r91.fields) == FIN_DECLINE and r91.fields[44] == "BOC".ljust(11) + ACQ.ljust(11)


async def test_unknown_financial_key_is_40_with_financial_layout(demo: DemoSwitch) -> None:
    """§6: 0200 key not in the table -> 40; §6.1 declines before routing: echoes + 12 13 15 32 37 39 44 63."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        r = await term.send_fields("0200", consume_fields(term, pin=False, type_code="98", entry="manual"))
        assert r.code == "40" and r.mti == "0210"
        assert set(r.fields) == FIN_DECLINE and 64 not in r.fields
        assert r.fields[44] == " " * 11 + ACQ.ljust(11)


async def test_unknown_management_key_is_40(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    r = await term.send_fields("0800", {11: term.take_stan(), 41: term.tid, 42: term.mid, 60: "00000001999"},
                               mac=False, oneshot=True)
    assert r.code == "40" and r.mti == "0810"


async def test_sign_on_response_f2_not_echoed(demo: DemoSwitch) -> None:
    """§6.1: a field not listed for a type is ignored, never echoed, never a 30."""
    term = demo.terminal("10000002")
    r = await term.send_fields("0800", {2: CARD, 4: "000000000100", 11: term.take_stan(), 41: term.tid,
                                        42: term.mid, 60: "00000001003"}, mac=False, oneshot=True)
    assert r.code == "00" and 2 not in r.fields and 4 not in r.fields


# ---- §6.1 swiped-card F2 on declines before routing ---------------------------------------
@pytest.mark.parametrize("decline", ["03", "40", "77", "A0"])
async def test_swipe_decline_before_routing_carries_f2(demo: DemoSwitch, decline: str) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        fields = consume_fields(term, pin=False, type_code="98" if decline == "40" else "22")
        if decline == "03":
            fields[42] = "898310058120002"
        if decline == "77":
            fields[60] = "22999999000"
        if decline == "A0":
            r = await send_bad_mac(term, fields)
        else:
            r = await term.send_fields("0200", fields)
        assert r.code == decline and 64 not in r.fields
        assert set(r.fields) == FIN_DECLINE and r.fields.get(2) == CARD


async def test_a0_field_set_without_f2(demo: DemoSwitch) -> None:
    """§6.1 / §10.1: A0 (manual entry) carries the financial decline layout, no 64."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        r = await send_bad_mac(term, consume_fields(term, pin=False, entry="manual"))
        assert r.code == "A0" and set(r.fields) == FIN_DECLINE and 64 not in r.fields


# ---- §12.1 step 7: the 30 answer layout ---------------------------------------------------
async def test_mandatory_field_30_layout(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        fields = consume_fields(term, pin=False)
        del fields[49]
        r = await term.send_fields("0200", fields)
        assert r.code == "30"
        assert set(r.fields) <= ECHO | {39} and {11, 39, 41} <= set(r.fields)


async def test_decode_error_30_layout_and_digit6(demo: DemoSwitch) -> None:
    """§3: non-digit nibble in an n field after F41 -> 30 with 11, 39, 41 (+ echo list), §2 digit 6."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        frame, _ = term.build_frame("0200", consume_fields(term), mac=True)
        f53 = bytes.fromhex("2600000000000000")
        assert frame.count(f53) == 1
        r = await term.send_raw(frame.replace(f53, bytes.fromhex("2A00000000000000")))
        assert r is not None and r.code == "30" and r.mti == "0210"
        assert {11, 39, 41} <= set(r.fields) <= ECHO | {39}
        assert r.header_digit6 == 1


async def test_a_bad_pad_nibble_in_f2_is_answered_30_not_closed(demo: DemoSwitch) -> None:
    """§3: an odd-length n field is padded with a trailing 0 nibble; F2 (before F11 and F41) padded
    with F still has a known extent, so F11 and F41 decode and §12.1 step 1 answers 30."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        frame, _ = term.build_frame("0200", consume_fields(term, entry="manual"), mac=True)
        f2 = bytes.fromhex("19" + CARD + "0")
        assert frame.count(f2) == 1
        r = await term.send_raw(frame.replace(f2, bytes.fromhex("19" + CARD + "F")))
        assert r is not None and (r.mti, r.code) == ("0210", "30")
        assert {11, 39, 41} <= set(r.fields) and 2 not in r.fields


# ---- §2 / §12.1 step 1: closes -----------------------------------------------------------
@pytest.mark.parametrize("mti", ["0210", "0600", "0810"])
async def test_non_request_mti_is_closed(demo: DemoSwitch, mti: str) -> None:
    term = demo.terminal("10000001")
    frame = raw_frame(term, mti, {11: term.take_stan(), 41: term.tid, 42: term.mid, 60: "00000001301"})
    assert await term.send_raw(frame, oneshot=True) is None


async def test_bit1_is_closed(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    frame = bytearray(raw_frame(term, "0820", {11: term.take_stan(), 41: term.tid, 42: term.mid,
                                              60: "00000001301"}))
    frame[2 + 11 + 2] |= 0x80
    assert await term.send_raw(bytes(frame), oneshot=True) is None


async def test_tpdu_and_header_echo(demo: DemoSwitch) -> None:
    """§2: TPDU echoed unchanged; header echoed except digit 6 (reserved F nibbles kept)."""
    term = TerminalClient("127.0.0.1", demo.port, "10000001", "898310048990001", bytes(16),
                          tpdu=bytes.fromhex("6012343210"), header=bytes.fromhex("61321FFFFFFF"))
    term.next_stan = 910001
    r = await term.echo_test(oneshot=True)
    assert r.code == "00"
    assert r.tpdu == bytes.fromhex("6012343210")
    assert r.header[:2] == bytes.fromhex("6132") and r.header[2] >> 4 == 1 and r.header[3:] == b"\xff" * 3


# ---- §12.1 order of checks ---------------------------------------------------------------
async def test_unknown_terminal_before_unknown_key(demo: DemoSwitch) -> None:
    term = TerminalClient("127.0.0.1", demo.port, "99999999", "898310048990001", bytes(16))
    term.next_stan = 920001
    fields = consume_fields(term, pin=False, type_code="98")
    r = await term.send_fields("0200", fields, oneshot=True)
    assert r.code == "97" and r.header_digit6 == 0


async def test_inactive_terminal_97_digit6_3(demo: DemoSwitch) -> None:
    """§2: a known terminal without working keys -> digit 6 = 3, also on its 97."""
    term = TerminalClient("127.0.0.1", demo.port, "20000002", "898310058120002", bytes(16))
    term.next_stan = 930001
    r = await term.echo_test(oneshot=True)
    assert r.code == "97" and r.header_digit6 == 3


async def test_unknown_key_before_bad_mac(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        r = await send_bad_mac(term, consume_fields(term, pin=False, type_code="98"))
        assert r.code == "40"


async def test_merchant_mismatch_03(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        fields = consume_fields(term, pin=False, entry="manual")
        fields[42] = "898310058120002"
        r = await term.send_fields("0200", fields)
        assert r.code == "03" and set(r.fields) == FIN_DECLINE


async def test_bad_mac_before_batch_and_mandatory(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        fields = consume_fields(term, pin=False)
        fields[60] = "22999999000"
        del fields[49]
        r = await send_bad_mac(term, fields)
        assert r.code == "A0"


async def test_wrong_batch_before_mandatory(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        fields = consume_fields(term, pin=False)
        fields[60] = "22999999000"
        del fields[49]
        r = await term.send_fields("0200", fields)
        assert r.code == "77"


async def test_mandatory_before_amount_and_amount_13(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False)
        del f[4], f[49]
        assert (await term.send_fields("0200", f)).code == "30"
        f = consume_fields(term, pin=False)
        del f[4]
        assert (await term.send_fields("0200", f)).code == "13"
        f = consume_fields(term, pin=False, amount=0)
        assert (await term.send_fields("0200", f)).code == "13"


async def test_amount_before_luhn_and_luhn_before_route(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        bad_luhn = "4111237450925695"
        f = consume_fields(term, pin=False, card=bad_luhn, amount=0, entry="manual")
        assert (await term.send_fields("0200", f)).code == "13"
        f = consume_fields(term, pin=False, card=bad_luhn, entry="manual")
        assert (await term.send_fields("0200", f)).code == "14"


async def test_pin_without_f53_is_30(demo: DemoSwitch) -> None:
    """§6.1: 26 + 52 + 53 together when a PIN was entered."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term)
        del f[53]
        assert (await term.send_fields("0200", f)).code == "30"


# ---- §4 F53 / §10.2 PIN block ------------------------------------------------------------
async def test_f53_encrypted_track_without_004_is_30(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term)
        f[53] = "2610000000000000"
        assert (await term.send_fields("0200", f)).code == "30"


@pytest.mark.parametrize("mode, digit2", [("003", "0"), ("001", "6")])
async def test_f53_key_length_mismatch_is_99(demo: DemoSwitch, mode: str, digit2: str) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on(mode)
        f = consume_fields(term)
        f[53] = "2" + digit2 + "00000000000000"
        r = await term.send_fields("0200", f)
        assert r.code == "99" and 64 not in r.fields and 38 not in r.fields


async def test_undecodable_pin_block_is_99(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        assert term.keys is not None
        f = consume_fields(term)
        f[52] = des_ecb_encrypt(term.keys.pik, b"\xff" * 8)
        assert (await term.send_fields("0200", f)).code == "99"


async def test_pin_block_error_before_link_down(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, card=CARD_BOC)
        f[53] = "2000000000000000"
        assert (await term.send_fields("0200", f)).code == "99"


# ---- §8 / §10.1 keys: sign-off, revocation, MAC failures ---------------------------------
async def test_never_signed_on_77_digit6_3(demo: DemoSwitch) -> None:
    term = demo.terminal("10000002")
    async with term.connect():
        await term.sign_on("003")
        off = await term.sign_off()
        assert off.code == "00" and off.header_digit6 == 3
        assert off.mti == "0830" and set(off.fields) == {11, 12, 13, 39, 41, 42, 60}
        r = await term.send_fields("0200", consume_fields(term, pin=False, entry="manual"))
        assert r.code == "77" and r.header_digit6 == 3 and set(r.fields) == FIN_DECLINE
        r = await send_bad_mac(term, consume_fields(term, pin=False))
        assert r.code == "77"  # step 4: signed on before the MAC
        s = await term.send_fields("0500", {11: term.take_stan(), 41: term.tid, 42: term.mid,
                                            48: "0" * 62, 49: "156", 60: "00" + term.batch + "201"},
                                   mac=False)
        assert s.code == "77" and s.mti == "0510" and s.header_digit6 == 3
        assert set(s.fields) == {11, 12, 13, 15, 32, 37, 39, 41, 42, 48, 49, 60}
        assert (await term.sign_on("003")).header_digit6 == 1


async def test_old_keys_stop_working_after_sign_on(demo: DemoSwitch) -> None:
    """§8: every sign-on issues fresh keys; the previous MAK no longer verifies (A0)."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        old = term.keys
        await term.sign_on("003")
        new = term.keys
        term.keys = old
        r = await term.send_fields("0200", consume_fields(term, pin=False))
        term.keys = new
        assert r.code == "A0"


async def test_five_mac_failures_revoke(demo: DemoSwitch) -> None:
    term = demo.terminal("10000002")
    async with term.connect():
        await term.sign_on("003")
        codes = []
        for i in range(4):
            r = await send_bad_mac(term, consume_fields(term, pin=False))
            codes.append((r.code, r.header_digit6))
        # a valid MAC resets the count
        ok = await term.send_fields("0200", consume_fields(term, pin=False, amount=1))
        assert ok.code == "00"
        for i in range(4):
            r = await send_bad_mac(term, consume_fields(term, pin=False))
            assert r.code == "A0" and r.header_digit6 == 1
        fifth = await send_bad_mac(term, consume_fields(term, pin=False))
        assert fifth.code == "A0" and fifth.header_digit6 == 3 and 64 not in fifth.fields
        after = await term.send_fields("0200", consume_fields(term, pin=False))
        assert after.code == "77" and after.header_digit6 == 3
        assert codes == [("A0", 1)] * 4
        assert (await term.sign_on("003")).code == "00"
        assert (await term.send_fields("0200", consume_fields(term, pin=False, amount=1))).code == "00"


# ---- §11 duplicates (94) ------------------------------------------------------------------
async def test_same_key_other_bytes_is_94(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, amount=5)
        first = await term.send_fields("0200", f)
        again = await term.send_fields("0200", f)
        assert first.code == "00" and again.raw[13:] == first.raw[13:]
        f2 = dict(f)
        f2[4] = "000000000006"
        assert (await term.send_fields("0200", f2)).code == "94"


async def test_reversal_unknown_key_40(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, type_code="98", entry="manual")
        f[39] = "98"
        r = await term.send_fields("0400", {k: v for k, v in f.items() if k not in (26, 52, 53)})
        assert r.code == "40" and r.mti == "0410"


# ---- §6.1 mandatory card field: 35 for a swipe, 2 otherwise ---------------------------------
async def test_swipe_without_track_is_30(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, entry="manual", amount=2)
        f[22] = "022"
        del f[14]
        assert (await term.send_fields("0200", f)).code == "30"


async def test_manual_without_f2_is_30(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, amount=2)
        f[22] = "012"
        assert (await term.send_fields("0200", f)).code == "30"


# ---- §6.1 settlement and batch upload layouts --------------------------------------------
async def test_settlement_and_upload_field_sets(demo: DemoSwitch) -> None:
    term = demo.terminal("20000001")
    async with term.connect():
        await term.sign_on("003")
        s = await term.send_fields("0500", {11: term.take_stan(), 41: term.tid, 42: term.mid,
                                            48: "0" * 62, 49: "156", 60: "00" + term.batch + "201"},
                                   mac=False)
        assert s.code == "00" and s.mti == "0510"
        assert set(s.fields) == {11, 12, 13, 15, 32, 37, 39, 41, 42, 48, 49, 60}
        u = await term.send_fields("0320", {11: term.take_stan(), 41: term.tid, 42: term.mid,
                                            48: "0000", 60: "00" + term.batch + "207"}, mac=False)
        assert u.code == "00" and u.mti == "0330" and set(u.fields) == {11, 39, 41, 42, 60}


# ---- §9.1 / §6.1 activation layouts, digit 6, lockout ------------------------------------
async def test_activation_fields_digit6_and_lockout(demo: DemoSwitch) -> None:
    from switch.crypto.activation import generate_terminal_key, public_key_der, unwrap_tmk

    probe = TerminalClient("127.0.0.1", demo.port, "20000002", "898310058120002", bytes(16))
    probe.next_stan = 930001
    before = await probe.echo_test(oneshot=True)
    assert before.code == "97" and before.header_digit6 == 3  # §2: known terminal, no keys

    key = generate_terminal_key()
    term = TerminalClient("127.0.0.1", demo.port, " " * 8, " " * 15, bytes(16))
    term.next_stan = 940001
    r = await term.send_fields("0800", {11: term.take_stan(), 41: " " * 8, 42: " " * 15,
                                        60: "00000001351", 62: b"48213579" + public_key_der(key)},
                               mac=False, oneshot=True)
    assert r.code == "00", r
    assert set(r.fields) == {11, 39, 41, 42, 60, 62, 63}
    assert r.fields[41] == "20000002" and r.fields[42] == "898310058120002"
    assert r.fields[63] == "星河超市" and r.header_digit6 == 3
    f62 = r.fields[62]
    assert isinstance(f62, bytes) and len(f62) == 260
    tmk = unwrap_tmk(key, f62)
    assert len(tmk) == 16

    # §6.1 a declined activation: 11, 39, 60 only, digit 6 = 0 (no terminal found); the code is
    # now used: 97; after five wrong codes, 75 from this address (§9.1)
    codes = []
    for i in range(6):
        w = await term.send_fields("0800", {11: term.take_stan(), 41: " " * 8, 42: " " * 15,
                                            60: "00000001351", 62: b"48213579" + public_key_der(key)},
                                   mac=False, oneshot=True)
        codes.append(w.code)
        if i == 0:
            assert set(w.fields) == {11, 39, 60} and w.header_digit6 == 0
    assert codes == ["97"] * 5 + ["75"]


# ---- §10.2 PIN block for every PIN-carrying type; §4 F53 digit 2 without a PIN ------------
async def test_refund_with_undecodable_pin_block_is_99(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        assert term.keys is not None
        sale = await term.send_fields("0200", consume_fields(term, amount=300))
        assert sale.code == "00"
        f = term.card_fields(processing_code="200000", type_code="25", card=CARD, amount_fen=100,
                             pin="123456", expiry="3012", rrn=str(sale.fields[37]),
                             original=sale.batch + sale.stan + str(sale.fields[13]))
        f[52] = des_ecb_encrypt(term.keys.pik, b"\xff" * 8)
        r = await term.send_fields("0220", f)
        assert r.code == "99" and 64 not in r.fields


async def test_f53_digit2_mismatch_with_encrypted_track_only_is_99(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("004")
        f = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=3,
                             expiry="3012", encrypt_track=True)
        assert str(f[53])[:3] == "061"
        f[53] = "0010000000000000"
        assert (await term.send_fields("0200", f)).code == "99"


async def test_encrypted_track_after_004_is_served(demo: DemoSwitch) -> None:
    """§10.3: a TDK-encrypted track after a 004 sign-on; the response F2 is the clear PAN (§6.1)."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("004")
        f = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=3,
                             pin="123456", expiry="3012", encrypt_track=True)
        r = await term.send_fields("0200", f)
        assert r.code == "00" and r.fields[2] == CARD and r.mac_ok is True


# ---- §6.1 unlisted fields are ignored -----------------------------------------------------
async def test_consume_with_unlisted_short_f61_is_not_30(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, amount=4)
        f[61] = "1234"
        r = await term.send_fields("0200", f)
        assert r.code == "00" and 61 not in r.fields


async def test_consume_with_unlisted_fields_ignored(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, amount=4)
        f[37] = "000000000001"
        f[38] = "ABCDEF"
        f[48] = "123"
        r = await term.send_fields("0200", f)
        assert r.code == "00" and 48 not in r.fields and r.fields[38] != "ABCDEF"
        assert r.fields[37] != "000000000001"


# ---- §10.1 MAC missing; §1 oversized frame; §7 scan-to-pay formats ------------------------
async def test_missing_mac_is_a0(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False)
        r = await term.send_fields("0200", f, mac=False)
        assert r.code == "A0" and 64 not in r.fields


async def test_oversized_len_closed(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    assert await term.send_raw(b"\x08\x01" + bytes(11), oneshot=True) is None


async def test_scan_to_pay_formats(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")

        def scan(code: str) -> Fields:
            return term.card_fields(processing_code="000000", type_code="22", card=code, amount_fen=7,
                                    entry="scan")

        ok = await term.send_fields("0200", scan("101234567890123456"))
        assert ok.code == "00" and ok.fields[44] == "WECHAT".ljust(11) + ACQ.ljust(11)
        assert (await term.send_fields("0200", scan("10123456789012345"))).code == "30"
        r15 = await term.send_fields("0200", scan("991234567890123456"))
        assert r15.code == "15" and r15.fields[44] == " " * 11 + ACQ.ljust(11)


# ---- §6.1 more response layouts -----------------------------------------------------------
async def test_sign_on_unknown_terminal_layout(demo: DemoSwitch) -> None:
    term = TerminalClient("127.0.0.1", demo.port, "99999998", "898310048990001", bytes(16))
    term.next_stan = 950001
    r = await term.send_fields("0800", {11: term.take_stan(), 41: term.tid, 42: term.mid, 60: "00000001003"},
                               mac=False, oneshot=True)
    assert r.code == "97" and r.header_digit6 == 0
    assert set(r.fields) == {11, 12, 13, 32, 37, 39, 41, 42, 60}


async def test_balance_void_reversal_layouts(demo: DemoSwitch) -> None:
    """§6.1: balance approved adds 54 (no 4 echoed when not sent); a void gets a new RRN; an
    approved 0410 carries the echoes, 12 13 15 32 37 39 44 63 and 64."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        bal = await term.send_fields("0200", term.card_fields(
            processing_code="310000", type_code="01", card=CARD, amount_fen=None, pin="123456", expiry="3012"))
        assert bal.code == "00" and set(bal.fields) >= FIN_DECLINE - {4} | {54, 64} and 4 not in bal.fields
        assert set(bal.fields) <= FIN_DECLINE - {4} | {38, 54, 64}
        sale = await term.send_fields("0200", consume_fields(term, amount=11))
        assert sale.code == "00"
        void = await term.send_fields("0200", term.card_fields(
            processing_code="200000", type_code="23", card=CARD, amount_fen=11, pin="123456", expiry="3012",
            rrn=str(sale.fields[37]), original=sale.batch + sale.stan))
        assert void.code == "00" and void.fields[37] != sale.fields[37]
        assert set(void.fields) == FIN_DECLINE | {38, 64}
        sale2 = await term.send_fields("0200", consume_fields(term, pin=False, amount=12))
        assert sale2.code == "00"
        rev = {k: v for k, v in sale2.request_fields.items() if k in (2, 3, 4, 11, 14, 22, 25, 49, 60, 61, 38)}
        rev.update({39: "98", 41: term.tid, 42: term.mid})
        r = await term.send_fields("0400", rev)
        assert r.code == "00" and r.mti == "0410" and r.mac_ok is True
        assert FIN_DECLINE - {2} | {64} <= set(r.fields) <= FIN_DECLINE | {38, 64}
        assert r.fields[37] != sale2.fields[37]
        missing = dict(rev)
        missing[11] = term.take_stan()
        assert (await term.send_fields("0400", missing)).code == "25"


async def test_f60_extra_digits_echoed_and_f12_f13_ignored(demo: DemoSwitch) -> None:
    """§5: further digits of F60 are accepted and echoed; §4: F12/F13 are set by the switch."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, amount=13)
        f[60] = str(f[60]) + "501"
        f[12] = "000000"
        f[13] = "0101"
        r = await term.send_fields("0200", f)
        assert r.code == "00" and r.fields[60] == f[60]
        assert (r.fields[12], r.fields[13]) != ("000000", "0101")
