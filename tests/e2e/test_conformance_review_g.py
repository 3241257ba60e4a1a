"""Conformance review (G): black-box probes of protocol.md written from the contract alone, aimed at
what reviews A-F leave out: §6 keys under the wrong request MTI, exact §6.1 response field sets
(0510, 0330, 0830, scan-to-pay, manual entry, 30, 0410), §12.1 requests with two faults at once,
§13 limit headroom through declines / timeouts / completions / reversed voids, §9.4 totals of a
mixed batch and §9.6 the batch after a settlement, and §11 reversal edge cases.

Tests the switch fails are ``xfail(strict=True)`` naming the § and what the switch does instead.

Must not: sleep as an assertion (every wait is a bounded poll); log or print a PIN or a full PAN;
edit anything but this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from switch.core.codec import Codec, Fields, load_dialect
from switch.core.framing import encode_frame
from switch.crypto.des import des_ecb_encrypt
from switch.pos.client import Response, TerminalClient

from .conftest import DemoSwitch
from .helpers import (
    CMB_CARD,
    CMB_DEST,
    ICBC_CARD,
    ICBC_POOR,
    NO_ROUTE_CARD,
    PIN,
    WECHAT_CODE,
    card_request,
    do,
    luhn_valid,
    pre_auth_extra,
    reversal_of,
    reverse,
    scan_request,
    send,
    signed_on,
    void_extra,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CODEC = Codec(load_dialect("terminal"))
ACQ = "48521000"
BOC_CARD = "6216611771534246833"  # route configured, link down: 91
SLOW_CARD = "6228489187204683748"  # accepts, never answers: 98 after the demo's 2 s issuer timeout
ECHO = {2, 3, 4, 11, 25, 41, 42, 49, 60}
FIN = ECHO | {12, 13, 15, 32, 37, 39, 44, 63}  # §6.1 every financial response
APPROVED = FIN | {38, 64}
M2_MID = "898310058120002"


BAD_LUHN = ICBC_CARD[:-1] + str((int(ICBC_CARD[-1]) + 1) % 10)  # ICBC BIN, wrong check digit
assert not luhn_valid(BAD_LUHN) and luhn_valid(ICBC_CARD) and luhn_valid(NO_ROUTE_CARD)


def raw_frame(term: TerminalClient, mti: str, fields: Fields) -> bytes:
    return encode_frame(term.tpdu, term.header, CODEC.encode(mti, dict(sorted(fields.items()))))


def mgmt(term: TerminalClient, nmc: str, batch: str | None = None, **more: object) -> Fields:
    f: Fields = {11: term.take_stan(), 41: term.tid, 42: term.mid, 60: f"00{batch or term.batch}{nmc}"}
    for k, v in more.items():
        f[int(k.lstrip("f"))] = v  # type: ignore[assignment]
    return f


def totals(debit: int, dn: int, credit: int, cn: int, result: str = "0", foreign_result: str = "0") -> str:
    """§9.4 F48: domestic debit n12, count n3, credit n12, count n3, result n1; then the foreign five."""
    return f"{debit:012d}{dn:03d}{credit:012d}{cn:03d}{result}" + "0" * 30 + foreign_result


def settle(term: TerminalClient, f48: str, batch: str | None = None, f60_extra: str = "") -> Fields:
    return {11: term.take_stan(), 41: term.tid, 42: term.mid, 48: f48, 49: "156",
            60: f"00{batch or term.batch}201{f60_extra}"}


def refund_extra(orig: Response) -> dict[int, str]:
    return {37: str(orig.fields[37]), 61: "000000000000" + str(orig.fields[13])}


def bad_pin_block(term: TerminalClient, pan: str) -> bytes:
    """A §10.2 block whose PIN length is 3 (not a valid format-0 PIN): the switch must say 99."""
    assert term.keys is not None
    pan_field = "0000" + pan[:-1][-12:].rjust(12, "0")
    clear = bytes(a ^ b for a, b in zip(bytes.fromhex("03123FFFFFFFFFFF"), bytes.fromhex(pan_field)))
    return des_ecb_encrypt(term.keys.pik, clear)


async def bad_mac(term: TerminalClient, mti: str, fields: Fields) -> Response:
    f = dict(fields)
    f[64] = b"\x11" * 8
    return await term.send_fields(mti, f, mac=False)


# ==============================================================================================
# §6: a known key under another request-class MTI is not in the table -> 40; other MTIs close
# ==============================================================================================
FIN_WRONG_MTI = [
    ("0220", "consume"), ("0100", "consume"), ("0200", "pre_auth"), ("0200", "refund"),
    ("0220", "void"), ("0100", "completion"), ("0200", "completion_advice"), ("0220", "pre_auth_void"),
]


async def test_financial_key_under_another_mti_is_40(demo: DemoSwitch) -> None:
    """§6: Key = MTI + F3 + F25 + 60.1; a request-class MTI whose key is not in the table gets 40,
    answered with MTI + 10 and the §6.1 financial decline layout (no 38, no 64)."""
    async with signed_on(demo.terminal("10000001")) as t:
        for mti, kind in FIN_WRONG_MTI:
            _, f = card_request(t, kind, ICBC_CARD, 321, extra={37: "000000000001", 38: "123456",
                                                               61: t.batch + "000001" + "0101"})
            r = await t.send_fields(mti, f)
            assert (r.mti, r.code) == (f"{int(mti) + 10:04d}", "40"), (mti, kind, r)
            assert set(r.fields) == FIN, (mti, kind, r)
            assert r.fields[44] == " " * 11 + ACQ.ljust(11)


@pytest.mark.parametrize("mti, nmc", [("0800", "002"), ("0800", "301"), ("0820", "001"), ("0820", "360"),
                                      ("0820", "351"), ("0500", "202"), ("0320", "203"), ("0800", "201")])
async def test_management_key_under_another_mti_is_40(demo: DemoSwitch, mti: str, nmc: str) -> None:
    t = demo.terminal("10000002")
    r = await t.send_fields(mti, mgmt(t, nmc, f48="0001"), mac=False, oneshot=True)
    assert r.mti == f"{int(mti) + 10:04d}" and r.code == "40", r


@pytest.mark.parametrize("mti", ["0420", "0120", "0520", "0300", "0900"])
async def test_mtis_outside_the_request_classes_are_closed(demo: DemoSwitch, mti: str) -> None:
    """§6 / §12.1 step 1: any MTI other than the eight request classes is closed (no answer)."""
    t = demo.terminal("10000001")
    frame = raw_frame(t, mti, mgmt(t, "301"))
    assert await t.send_raw(frame, oneshot=True) is None


# ==============================================================================================
# §5 / §6.1 management layouts
# ==============================================================================================
async def test_sign_on_echoes_f60_extra_digits_with_the_current_batch(demo: DemoSwitch) -> None:
    """§5: further F60 digits are echoed; sign-on responses carry the current batch in 60.2 (the
    request's 60.2 is not checked for management messages)."""
    t = demo.terminal("10000002")
    async with t.connect():
        first = await t.sign_on("003")
        assert first.code == "00"
        current = first.batch
        r = await t.send_fields("0800", mgmt(t, "003", batch="999998", f63="001") | {60: "0099999800356"},
                                mac=False)
        assert r.code == "00", r
        assert r.fields[60] == "00" + current + "003" + "56"
        assert set(r.fields) == {11, 12, 13, 32, 37, 39, 41, 42, 60, 62}


async def test_sign_off_0830_exact_layout_and_digit6(demo: DemoSwitch) -> None:
    """§6.1 0830: 11 12 13 39 41 42 60 (an unlisted F4 ignored); §2: after a sign-off the terminal
    has no valid working keys, so the 0830 itself carries digit 6 = 3; §8: then 77."""
    t = demo.terminal("10000002")
    async with t.connect():
        assert (await t.sign_on("003")).code == "00"
        so = mgmt(t, "002", f4="000000000100")
        so[60] = str(so[60]) + "9"
        r = await t.send_fields("0820", so, mac=False)
        assert (r.mti, r.code) == ("0830", "00")
        assert set(r.fields) == {11, 12, 13, 39, 41, 42, 60} and r.fields[60] == so[60]
        assert r.header_digit6 == 3
        f = t.card_fields(processing_code="000000", type_code="22", card=ICBC_CARD, amount_fen=5, expiry="3012")
        after = await t.send_fields("0200", f)
        assert after.code == "77" and after.header_digit6 == 3
        assert (await t.sign_on("003")).code == "00"


async def test_batch_upload_0330_exact_layout(demo: DemoSwitch) -> None:
    """§6.1 0330: 11 39 41 42 60; unlisted fields (2, 4, 49) are ignored and never echoed."""
    async with signed_on(demo.terminal("20000001")) as t:
        rec = "00" + "000123" + CMB_CARD.rjust(20, "0") + f"{1_000:012d}"
        up = mgmt(t, "201", f48="01" + rec, f2=CMB_CARD, f4="000000001000", f49="156")
        up[60] = str(up[60]) + "42"
        r = await t.send_fields("0320", up, mac=False)
        assert (r.mti, r.code) == ("0330", "00")
        assert set(r.fields) == {11, 39, 41, 42, 60} and r.fields[60] == up[60]


# ==============================================================================================
# §6.1 financial layouts not pinned elsewhere
# ==============================================================================================
async def test_scan_to_pay_approved_exact_layout(demo: DemoSwitch) -> None:
    """§6.1: echoes (F2 = the payment code) + 12 13 15 32 37 38 39 44 63 64; nothing of F22."""
    async with signed_on(demo.terminal("10000001")) as t:
        r = await send(t, scan_request(t, "consume", WECHAT_CODE, 88))
        assert (r.mti, r.code) == ("0210", "00"), r
        assert set(r.fields) == APPROVED and r.fields[2] == WECHAT_CODE and r.mac_ok is True
        assert r.fields[44] == "WECHAT".ljust(11) + ACQ.ljust(11) and r.fields[63] == "CUP"
        auth = str(r.fields[38])
        assert len(auth) == 6 and " " not in auth and len(str(r.fields[37])) == 12


async def test_manual_consume_exact_layout_without_f14(demo: DemoSwitch) -> None:
    """§6.1: F14 and F22 are not on the echo list."""
    async with signed_on(demo.terminal("10000001")) as t:
        mti, f = card_request(t, "consume", CMB_CARD, 89, pin=PIN[CMB_CARD], entry="manual")
        assert 14 in f and 2 in f
        r = await t.send_fields(mti, f)
        assert r.code == "00" and set(r.fields) == APPROVED and r.fields[2] == CMB_CARD
        assert r.fields[4] == f[4] and r.fields[3] == "000000" and r.fields[25] == "00"


async def test_a_30_carries_every_decoded_echo_field(demo: DemoSwitch) -> None:
    """§6.1: a 30 carries 11, 39, 41 and whatever else of the echo list decoded."""
    async with signed_on(demo.terminal("10000001")) as t:
        mti, f = card_request(t, "consume", CMB_CARD, 90, entry="manual")
        del f[49]
        r = await t.send_fields(mti, f)
        assert r.code == "30" and 64 not in r.fields
        assert ECHO - {49} <= set(r.fields) <= ECHO | FIN, r
        sale = await do(t, "consume", ICBC_CARD, 91)
        _, v = card_request(t, "void", CMB_CARD, 91, entry="manual", extra={61: sale.batch + sale.stan})
        r2 = await t.send_fields("0200", v)  # void without F37
        assert r2.code == "30" and ECHO <= set(r2.fields) and r2.fields[2] == CMB_CARD


async def test_0410_does_not_echo_f14_f22_f61(demo: DemoSwitch) -> None:
    """§6.1: a 0410 carries the echoes (2 3 4 11 25 41 42 49 60) + 12 13 15 32 37 39 44 63 64 and
    may carry 38; the 14, 22 and 61 its request repeated from a void are not echoed."""
    async with signed_on(demo.terminal("10000001")) as t:
        sale = await do(t, "consume", CMB_CARD, 92, pin=False)
        mti, v = card_request(t, "void", CMB_CARD, 92, entry="manual", extra=void_extra(sale))
        void = await t.send_fields(mti, v)
        assert void.code == "00"
        r = await reverse(t, void)
        assert (r.mti, r.code) == ("0410", "00")
        assert APPROVED - {38} <= set(r.fields) <= APPROVED, r
        assert r.fields[2] == CMB_CARD and r.fields[44] == "CMB".ljust(11) + ACQ.ljust(11)


# ==============================================================================================
# §12.1 two faults at once: the earlier step wins
# ==============================================================================================
async def test_unknown_terminal_with_a_bad_mac_is_97(demo: DemoSwitch) -> None:
    t = TerminalClient("127.0.0.1", demo.port, "99999997", "898310048990001", bytes(16))
    t.next_stan = 970001
    _, f = card_request(t, "consume", ICBC_CARD, 100)
    f[64] = b"\x22" * 8
    r = await t.send_fields("0200", f, mac=False, oneshot=True)
    assert r.code == "97" and r.header_digit6 == 0 and set(r.fields) == FIN


async def test_merchant_mismatch_with_a_bad_mac_is_03(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal("10000001")) as t:
        _, f = card_request(t, "consume", ICBC_CARD, 100, extra={42: M2_MID})
        r = await bad_mac(t, "0200", f)
        assert r.code == "03" and set(r.fields) == FIN


async def test_wrong_batch_before_amount_and_luhn(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal("10000001")) as t:
        _, f = card_request(t, "consume", BAD_LUHN, 0, entry="manual")
        f[60] = "22" + f"{(int(t.batch) + 7) % 1_000_000:06d}" + "000"
        assert (await t.send_fields("0200", f)).code == "77"


async def test_missing_original_fields_before_luhn(demo: DemoSwitch) -> None:
    """Step 7 (mandatory: a void's F37) before step 8 (Luhn)."""
    async with signed_on(demo.terminal("10000001")) as t:
        _, f = card_request(t, "void", BAD_LUHN, 100, entry="manual", extra={61: t.batch + "000001"})
        assert (await t.send_fields("0200", f)).code == "30"


async def test_route_before_original_lookup(demo: DemoSwitch) -> None:
    """Step 8 (route, 15) before step 9 (original lookup, 25): a void of a card without a route."""
    async with signed_on(demo.terminal("10000001")) as t:
        _, f = card_request(t, "void", NO_ROUTE_CARD, 100, entry="manual",
                            extra={37: "000000000009", 61: t.batch + "000009"})
        r = await t.send_fields("0200", f)
        assert r.code == "15" and r.fields[44] == " " * 11 + ACQ.ljust(11)
        _, g = card_request(t, "refund", NO_ROUTE_CARD, 100, entry="manual",
                            extra={37: "000000000009", 61: "0" * 12 + "0101"})
        assert (await t.send_fields("0220", g)).code == "15"


async def test_transfer_amount_before_destination_luhn(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal("10000001")) as t:
        bad_dest = CMB_DEST[:-1] + str((int(CMB_DEST[-1]) + 1) % 10)
        assert not luhn_valid(bad_dest)
        _, f = card_request(t, "transfer", ICBC_CARD, 0, extra={48: bad_dest})
        assert (await t.send_fields("0200", f)).code == "13"


async def test_original_state_before_pin_block(demo: DemoSwitch) -> None:
    """Step 9 (12 already voided / 64 other amount) before step 10 (99 PIN block)."""
    async with signed_on(demo.terminal("10000001")) as t:
        sale = await do(t, "consume", ICBC_CARD, 93)
        assert (await do(t, "void", ICBC_CARD, 93, extra=void_extra(sale))).code == "00"
        _, f = card_request(t, "void", ICBC_CARD, 93, pin=PIN[ICBC_CARD], extra=void_extra(sale))
        f[52] = bad_pin_block(t, ICBC_CARD)
        assert (await t.send_fields("0200", f)).code == "12"
        sale2 = await do(t, "consume", ICBC_CARD, 94)
        _, g = card_request(t, "void", ICBC_CARD, 95, pin=PIN[ICBC_CARD], extra=void_extra(sale2))
        g[52] = bad_pin_block(t, ICBC_CARD)
        assert (await t.send_fields("0200", g)).code == "64"
        # control: the same bad block on a valid void is 99
        _, h = card_request(t, "void", ICBC_CARD, 94, pin=PIN[ICBC_CARD], extra=void_extra(sale2))
        h[52] = bad_pin_block(t, ICBC_CARD)
        assert (await t.send_fields("0200", h)).code == "99"


async def test_reversal_bad_mac_before_not_found(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal("10000001")) as t:
        sale = await do(t, "consume", ICBC_CARD, 96)
        rev = reversal_of(t, sale.request_fields, f11=t.take_stan())
        r = await bad_mac(t, "0400", rev)
        assert (r.mti, r.code) == ("0410", "A0") and 64 not in r.fields


async def test_signed_off_before_reversal_lookup_and_settlement_format(demo: DemoSwitch) -> None:
    """Step 4 (77) before the reversal's lookup (25) and before the settlement's F48 format (30)."""
    t = demo.terminal("10000002")
    async with t.connect():
        assert (await t.sign_on("003")).code == "00"
        sale = await do(t, "consume", ICBC_CARD, 97)
        assert (await t.sign_off()).code == "00"
        rev = reversal_of(t, sale.request_fields, f11=t.take_stan())
        assert (await t.send_fields("0400", rev)).code == "77"
        r = await t.send_fields("0500", settle(t, "0" * 61), mac=False)
        assert (r.mti, r.code) == ("0510", "77") and r.header_digit6 == 3
        assert (await t.sign_on("003")).code == "00"


# ==============================================================================================
# §11 reversal edge cases
# ==============================================================================================
async def test_reversal_of_a_refund_is_12(demo: DemoSwitch) -> None:
    """§6: refund is not reversible; §11: a non-reversible original -> 12."""
    async with signed_on(demo.terminal("10000001")) as t:
        sale = await do(t, "consume", ICBC_CARD, 1_200)
        ref = await do(t, "refund", ICBC_CARD, 200, extra=refund_extra(sale))
        assert ref.code == "00"
        r = await reverse(t, ref)
        assert (r.mti, r.code) == ("0410", "12") and 64 not in r.fields
        # still refunded: only 1_000 is left to refund
        assert (await do(t, "refund", ICBC_CARD, 1_001, extra=refund_extra(sale))).code == "64"


async def test_reversal_of_originals_the_switch_declined_is_00(demo: DemoSwitch) -> None:
    """§11: a reversal of an original that was declined answers 00 with nothing more to do (15 no
    route, 14 Luhn, 91 link down are declines of this terminal's request with that batch + STAN)."""
    async with signed_on(demo.terminal("10000001")) as t:
        for card, code in ((NO_ROUTE_CARD, "15"), (BAD_LUHN, "14"), (BOC_CARD, "91")):
            mti, f = card_request(t, "consume", card, 1_300, entry="manual")
            orig = await t.send_fields(mti, f)
            assert orig.code == code
            r = await reverse(t, orig)
            assert (r.mti, r.code) == ("0410", "00"), (code, r)
            assert r.mac_ok is True  # §6.1: 00 to a MAC'd request type carries 64


async def test_reversal_of_a_timed_out_original_is_00(demo: DemoSwitch) -> None:
    """§11: an original the switch reversed itself after a timeout: the terminal's 0400 gets 00."""
    async with signed_on(demo.terminal("10000001")) as t:
        orig = await do(t, "consume", SLOW_CARD, 1_400, pin=False)
        assert orig.code == "98"
        r = await reverse(t, orig, reason="98")
        assert (r.mti, r.code) == ("0410", "00")


async def test_reversal_names_its_original_by_tid_and_batch(demo: DemoSwitch) -> None:
    """§11: the original is the one with the same TID, batch (60.2) and STAN: the same 0400 from a
    sibling terminal, or naming another batch, finds nothing (25)."""
    t1 = demo.terminal("10000001")
    t2 = demo.terminal("10000002")
    async with t1.connect(), t2.connect():
        assert (await t1.sign_on("003")).code == "00" and (await t2.sign_on("003")).code == "00"
        sale = await do(t1, "consume", ICBC_CARD, 1_500)
        assert sale.code == "00"
        sib = reversal_of(t2, sale.request_fields)
        assert (await t2.send_fields("0400", sib)).code == "25"
        other = reversal_of(t1, sale.request_fields)
        other[60] = "22" + f"{(int(t1.batch) + 3) % 1_000_000:06d}" + "000"
        assert (await t1.send_fields("0400", other)).code == "25"
        ok = await reverse(t1, sale, reason="06")
        assert ok.code == "00"
        # voiding the reversed consume: 25
        assert (await do(t1, "void", ICBC_CARD, 1_500, extra=void_extra(sale))).code == "25"


# ==============================================================================================
# §13 monthly limit headroom (fresh switch: a clean month for M1, micro, 300,000.00)
# ==============================================================================================
async def test_limit_headroom_through_declines_completions_and_reversed_voids(tmp_path: Path) -> None:
    limit = 30_000_000
    with DemoSwitch(tmp_path) as sw:
        async with signed_on(sw.terminal("10000001")) as t:
            big = await do(t, "consume", ICBC_CARD, limit - 20_000)
            assert big.code == "00"
            # step 8 before step 9: Luhn and route fail before the limit
            _, f = card_request(t, "consume", BAD_LUHN, 30_000, entry="manual")
            assert (await t.send_fields("0200", f)).code == "14"
            _, f = card_request(t, "consume", NO_ROUTE_CARD, 30_000, entry="manual")
            assert (await t.send_fields("0200", f)).code == "15"
            # declines and timeouts use no headroom
            assert (await do(t, "consume", ICBC_POOR, 10_001)).code == "51"
            _, f = card_request(t, "consume", BOC_CARD, 20_000, entry="manual")
            assert (await t.send_fields("0200", f)).code == "91"
            assert (await do(t, "consume", SLOW_CARD, 20_000, pin=False)).code == "98"
            # a pre-auth uses none; its completion uses the captured amount (115 % of 17_000)
            pa = await do(t, "pre_auth", ICBC_CARD, 17_000)
            assert pa.code == "00"
            comp = await do(t, "completion", ICBC_CARD, 19_550, extra=pre_auth_extra(pa))
            assert comp.code == "00"
            # 450 left: an advice of 1_000 is 61; but the original checks come first (25, 64)
            pa2 = await do(t, "pre_auth", ICBC_CARD, 1_000)
            assert (await do(t, "completion_advice", ICBC_CARD, 1_000, extra=pre_auth_extra(pa2))).code == "61"
            wrong = {**pre_auth_extra(pa2), 38: "ZZZZZZ" if pre_auth_extra(pa2)[38] != "ZZZZZZ" else "YYYYYY"}
            assert (await do(t, "completion", ICBC_CARD, 1_000, extra=wrong)).code == "25"
            assert (await do(t, "completion", ICBC_CARD, 1_151, extra=pre_auth_extra(pa2))).code == "64"
            assert (await do(t, "completion", ICBC_CARD, 450, extra=pre_auth_extra(pa2))).code == "00"
            assert (await do(t, "consume", ICBC_CARD, 1)).code == "61"
            # a completion void gives back the captured amount
            assert (await do(t, "completion_void", ICBC_CARD, 19_550, extra=void_extra(comp))).code == "00"
            last = await do(t, "consume", ICBC_CARD, 19_550)
            assert last.code == "00"
            assert (await do(t, "consume", ICBC_CARD, 1)).code == "61"
            # a void gives it back; the reversal of that void takes it again
            void = await do(t, "void", ICBC_CARD, 19_550, extra=void_extra(last))
            assert void.code == "00"
            assert (await reverse(t, void)).code == "00"
            assert (await do(t, "consume", ICBC_CARD, 1)).code == "61"
            assert (await send(t, scan_request(t, "consume", WECHAT_CODE, 1))).code == "61"
            # the reversal of the consume itself gives it back
            assert (await reverse(t, last)).code == "00"
            assert (await do(t, "consume", ICBC_CARD, 19_550)).code == "00"
            assert (await do(t, "consume", ICBC_CARD, 1)).code == "61"


# ==============================================================================================
# §9.4 totals of a mixed batch, the 0510 layout, and §9.6 the batch after a settlement
# ==============================================================================================
async def test_settlement_of_a_mixed_batch_and_the_next_batch(tmp_path: Path) -> None:
    with DemoSwitch(tmp_path) as sw:
        async with signed_on(sw.terminal("10000001")) as t:
            debit = credit = dn = cn = 0

            sale = await do(t, "consume", ICBC_CARD, 10_000)  # D
            scan = await send(t, scan_request(t, "consume", WECHAT_CODE, 2_000))  # D
            scan_ref = await send(t, scan_request(t, "refund", WECHAT_CODE, 500, extra=refund_extra(scan)))  # C
            sale2 = await do(t, "consume", ICBC_CARD, 3_000)  # D (stays when voided)
            void2 = await do(t, "void", ICBC_CARD, 3_000, extra=void_extra(sale2))  # C
            pa = await do(t, "pre_auth", ICBC_CARD, 4_000)
            comp = await do(t, "completion", ICBC_CARD, 4_600, extra=pre_auth_extra(pa))  # D
            cv = await do(t, "completion_void", ICBC_CARD, 4_600, extra=void_extra(comp))
            assert cv.code == "00" and (await reverse(t, cv)).code == "00"  # reversed void: no credit
            pa2 = await do(t, "pre_auth", ICBC_CARD, 1_000)
            comp2 = await do(t, "completion", ICBC_CARD, 1_000, extra=pre_auth_extra(pa2))
            assert comp2.code == "00" and (await reverse(t, comp2)).code == "00"  # reversed: nothing
            pa3 = await do(t, "pre_auth", ICBC_CARD, 2_000)
            adv = await do(t, "completion_advice", ICBC_CARD, 2_000, extra=pre_auth_extra(pa3))  # D
            ref = await do(t, "refund", ICBC_CARD, 1_000, extra=refund_extra(sale))  # C
            for r in (sale, scan, scan_ref, sale2, void2, pa, comp, pa2, pa3, adv, ref):
                assert r.code == "00", r
            debit, dn = 10_000 + 2_000 + 3_000 + 4_600 + 2_000, 5
            credit, cn = 500 + 3_000 + 1_000, 3
            # nothing of these counts
            assert (await do(t, "consume", ICBC_POOR, 1_000_000)).code == "51"
            declined = await do(t, "consume", ICBC_POOR, 1_000_001)
            assert (await reverse(t, declined)).code == "00"
            assert (await do(t, "void", ICBC_CARD, 9_999, extra=void_extra(sale))).code == "64"
            assert (await do(t, "refund", ICBC_CARD, 9_001, extra=refund_extra(sale))).code == "64"
            assert (await do(t, "consume", SLOW_CARD, 700, pin=False)).code == "98"
            assert (await do(t, "balance", ICBC_CARD, None)).code == "00"
            assert (await do(t, "transfer", ICBC_CARD, 300, extra={48: CMB_DEST})).code == "00"
            pa4 = await do(t, "pre_auth", ICBC_CARD, 800)
            assert (await do(t, "pre_auth_void", ICBC_CARD, 800, extra=pre_auth_extra(pa4))).code == "00"

            closed = t.batch
            req = settle(t, totals(debit, dn, credit, cn), f60_extra="73")
            req[63] = "01 "
            req[4] = "000000000001"
            r = await t.send_fields("0500", req, mac=False)
            assert (r.mti, r.code) == ("0510", "00"), r
            assert r.fields[48] == totals(debit, dn, credit, cn, "1", "1")
            assert set(r.fields) == {11, 12, 13, 15, 32, 37, 39, 41, 42, 48, 49, 60}
            assert r.fields[60] == req[60] and r.fields[49] == "156" and r.fields[32] == ACQ
            assert len(str(r.fields[37])) == 12 and len(str(r.fields[15])) == 4
            assert r.header_digit6 == 1  # parameters never downloaded (§2)

            # settling the closed batch again, with other totals: the same answer
            again = await t.send_fields("0500", settle(t, totals(1, 1, 0, 0), closed), mac=False)
            assert again.code == "00" and again.fields[48] == r.fields[48]

            # §9.4/§9.6: the terminal's current batch is now closed + 1, without a new sign-on
            nxt = f"{int(closed) + 1:06d}"
            _, f = card_request(t, "consume", ICBC_CARD, 250, pin=PIN[ICBC_CARD])
            f[60] = "22" + closed + "000"
            assert (await t.send_fields("0200", f)).code == "77"
            t.batch = nxt
            one = await do(t, "consume", ICBC_CARD, 250)
            assert one.code == "00" and one.fields[60] == "22" + nxt + "000"
            s2 = await t.send_fields("0500", settle(t, totals(250, 1, 0, 0)), mac=False)
            assert s2.code == "00" and s2.fields[48] == totals(250, 1, 0, 0, "1", "1")
            # the batch after that exists, empty
            t.batch = f"{int(nxt) + 1:06d}"
            s3 = await t.send_fields("0500", settle(t, totals(5, 1, 0, 0)), mac=False)
            assert s3.code == "00" and s3.fields[48] == totals(0, 0, 0, 0, "2", "1")
            assert (await t.sign_on("003")).batch == f"{int(nxt) + 2:06d}"


# ==============================================================================================
# §6.1 conditional-mandatory fields of each type -> 30 (§12.1 step 7)
# ==============================================================================================
def _follow_up_fields(t: TerminalClient, kind: str, sale: Response, pa: Response) -> Fields:
    extra: dict[int, object]
    if kind in ("void",):
        extra = dict(void_extra(sale))
    elif kind == "refund":
        extra = dict(refund_extra(sale))
    elif kind == "transfer":
        extra = {48: CMB_DEST}
    else:
        extra = dict(pre_auth_extra(pa))
    amount = {"void": 1_600, "refund": 10, "transfer": 10, "pre_auth_void": 1_700}.get(kind, 1_700)
    _, f = card_request(t, kind, ICBC_CARD, amount, extra=extra)  # type: ignore[arg-type]
    return f


@pytest.mark.parametrize("kind, missing", [
    ("void", 37), ("void", 61), ("refund", 37), ("refund", 61), ("pre_auth_void", 38), ("pre_auth_void", 61),
    ("completion", 38), ("completion", 61), ("completion_advice", 38), ("completion_advice", 61),
    ("transfer", 48), ("consume", 22),
])
async def test_missing_conditional_field_is_30(demo: DemoSwitch, kind: str, missing: int) -> None:
    from .helpers import KEYS
    async with signed_on(demo.terminal("10000001")) as t:
        sale = await do(t, "consume", ICBC_CARD, 1_600)
        pa = await do(t, "pre_auth", ICBC_CARD, 1_700)
        assert sale.code == "00" and pa.code == "00"
        f = _follow_up_fields(t, kind, sale, pa) if kind != "consume" else card_request(
            t, "consume", ICBC_CARD, 1_800)[1]
        del f[missing]
        r = await t.send_fields(KEYS[kind][0], f)
        assert r.code == "30", (kind, missing, r)
        # the original is untouched: the complete request is approved
        f2 = _follow_up_fields(t, kind, sale, pa) if kind != "consume" else card_request(
            t, "consume", ICBC_CARD, 1_800)[1]
        assert (await t.send_fields(KEYS[kind][0], f2)).code == "00", kind


async def test_pin_fields_come_together(demo: DemoSwitch) -> None:
    """§6.1: 26 + 52 + 53 together when a PIN was entered; §4: 26 present iff 52 is."""
    async with signed_on(demo.terminal("10000001")) as t:
        mti, f = card_request(t, "consume", ICBC_CARD, 1_900, pin=PIN[ICBC_CARD])
        del f[26]
        assert (await t.send_fields(mti, f)).code == "30"
        mti, f = card_request(t, "consume", ICBC_CARD, 1_901, pin=PIN[ICBC_CARD])
        del f[52]
        assert (await t.send_fields(mti, f)).code == "30"


async def test_settlement_and_upload_mandatory_fields(demo: DemoSwitch) -> None:
    """§6.1: settlement 48 M (62 digits), 49 M; batch upload 48 M; 0400: 39 M."""
    async with signed_on(demo.terminal("20000001")) as t:
        s = settle(t, totals(0, 0, 0, 0))
        del s[49]
        assert (await t.send_fields("0500", s, mac=False)).code == "30"
        assert (await t.send_fields("0500", settle(t, totals(0, 0, 0, 0)[:-2]), mac=False)).code == "30"
        assert (await t.send_fields("0500", settle(t, totals(0, 0, 0, 0) + "00"), mac=False)).code == "30"
        r = await t.send_fields("0320", mgmt(t, "202"), mac=False)
        assert (r.mti, r.code) == ("0330", "30")
        sale = await do(t, "consume", CMB_CARD, 2_000)
        rev = reversal_of(t, sale.request_fields)
        del rev[39]
        assert (await t.send_fields("0400", rev)).code == "30"
        # §11: that 0400 was answered; the same TID + batch + STAN + MTI with other bytes is 94
        assert (await reverse(t, sale)).code == "94"


# ==============================================================================================
# §3 / §4 formats: over-long variable fields and a bad pad nibble are format errors (30)
# ==============================================================================================
def _relen(frame: bytes) -> bytes:
    body = frame[2:]
    return len(body).to_bytes(2, "big") + body


async def test_over_long_variable_fields_are_30(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal("10000001")) as t:
        # F63 ans..163: 164 bytes
        mti, f = card_request(t, "consume", ICBC_CARD, 2_100, extra={63: "A" * 163})
        frame, _ = t.build_frame(mti, f, mac=True)
        old = b"\x01\x63" + b"A" * 163
        assert frame.count(old) == 1
        r = await t.send_raw(_relen(frame.replace(old, b"\x01\x64" + b"A" * 164)))
        assert r is not None and (r.mti, r.code) == ("0210", "30"), r
        # F60 n..17: 18 digits
        mti, f = card_request(t, "consume", ICBC_CARD, 2_101)
        frame, _ = t.build_frame(mti, f, mac=True)
        f60 = bytes.fromhex("0011" + str(f[60]) + "0")
        assert frame.count(f60) == 1
        r = await t.send_raw(_relen(frame.replace(f60, bytes.fromhex("0018" + str(f[60]) + "1234567"))))
        assert r is not None and (r.mti, r.code) == ("0210", "30"), r
        # F2 n..19: 20 digits (F11 and F41 still decode: the prefix gives its extent)
        mti, f = card_request(t, "consume", ICBC_CARD, 2_102, entry="manual")
        frame, _ = t.build_frame(mti, f, mac=True)
        f2 = bytes.fromhex("19" + ICBC_CARD + "0")
        assert frame.count(f2) == 1
        r = await t.send_raw(frame.replace(f2, bytes.fromhex("20" + ICBC_CARD + "1")))
        assert r is not None and (r.mti, r.code) == ("0210", "30"), r


async def test_f22_with_a_non_digit_pad_nibble_is_30(demo: DemoSwitch) -> None:
    """§3: F22 is left-aligned (021 -> 02 10); a non-digit nibble in a numeric field is a format error."""
    async with signed_on(demo.terminal("10000001")) as t:
        mti, f = card_request(t, "consume", ICBC_CARD, 2_200, pin=PIN[ICBC_CARD])
        frame, _ = t.build_frame(mti, f, mac=True)
        f22_25 = bytes.fromhex("0210" + "00")
        assert frame.count(f22_25) == 1
        r = await t.send_raw(frame.replace(f22_25, bytes.fromhex("021F" + "00")))
        assert r is not None and (r.mti, r.code) == ("0210", "30"), r


async def test_zero_length_frame_is_closed(demo: DemoSwitch) -> None:
    """§12.1 step 1: nothing decodes (no MTI, F11, F41): the connection is closed, unanswered."""
    t = demo.terminal("10000001")
    assert await t.send_raw(b"\x00\x00", oneshot=True, timeout=15) is None


# ==============================================================================================
# §10.1 the MAC is upper-case hex; §4 F44 on declines before routing
# ==============================================================================================
async def test_lower_case_mac_is_a0(demo: DemoSwitch) -> None:
    """§10.1: F64 = the first 8 upper-case hex characters of E2, as ASCII; anything else is wrong."""
    async with signed_on(demo.terminal("10000001")) as t:
        mti, f = card_request(t, "consume", ICBC_CARD, 2_300)
        frame, sent = t.build_frame(mti, f, mac=True)
        mac = sent[64]
        assert isinstance(mac, bytes) and mac == mac.upper()
        if mac == mac.lower():  # all digits: no letter to change case; use another amount
            mti, f = card_request(t, "consume", ICBC_CARD, 2_301)
            frame, sent = t.build_frame(mti, f, mac=True)
            mac = sent[64]
            assert isinstance(mac, bytes)
        assert mac != mac.lower()
        r = await t.send_raw(frame[:-8] + mac.lower())
        assert r is not None and r.code == "A0", r
        assert (await t.send_fields(mti, {**f, 11: t.take_stan()})).code == "00"


async def test_f44_names_no_issuer_on_declines_before_routing(demo: DemoSwitch) -> None:
    """§4 F44: the issuer part is spaces when none was chosen (A0, 77, 13, 14 precede routing)."""
    spaces = " " * 11 + ACQ.ljust(11)
    async with signed_on(demo.terminal("10000001")) as t:
        _, f = card_request(t, "consume", ICBC_CARD, 2_400)
        assert (await bad_mac(t, "0200", f)).fields.get(44) == spaces
        _, f = card_request(t, "consume", ICBC_CARD, 2_401)
        f[60] = "22" + f"{(int(t.batch) + 9) % 1_000_000:06d}" + "000"
        r = await t.send_fields("0200", f)
        assert r.code == "77" and r.fields.get(44) == spaces
        r = await do(t, "consume", ICBC_CARD, 0)
        assert r.code == "13" and r.fields.get(44) == spaces
        _, f = card_request(t, "consume", BAD_LUHN, 2_402, entry="manual")
        r = await t.send_fields("0200", f)
        assert r.code == "14" and r.fields.get(44) == spaces


async def test_scan_code_with_a_card_bin_prefix_is_15(demo: DemoSwitch) -> None:
    """§7: scan-to-pay routes by the code's prefix (10-15 WeChat, 25-30 Alipay), any other prefix
    15, even one that is a card BIN of a working issuer."""
    async with signed_on(demo.terminal("10000001")) as t:
        code = ICBC_CARD[:18]
        r = await send(t, scan_request(t, "consume", code, 2_500))
        assert r.code == "15" and r.fields.get(44) == " " * 11 + ACQ.ljust(11), r


# ==============================================================================================
# §11 the duplicate key includes the batch
# ==============================================================================================
async def test_same_stan_in_another_batch_is_not_a_duplicate(demo: DemoSwitch) -> None:
    """§11: duplicates are TID + batch + STAN + MTI; an echo test with the same STAN but another
    60.2 is a new request (management 60.2 is not checked), answered 00, not 94."""
    t = demo.terminal("10000002")
    stan = t.take_stan()
    a = await t.send_fields("0820", {11: stan, 41: t.tid, 42: t.mid, 60: "00000101301"}, mac=False, oneshot=True)
    b = await t.send_fields("0820", {11: stan, 41: t.tid, 42: t.mid, 60: "00000102301"}, mac=False, oneshot=True)
    assert a.code == "00" and b.code == "00", (a, b)
    assert b.fields[60] == "00000102301"


# ==============================================================================================
# §9.6 / §12.1 step 6 for 0100 and 0220; §7 follow-ups naming an original of another type
# ==============================================================================================
async def test_wrong_batch_of_pre_auth_refund_and_advice_is_77(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal("10000001")) as t:
        sale = await do(t, "consume", ICBC_CARD, 2_600)
        pa = await do(t, "pre_auth", ICBC_CARD, 2_700)
        stale = "22" + f"{(int(t.batch) + 11) % 1_000_000:06d}" + "000"
        for kind, amount, extra in (("pre_auth", 10, {}), ("refund", 10, refund_extra(sale)),
                                    ("completion_advice", 2_700, pre_auth_extra(pa)),
                                    ("pre_auth_void", 2_700, pre_auth_extra(pa))):
            mti, f = card_request(t, kind, ICBC_CARD, amount, pin=PIN[ICBC_CARD], extra=extra)
            f[60] = str(f[60])[:2] + stale[2:]
            r = await t.send_fields(mti, f)
            assert r.code == "77", (kind, r)


async def test_follow_ups_naming_an_original_of_another_type_are_25(demo: DemoSwitch) -> None:
    """§7: a consume void's original is a consume (or scan-to-pay); a completion void's is a
    completion; a pre-auth void / completion's is a pre-auth. Anything else is not found (25)."""
    async with signed_on(demo.terminal("10000001")) as t:
        pa = await do(t, "pre_auth", ICBC_CARD, 2_800)
        comp = await do(t, "completion", ICBC_CARD, 2_800, extra=pre_auth_extra(pa))
        sale = await do(t, "consume", ICBC_CARD, 2_900)
        tr = await do(t, "transfer", ICBC_CARD, 3_000, extra={48: CMB_DEST})
        assert all(x.code == "00" for x in (pa, comp, sale, tr))
        assert (await do(t, "void", ICBC_CARD, 2_800, extra=void_extra(comp))).code == "25"
        assert (await do(t, "void", ICBC_CARD, 3_000, extra=void_extra(tr))).code == "25"
        assert (await do(t, "completion_void", ICBC_CARD, 2_900, extra=void_extra(sale))).code == "25"
        sale_as_pa = {38: str(sale.fields[38]), 61: sale.batch + sale.stan + str(sale.fields[13])}
        assert (await do(t, "completion", ICBC_CARD, 2_900, extra=sale_as_pa)).code == "25"
        assert (await do(t, "pre_auth_void", ICBC_CARD, 2_900, extra=sale_as_pa)).code == "25"
        # the right follow-ups still work
        assert (await do(t, "completion_void", ICBC_CARD, 2_800, extra=void_extra(comp))).code == "00"
        assert (await do(t, "void", ICBC_CARD, 2_900, extra=void_extra(sale))).code == "00"


async def test_within_step_9_state_before_mismatch(demo: DemoSwitch) -> None:
    """§12.1 step 9 lists 25, 12, 64 in this order (§7 the same): an original in the wrong state
    named with another amount or card is 12."""
    async with signed_on(demo.terminal("10000001")) as t:
        sale = await do(t, "consume", ICBC_CARD, 3_100)
        assert (await do(t, "void", ICBC_CARD, 3_100, extra=void_extra(sale))).code == "00"
        assert (await do(t, "void", ICBC_CARD, 3_101, extra=void_extra(sale))).code == "12"
        assert (await do(t, "void", ICBC_POOR, 3_100, extra=void_extra(sale))).code == "12"
        assert (await do(t, "refund", ICBC_POOR, 100, extra=refund_extra(sale))).code == "12"
        pa = await do(t, "pre_auth", ICBC_CARD, 3_200)
        assert (await do(t, "completion", ICBC_CARD, 3_200, extra=pre_auth_extra(pa))).code == "00"
        assert (await do(t, "completion", ICBC_CARD, 3_681, extra=pre_auth_extra(pa))).code == "12"
        assert (await do(t, "pre_auth_void", ICBC_CARD, 3_201, extra=pre_auth_extra(pa))).code == "12"


# ==============================================================================================
# §6.1 card presentation per entry mode; §4 F61 n..29; §2 digit 6 is the switch's
# ==============================================================================================
async def test_ic_and_scan_without_f2_are_30(demo: DemoSwitch) -> None:
    """§6.1: 2 or 35 M (35 for a swipe, 2 otherwise): an IC request carrying only a track is
    missing F2; so is a scan-to-pay without its payment code."""
    async with signed_on(demo.terminal("10000001")) as t:
        f = t.card_fields(processing_code="000000", type_code="22", card=ICBC_CARD, amount_fen=3_300,
                          entry="ic", expiry="3012", card_seq="001",
                          track2=f"{ICBC_CARD}=30122011234567890")
        assert 35 in f and 2 in f
        ok = await t.send_fields("0200", dict(f))
        assert ok.code == "00" and ok.fields[2] == ICBC_CARD and 35 not in ok.fields
        g = dict(f)
        g[11] = t.take_stan()
        del g[2]
        assert (await t.send_fields("0200", g)).code == "30"
        _, s = scan_request(t, "consume", WECHAT_CODE, 3_301)
        del s[2]
        assert (await t.send_fields("0200", s)).code == "30"


async def test_f61_up_to_29_digits_and_void_ignores_61_3(demo: DemoSwitch) -> None:
    """§4 F61 n..29 (61.1 batch, 61.2 STAN, 61.3 date; further digits are within the format);
    §7: a consume void is found by batch + STAN and its RRN; the date is not one of its checks."""
    async with signed_on(demo.terminal("10000001")) as t:
        sale = await do(t, "consume", ICBC_CARD, 3_400)
        r = await do(t, "refund", ICBC_CARD, 100, extra={37: str(sale.fields[37]),
                                                         61: "000000000000" + str(sale.fields[13]) + "0" * 13})
        assert r.code == "00", r
        saleb = await do(t, "consume", ICBC_CARD, 3_402)
        long61b = saleb.batch + saleb.stan + str(saleb.fields[13]) + "0" * 13
        v = await do(t, "void", ICBC_CARD, 3_402, extra={37: str(saleb.fields[37]), 61: long61b})
        assert v.code == "00", v
        sale2 = await do(t, "consume", ICBC_CARD, 3_401)
        other_date = "0229" if str(sale2.fields[13]) != "0229" else "0228"
        v2 = await do(t, "void", ICBC_CARD, 3_401, extra={37: str(sale2.fields[37]),
                                                         61: sale2.batch + sale2.stan + other_date})
        assert v2.code == "00", v2


async def test_completion_void_needs_the_completion_rrn(demo: DemoSwitch) -> None:
    async with signed_on(demo.terminal("10000001")) as t:
        pa = await do(t, "pre_auth", ICBC_CARD, 3_500)
        comp = await do(t, "completion", ICBC_CARD, 3_500, extra=pre_auth_extra(pa))
        assert comp.code == "00"
        wrong = {**void_extra(comp), 37: str(pa.fields[37])}
        assert (await do(t, "completion_void", ICBC_CARD, 3_500, extra=wrong)).code == "25"
        assert (await do(t, "completion_void", ICBC_CARD, 3_500, extra=void_extra(comp))).code == "00"


async def test_request_header_digit6_is_not_echoed(demo: DemoSwitch) -> None:
    """§2: terminals send digit 6 = 0; the response's digit 6 is the switch's (0 for a signed-on
    terminal with fresh parameters), whatever the request carried; digit 5 is echoed."""
    t = demo.terminal("20000001", header=bytes.fromhex("603113000000"))
    async with t.connect():
        assert (await t.sign_on("003")).code == "00"
        assert (await t.parameter_download()).code == "00"
        e = await t.echo_test()
        assert e.code == "00" and e.header == bytes.fromhex("603110000000"), e.header.hex()
        r = await t.consume(CMB_CARD, 3_600, pin=PIN[CMB_CARD], expiry="2912")
        assert r.code == "00" and r.header == bytes.fromhex("603110000000"), r.header.hex()


# ==============================================================================================
# §7 the 115 % cap is not rounded up; §12.1 step 7 amount 13 on every amount-carrying type
# ==============================================================================================
@pytest.mark.parametrize("pre_auth_fen, allowed, refused", [(999, 1_148, 1_149), (3, 3, 4), (1_001, 1_151, 1_152)])
async def test_completion_cap_is_115_percent_without_rounding_up(
    demo: DemoSwitch, pre_auth_fen: int, allowed: int, refused: int
) -> None:
    async with signed_on(demo.terminal("10000001")) as t:
        pa = await do(t, "pre_auth", ICBC_CARD, pre_auth_fen)
        assert pa.code == "00"
        assert refused * 100 > pre_auth_fen * 115 >= allowed * 100
        assert (await do(t, "completion", ICBC_CARD, refused, extra=pre_auth_extra(pa))).code == "64"
        assert (await do(t, "completion_advice", ICBC_CARD, refused, extra=pre_auth_extra(pa))).code == "64"
        assert (await do(t, "completion", ICBC_CARD, allowed, extra=pre_auth_extra(pa))).code == "00"


async def test_zero_amount_on_follow_ups_is_13(demo: DemoSwitch) -> None:
    """§12.1 step 7 (amount 13) precedes step 9 (original checks: 64 for another amount)."""
    async with signed_on(demo.terminal("10000001")) as t:
        sale = await do(t, "consume", ICBC_CARD, 3_700)
        pa = await do(t, "pre_auth", ICBC_CARD, 3_800)
        for kind, extra in (("refund", refund_extra(sale)), ("void", void_extra(sale)),
                            ("pre_auth_void", pre_auth_extra(pa)), ("completion", pre_auth_extra(pa)),
                            ("completion_advice", pre_auth_extra(pa)), ("pre_auth", {})):
            r = await do(t, kind, ICBC_CARD, 0, extra=extra)
            assert r.code == "13", (kind, r)
        assert (await do(t, "void", ICBC_CARD, 3_700, extra=void_extra(sale))).code == "00"


# ==============================================================================================
# §4 / vectors: an approved balance inquiry carries no auth code; §9.1 the lockout is for activations
# ==============================================================================================
async def test_approved_balance_exact_layout(demo: DemoSwitch) -> None:
    """§4 F38: every approved 0110/0210 except a balance inquiry carries one; the golden vector
    balance_response is echoes (no 4) + 12 13 15 32 37 39 44 54 63 64."""
    async with signed_on(demo.terminal("10000001")) as t:
        r = await do(t, "balance", ICBC_CARD, None)
        assert r.code == "00"
        assert set(r.fields) == {2, 3, 11, 12, 13, 15, 25, 32, 37, 39, 41, 42, 44, 49, 54, 60, 63, 64}, r
        f54 = str(r.fields[54])
        assert len(f54) == 20 and f54[:8] == "1002156C" and f54[8:].isdigit()


async def test_activation_lockout_leaves_other_messages_alone(tmp_path: Path) -> None:
    """§9.1: from the sixth attempt after five wrong codes every activation from that address
    gets 75; nothing says other messages from it are refused (§1: each message is answered)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    der = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    with DemoSwitch(tmp_path) as sw:
        probe = TerminalClient("127.0.0.1", sw.port, " " * 8, " " * 15, bytes(16))
        probe.next_stan = 960001
        codes = []
        for code in ("11111111", "22222222", "33333333", "44444444", "55555555", "48213579"):
            r = await probe.send_fields("0800", {11: probe.take_stan(), 41: " " * 8, 42: " " * 15,
                                                 60: "00000001351", 62: code.encode() + der},
                                        mac=False, oneshot=True)
            codes.append(r.code)
        assert codes == ["97"] * 5 + ["75"]
        async with signed_on(sw.terminal("10000001")) as t:
            assert (await t.echo_test()).code == "00"
            assert (await do(t, "consume", ICBC_CARD, 100)).code == "00"


async def test_timeouts_of_pre_auth_balance_and_transfer_source_are_98(demo: DemoSwitch) -> None:
    """§7: no issuer answer within issuer_timeout -> 98 for every type (F44 names the silent
    issuer); the terminal's reversal of a timed-out pre-auth answers 00 (§11); a transfer whose
    debit leg timed out credits nothing."""
    async with signed_on(demo.terminal("20000001")) as t:
        bal = await do(t, "balance", CMB_DEST, None)
        assert bal.code == "00"
        dest_before = str(bal.fields[54])
        pa = await do(t, "pre_auth", SLOW_CARD, 4_100, pin=False)
        assert pa.code == "98" and pa.fields[44] == "SLOW".ljust(11) + ACQ.ljust(11) and 38 not in pa.fields
        assert (await reverse(t, pa)).code == "00"
        assert (await do(t, "balance", SLOW_CARD, None, pin=False)).code == "98"
        tr = await do(t, "transfer", SLOW_CARD, 4_200, pin=False, extra={48: CMB_DEST})
        assert tr.code == "98", tr
        after = await do(t, "balance", CMB_DEST, None)
        assert after.code == "00" and str(after.fields[54]) == dest_before
