"""Conformance review (D) of the switch against protocol §1-§6.1, §8, §10, §12 and §12.1, over TCP.

Probes what reviews A, B and C leave out: requests that fail two checks of §12.1 at once (which
code wins), response layouts of declines not yet covered, out-of-order answers on one connection
(§1), fields a type does not list (§6.1), a frame of exactly ``max_frame`` bytes (§1) and the MAC
failure count's reset by a sign-on (§10.1). Each test drives the real ``switch demo`` exactly as
protocol.md says and asserts what the CONTRACT says. The six the switch failed when the review
ran (transfer Luhn before route, a short F60, an activation's 30 layout, GBK in F41/F42, a bad
leading pad nibble in F23) were strict xfails until the switch was mended.

Must not: sleep as an assertion, print a PIN or a full PAN, or edit anything but this file.
"""

from __future__ import annotations

import anyio
import pytest

from switch.core.codec import Codec, Fields, load_dialect
from switch.core.framing import encode_frame
from switch.crypto.des import des_ecb_encrypt
from switch.pos.client import Response, TerminalClient

from .conftest import DemoSwitch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CODEC = Codec(load_dialect("terminal"))
CARD = "6222029375642931684"  # ICBC, PIN 123456, expiry 3012, 1,000,000.00
CARD_BOC = "6216611771534246833"  # route configured, link down -> 91
CARD_SLOW = "6228489187204683748"  # accepts, never answers -> 98
CARD_NO_ROUTE = "4111237450925694"  # passes Luhn, no route
CARD_BAD_LUHN = CARD[:-1] + str((int(CARD[-1]) + 1) % 10)
CMB_DEST = "6214831675710245"
M2_MID = "898310058120002"
ACQ = "48521000"
ECHO = {2, 3, 4, 11, 25, 41, 42, 49, 60}
FIN_DECLINE = {2, 3, 4, 11, 12, 13, 15, 25, 32, 37, 39, 41, 42, 44, 49, 60, 63}
M1_LIMIT_FEN = 30_000_000  # §13 micro: 300,000.00 CNY in fen


def consume_fields(term: TerminalClient, *, pin: bool = True, card: str = CARD, amount: int = 1234,
                   type_code: str = "22", entry: str = "swipe", pcode: str = "000000") -> Fields:
    return term.card_fields(processing_code=pcode, type_code=type_code, card=card, amount_fen=amount,
                            pin="123456" if pin else None, expiry="3012", entry=entry)


def raw_frame(term: TerminalClient, mti: str, fields: Fields) -> bytes:
    return encode_frame(term.tpdu, term.header, CODEC.encode(mti, dict(sorted(fields.items()))))


async def send_bad_mac(term: TerminalClient, mti: str, fields: Fields) -> Response:
    bad = dict(fields)
    bad[64] = b"\x00" * 8
    return await term.send_fields(mti, bad, mac=False)


def bad_pin_block(term: TerminalClient) -> bytes:
    assert term.keys is not None
    return des_ecb_encrypt(term.keys.pik, b"\xff" * 8)  # not format 0 for any PAN


# ==============================================================================================
# §12.1: two failures at once
# ==============================================================================================
async def test_03_before_40_and_before_77(demo: DemoSwitch) -> None:
    """Step 2 (03) before step 3 (40) and step 4 (77)."""
    term = demo.terminal("10000002")
    async with term.connect():
        await term.sign_on("003")
        assert (await term.sign_off()).code == "00"
        f = consume_fields(term, pin=False, entry="manual", type_code="98")
        f[42] = M2_MID
        r = await term.send_fields("0200", f)
        assert r.code == "03" and set(r.fields) == FIN_DECLINE
        f = consume_fields(term, pin=False, entry="manual")
        f[42] = M2_MID
        assert (await term.send_fields("0200", f)).code == "03"


async def test_40_before_77(demo: DemoSwitch) -> None:
    """Step 3 (40) before step 4 (77): a signed-off terminal's unknown key."""
    term = demo.terminal("10000002")
    async with term.connect():
        await term.sign_on("003")
        assert (await term.sign_off()).code == "00"
        r = await term.send_fields("0200", consume_fields(term, pin=False, entry="manual", type_code="98"))
        assert r.code == "40" and r.header_digit6 == 3


async def test_a0_before_94(demo: DemoSwitch) -> None:
    """Step 4 (A0) before step 5 (94): other bytes under an already answered key, bad MAC."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, amount=21)
        assert (await term.send_fields("0200", f)).code == "00"
        g = dict(f)
        g[4] = "000000000022"
        assert (await send_bad_mac(term, "0200", g)).code == "A0"
        assert (await term.send_fields("0200", g)).code == "94"


async def test_94_before_mandatory_30(demo: DemoSwitch) -> None:
    """Step 5 (94) before step 7 (30)."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, amount=23)
        assert (await term.send_fields("0200", f)).code == "00"
        g = dict(f)
        del g[49]
        r = await term.send_fields("0200", g)
        assert r.code == "94" and set(r.fields) == FIN_DECLINE - {49} and 64 not in r.fields


async def test_limit_61_before_pin_block_99(demo: DemoSwitch) -> None:
    """Step 9 (61) before step 10 (99): an amount above the micro merchant's monthly limit with a
    PIN block that does not decode."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, amount=M1_LIMIT_FEN + 1)
        f[52] = bad_pin_block(term)
        r = await term.send_fields("0200", f)
        assert r.code == "61"
        assert r.fields[44] == "ICBC".ljust(11) + ACQ.ljust(11) and set(r.fields) == FIN_DECLINE


async def test_limit_61_before_link_down_91(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        r = await term.send_fields("0200", consume_fields(term, pin=False, card=CARD_BOC,
                                                          amount=M1_LIMIT_FEN + 1))
        assert r.code == "61" and r.fields[44] == "BOC".ljust(11) + ACQ.ljust(11)


async def test_transfer_luhn_before_route(demo: DemoSwitch) -> None:
    """Step 8: "Luhn → 14; route → 15". A transfer whose source card has no route and whose
    destination (F48) fails Luhn fails the Luhn check first."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = term.card_fields(processing_code="400000", type_code="49", card=CARD_NO_ROUTE, amount_fen=5,
                             expiry="3012", entry="manual", additional_data=CARD_BAD_LUHN)
        r = await term.send_fields("0200", f)
        assert r.code == "14"


async def test_void_luhn_before_original_lookup(demo: DemoSwitch) -> None:
    """Step 8 (14) before step 9 (25)."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = term.card_fields(processing_code="200000", type_code="23", card=CARD_BAD_LUHN, amount_fen=5,
                             expiry="3012", entry="manual", rrn="000000000000", original="000001999999")
        assert (await term.send_fields("0200", f)).code == "14"


async def test_unknown_terminal_decode_error_is_30_not_97(demo: DemoSwitch) -> None:
    """Step 1 (30) before step 2 (97); digit 6 = 0 for an unknown terminal."""
    term = TerminalClient("127.0.0.1", demo.port, "99999997", "898310048990001", bytes(16))
    term.next_stan = 960001
    frame = raw_frame(term, "0200", consume_fields(term, pin=False, entry="manual") | {64: bytes(8)})
    f60 = bytes.fromhex("0011") + bytes.fromhex("2200000100")
    assert frame.count(f60) == 1
    r = await term.send_raw(frame.replace(f60, bytes.fromhex("0011") + bytes.fromhex("22A0000100")),
                            oneshot=True)
    assert r is not None and (r.mti, r.code) == ("0210", "30") and r.header_digit6 == 0


# ==============================================================================================
# §6.1 response layouts not covered elsewhere
# ==============================================================================================
async def test_unknown_terminal_financial_97_layout(demo: DemoSwitch) -> None:
    term = TerminalClient("127.0.0.1", demo.port, "99999996", "898310048990001", bytes(16))
    term.next_stan = 970001
    r = await term.send_fields("0200", consume_fields(term, pin=False, entry="manual"), oneshot=True)
    assert r.code == "97" and set(r.fields) == FIN_DECLINE and 64 not in r.fields
    assert r.fields[44] == " " * 11 + ACQ.ljust(11) and r.fields[63] == "CUP"
    assert r.fields[32] == ACQ and len(str(r.fields[37])) == 12


async def test_pre_auth_and_refund_decline_layouts(demo: DemoSwitch) -> None:
    """0110 and 0230 declines carry the financial decline layout."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        pa = term.card_fields(processing_code="030000", type_code="10", condition_code="06", card=CARD_NO_ROUTE,
                              amount_fen=100, expiry="3012", entry="manual")
        r = await term.send_fields("0100", pa)
        assert (r.mti, r.code) == ("0110", "15") and set(r.fields) == FIN_DECLINE
        rf = term.card_fields(processing_code="200000", type_code="25", card=CARD, amount_fen=100,
                              expiry="3012", entry="manual", rrn="999999999999", original="000000000000" + "0101")
        r = await term.send_fields("0220", rf)
        assert (r.mti, r.code) == ("0230", "25") and set(r.fields) == FIN_DECLINE
        assert r.fields[44][:11] == "ICBC".ljust(11)


async def test_reversal_25_layout(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, entry="manual", amount=77)
        rev = {k: v for k, v in f.items() if k in (2, 3, 4, 11, 14, 22, 25, 49, 60)}
        rev.update({39: "98", 41: term.tid, 42: term.mid})
        r = await term.send_fields("0400", rev)
        assert (r.mti, r.code) == ("0410", "25")
        assert set(r.fields) == FIN_DECLINE and 64 not in r.fields


async def test_management_declines_layouts(demo: DemoSwitch) -> None:
    """0830 echo test and 0810 parameter download of a terminal whose F42 is not its merchant."""
    term = demo.terminal("10000001")
    e = await term.send_fields("0820", {11: term.take_stan(), 41: term.tid, 42: M2_MID, 60: "00000001301"},
                               mac=False, oneshot=True)
    assert (e.mti, e.code) == ("0830", "03") and set(e.fields) == {11, 12, 13, 39, 41, 42, 60}
    p = await term.send_fields("0800", {11: term.take_stan(), 41: term.tid, 42: M2_MID, 60: "00000001360"},
                               mac=False, oneshot=True)
    assert (p.mti, p.code) == ("0810", "03") and set(p.fields) == {11, 39, 41, 42, 60}


# ==============================================================================================
# §6.1 fields not listed for a type: ignored, never echoed, never a 30
# ==============================================================================================
async def test_settlement_and_sign_on_ignore_a_bogus_f64(demo: DemoSwitch) -> None:
    """Sign-on and settlement carry no MAC (§6): an F64 they carry is not checked; no 64 back."""
    term = demo.terminal("20000001")
    async with term.connect():
        r = await term.send_fields("0800", {11: term.take_stan(), 41: term.tid, 42: term.mid,
                                            60: "00000001003", 64: b"\x01" * 8}, mac=False)
        assert r.code == "00" and 64 not in r.fields
        await term.sign_on("003")
        s = await term.send_fields("0500", {11: term.take_stan(), 41: term.tid, 42: term.mid, 48: "0" * 62,
                                            49: "156", 60: "00" + term.batch + "201", 64: b"\x01" * 8},
                                   mac=False)
        assert s.code == "00" and 64 not in s.fields


async def test_ic_consume_with_f23_f55_f59_f63(demo: DemoSwitch) -> None:
    """§4: 23 (IC), 55 (ICC TLV), 59 (terminal information), 63 (operator) accepted; none echoed;
    63 in the response is CUP."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=31, pin="123456",
                             expiry="3012", entry="ic", card_seq="001", icc_data=bytes.fromhex("9F2608" + "11" * 8))
        f[59] = bytes.fromhex("FF01" + "03" + "414243")
        f[63] = "001"
        r = await term.send_fields("0200", f)
        assert r.code == "00", r
        assert not {22, 23, 26, 52, 53, 55, 59} & set(r.fields) and r.fields[63] == "CUP"
        assert set(r.fields) == FIN_DECLINE | {38, 64}


# ==============================================================================================
# §1 transport
# ==============================================================================================
async def test_answers_in_any_order_on_one_connection(demo: DemoSwitch) -> None:
    """§1: requests in flight on one connection are processed concurrently and each answer is sent
    as soon as it is ready: an echo test sent after a consume at the silent issuer is answered
    first."""
    term = demo.terminal("10000001")
    order: list[str] = []
    async with term.connect():
        await term.sign_on("003")

        async def slow() -> None:
            r = await term.send_fields("0200", consume_fields(term, pin=False, card=CARD_SLOW, amount=41),
                                       timeout=15)
            order.append("slow:" + r.code)

        async def fast() -> None:
            r = await term.echo_test()
            order.append("echo:" + r.code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(fast)
    assert order == ["echo:00", "slow:98"]


async def test_frame_of_exactly_max_frame_is_answered(demo: DemoSwitch) -> None:
    """§1: only a LEN that exceeds max_frame (2048) closes; LEN = 2048 is read and answered. The
    bulk is in fields a consume ignores (48, 62: §6.1) or accepts (36, 55, 59)."""
    term = demo.terminal("10000001")
    track3 = ("99" + CARD + "=" + "1" * 104)[:104]
    async with term.connect():
        await term.sign_on("003")
        f = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=43,
                             expiry="3012", entry="ic", card_seq="001",
                             icc_data=bytes.fromhex("DF0181FB") + bytes(251))
        f.update({36: track3, 48: "1" * 322, 62: bytes(512), 59: b"\x00"})
        frame, _ = term.build_frame("0200", f, mac=True)
        pad = 2048 - (len(frame) - 2)
        assert 0 < pad <= 998, pad
        f[59] = bytes(1 + pad)
        frame, _ = term.build_frame("0200", f, mac=True)
        assert int.from_bytes(frame[:2], "big") == 2048 == len(frame) - 2
        r = await term.send_raw(frame)
        assert r is not None and r.code == "00" and 59 not in r.fields and 48 not in r.fields


# ==============================================================================================
# §10.1 the MAC failure count
# ==============================================================================================
async def test_sign_on_resets_the_mac_failure_count(demo: DemoSwitch) -> None:
    """§10.1: "a valid MAC or a sign-on resets the count": 4 failures, a sign-on, 4 more failures
    do not revoke the keys."""
    term = demo.terminal("10000002")
    async with term.connect():
        await term.sign_on("003")
        for _ in range(4):
            assert (await send_bad_mac(term, "0200", consume_fields(term, pin=False))).code == "A0"
        assert (await term.sign_on("003")).code == "00"
        for _ in range(4):
            r = await send_bad_mac(term, "0200", consume_fields(term, pin=False))
            assert r.code == "A0" and r.header_digit6 != 3
        assert (await term.send_fields("0200", consume_fields(term, pin=False, amount=1))).code == "00"



# ==============================================================================================
# §12.1 steps 4-6 with duplicates and batches
# ==============================================================================================
async def test_stored_response_is_not_resent_to_a_signed_off_terminal(demo: DemoSwitch) -> None:
    """Step 4 (77) before step 5 (the stored response)."""
    term = demo.terminal("10000002")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, amount=51)
        first = await term.send_fields("0200", f)
        assert first.code == "00"
        assert (await term.sign_off()).code == "00"
        frame, _ = term.build_frame("0200", first.request_fields, mac=False)
        again = await term.send_raw(frame)
        assert again is not None and again.code == "77" and again.header_digit6 == 3


async def test_duplicates_are_checked_before_the_batch(demo: DemoSwitch) -> None:
    """Step 5 before step 6: after the batch closed, the same bytes get the stored response and
    other bytes under the same TID + batch + STAN + MTI get 94, not 77."""
    term = demo.terminal("20000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, amount=52)
        first = await term.send_fields("0200", f)
        assert first.code == "00"
        s = await term.send_fields("0500", {11: term.take_stan(), 41: term.tid, 42: term.mid, 48: "0" * 62,
                                            49: "156", 60: "00" + term.batch + "201"}, mac=False)
        assert s.code == "00"
        again = await term.send_fields("0200", f)  # 60.2 is the settled batch now
        assert again.code == "00" and again.body == first.body
        g = dict(f)
        g[4] = "000000000053"
        assert (await term.send_fields("0200", g)).code == "94"
        h = consume_fields(term, pin=False, amount=54)  # a new STAN in the settled batch
        assert (await term.send_fields("0200", h)).code == "77"


async def test_reversal_is_exempt_from_the_batch_check(demo: DemoSwitch) -> None:
    """§9.6 / step 6: reversals are exempt; a 0400 naming a batch that is not open is looked up
    (25 when there is no such original), never 77."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, entry="manual", amount=55)
        f[60] = "22999998000"
        rev = {k: v for k, v in f.items() if k in (2, 3, 4, 11, 14, 22, 25, 49, 60)}
        rev.update({39: "98", 41: term.tid, 42: term.mid})
        assert (await term.send_fields("0400", rev)).code == "25"


async def test_void_original_lookup_before_pin_block(demo: DemoSwitch) -> None:
    """Step 9 (25) before step 10 (99)."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = term.card_fields(processing_code="200000", type_code="23", card=CARD, amount_fen=5, pin="123456",
                             expiry="3012", rrn="000000000000", original=term.batch + "999998")
        f[52] = bad_pin_block(term)
        assert (await term.send_fields("0200", f)).code == "25"


async def test_batch_upload_of_a_signed_off_terminal_is_77(demo: DemoSwitch) -> None:
    term = demo.terminal("10000002")
    async with term.connect():
        await term.sign_on("003")
        assert (await term.sign_off()).code == "00"
        u = await term.send_fields("0320", {11: term.take_stan(), 41: term.tid, 42: term.mid, 48: "0000",
                                            60: "00" + term.batch + "207"}, mac=False)
        assert (u.mti, u.code) == ("0330", "77") and set(u.fields) == {11, 39, 41, 42, 60}
        assert u.header_digit6 == 3


# ==============================================================================================
# §1: one semantically wrong message never closes the connection; a stalled frame does
# ==============================================================================================
async def test_connection_survives_declines_of_every_early_step(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        frame, _ = term.build_frame("0200", consume_fields(term, pin=False), mac=True)
        f53 = bytes.fromhex("0011") + bytes.fromhex("2200")
        bad = frame.replace(f53, bytes.fromhex("0011") + bytes.fromhex("2A00"), 1)
        assert bad != frame
        codes = [(await term.send_raw(bad)).code]  # type: ignore[union-attr]
        codes.append((await term.send_fields("0200", consume_fields(term, pin=False, type_code="98"))).code)
        codes.append((await send_bad_mac(term, "0200", consume_fields(term, pin=False))).code)
        f = consume_fields(term, pin=False)
        f[42] = M2_MID
        codes.append((await term.send_fields("0200", f)).code)
        codes.append((await term.echo_test()).code)
        assert codes == ["30", "40", "A0", "03", "00"]


async def test_frame_stalled_mid_way_is_closed_after_read_timeout(demo: DemoSwitch) -> None:
    """§1: a connection that stalls mid-frame for read_timeout (default 10 s) is closed."""
    stream = await anyio.connect_tcp("127.0.0.1", demo.port)
    async with stream:
        t0 = anyio.current_time()
        await stream.send(b"\x00\x40" + bytes.fromhex("6000030000") + b"\x60")
        closed = False
        with anyio.move_on_after(20):
            try:
                while await stream.receive():
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                closed = True
        elapsed = anyio.current_time() - t0
    assert closed and 9.0 <= elapsed <= 15.0, elapsed


# ==============================================================================================
# §4 switch-set fields
# ==============================================================================================
async def test_f12_f13_f15_are_shanghai_now_and_f38_has_no_spaces(demo: DemoSwitch) -> None:
    from datetime import datetime, timedelta, timezone

    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        before = datetime.now(timezone(timedelta(hours=8)))
        r = await term.send_fields("0200", consume_fields(term, pin=False, amount=56))
        after = datetime.now(timezone(timedelta(hours=8)))
    assert r.code == "00"
    assert r.fields[13] in {before.strftime("%m%d"), after.strftime("%m%d")}
    assert r.fields[15] == r.fields[13]
    stamps = {(before + timedelta(seconds=i)).strftime("%H%M%S")
              for i in range(int((after - before).total_seconds()) + 2)}
    assert r.fields[12] in stamps
    f38 = str(r.fields[38])
    assert len(f38) == 6 and " " not in f38


# ==============================================================================================
# §5 field 60 and §3 GBK text
# ==============================================================================================
async def test_f60_shorter_than_11_digits_is_30(demo: DemoSwitch) -> None:
    """§5: field 60 has at least 11 digits. A consume whose F60 is 22 + batch only (8 digits) has a
    known key (60.1 = 22) and a malformed F60: 30, not 40."""
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = consume_fields(term, pin=False, entry="manual", amount=57)
        f[60] = "22" + term.batch
        r = await term.send_fields("0200", f)
        assert r.code == "30"


async def test_activation_30_carries_41(demo: DemoSwitch) -> None:
    """§6.1: "A 30 carries 11, 39, 41 and whatever else of the echo list decoded" (and so says
    decisions.md for a missing mandatory field): an activation without F62 is 30 with 41 and 42."""
    term = TerminalClient("127.0.0.1", demo.port, " " * 8, " " * 15, bytes(16))
    term.next_stan = 981001
    r = await term.send_fields("0800", {11: term.take_stan(), 41: " " * 8, 42: " " * 15, 60: "00000001351"},
                               mac=False, oneshot=True)
    assert (r.mti, r.code) == ("0810", "30")
    assert {11, 39, 41, 42, 60} <= set(r.fields)


async def test_gbk_tid_is_an_unknown_terminal(demo: DemoSwitch) -> None:
    """§3: ans text that is not ASCII is GBK. A TID of four Chinese characters (8 GBK bytes)
    decodes and names no terminal: 97 (§12.1 step 2)."""
    term = demo.terminal("10000001")
    placeholder = "ZZZZZZZZ"
    gbk_tid = "终端号码".encode("gbk")
    assert len(gbk_tid) == 8
    frame = raw_frame(term, "0820", {11: term.take_stan(), 41: placeholder, 42: term.mid, 60: "00000001301"})
    r = await term.send_raw(frame.replace(placeholder.encode(), gbk_tid), oneshot=True)
    assert r is not None and (r.mti, r.code) == ("0830", "97")


async def test_gbk_mid_is_not_the_terminals_merchant(demo: DemoSwitch) -> None:
    """§3: a Chinese F42 (GBK, 15 bytes) decodes; it is not the terminal's merchant: 03."""
    term = demo.terminal("10000001")
    placeholder = "YYYYYYYYYYYYYYY"
    gbk_mid = "商户号".encode("gbk") + b" " * 9
    assert len(gbk_mid) == 15
    frame = raw_frame(term, "0820", {11: term.take_stan(), 41: term.tid, 42: placeholder, 60: "00000001301"})
    r = await term.send_raw(frame.replace(placeholder.encode(), gbk_mid), oneshot=True)
    assert r is not None and (r.mti, r.code) == ("0830", "03"), r


# ==============================================================================================
# §6.1 approved layouts of the rest of the transaction set (swiped: F2 from track 2)
# ==============================================================================================
async def test_approved_layouts_of_pre_auth_family_refund_and_transfer(demo: DemoSwitch) -> None:
    from .helpers import do, pre_auth_extra, void_extra

    approved = FIN_DECLINE | {38, 64}
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")

        def check(r: Response, mti: str, *, f38: bool = True) -> None:
            assert (r.mti, r.code) == (mti, "00"), r
            assert r.mac_ok is True and r.fields[2] == CARD
            assert set(r.fields) == approved if f38 else approved - {38} <= set(r.fields) <= approved
            assert r.fields[44] == "ICBC".ljust(11) + ACQ.ljust(11) and r.fields[63] == "CUP"

        pa = await do(term, "pre_auth", CARD, 1000)
        check(pa, "0110")
        pav = await do(term, "pre_auth_void", CARD, 1000, extra=pre_auth_extra(pa))
        check(pav, "0110")
        pa2 = await do(term, "pre_auth", CARD, 1000)
        check(pa2, "0110")
        comp = await do(term, "completion", CARD, 1100, extra=pre_auth_extra(pa2))
        check(comp, "0210")
        cv = await do(term, "completion_void", CARD, 1100, extra=void_extra(comp))
        check(cv, "0210")
        adv = await do(term, "completion_advice", CARD, 900, extra=pre_auth_extra(pa2))
        check(adv, "0230", f38=False)
        sale = await do(term, "consume", CARD, 800)
        check(sale, "0210")
        ref = await do(term, "refund", CARD, 300, extra={37: str(sale.fields[37]),
                                                        61: "000000000000" + str(sale.fields[13])})
        check(ref, "0230", f38=False)
        tr = await do(term, "transfer", CARD, 200, extra={48: CMB_DEST})
        check(tr, "0210")
        assert 48 not in tr.fields
        rrns = {str(x.fields[37]) for x in (pa, pav, pa2, comp, cv, adv, sale, ref, tr)}
        assert len(rrns) == 9


# ==============================================================================================
# §2 TPDU and header are not validated; §4 contactless entry
# ==============================================================================================
async def test_odd_tpdu_and_header_are_echoed(demo: DemoSwitch) -> None:
    term = TerminalClient("127.0.0.1", demo.port, "10000001", "898310048990001", bytes(16),
                          tpdu=bytes.fromhex("00FFFF0000"), header=bytes.fromhex("FFFF00ABCDEF"))
    term.next_stan = 990001
    r = await term.echo_test(oneshot=True)
    assert r.code == "00" and r.tpdu == bytes.fromhex("00FFFF0000")
    assert r.header[:2] == b"\xff\xff" and r.header[2] >> 4 == 0 and r.header[3:] == bytes.fromhex("ABCDEF")


async def test_contactless_consume(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=61, pin="123456",
                             expiry="3012", entry="contactless", read_capability="6")
        assert str(f[22]) == "071"
        r = await term.send_fields("0200", f)
        assert r.code == "00" and r.fields[2] == CARD and 23 not in r.fields


async def test_two_frames_in_one_write_and_a_half_closed_request(demo: DemoSwitch) -> None:
    """§1: frames are read back to back from the stream; a terminal that sends its request and
    shuts down its sending side still gets the answer."""
    from switch.core.framing import FrameReader

    term = demo.terminal("10000001")
    stans = [term.take_stan(), term.take_stan()]
    frames = [raw_frame(term, "0820", {11: s, 41: term.tid, 42: term.mid, 60: "00000001301"}) for s in stans]

    async def exchange(data: bytes, want: int, half_close: bool) -> list[str]:
        got: list[str] = []
        stream = await anyio.connect_tcp("127.0.0.1", demo.port)
        async with stream:
            await stream.send(data)
            if half_close:
                await stream.send_eof()
            reader = FrameReader(0xFFFF)
            with anyio.fail_after(10):
                while len(got) < want:
                    reader.receive_data(await stream.receive())
                    while (frame := reader.next_frame()) is not None:
                        mti, fields = CODEC.decode(frame.body)
                        got.append(f"{mti}:{fields[11]!s}:{fields[39]!s}")
        return got

    both = await exchange(frames[0] + frames[1], 2, False)
    assert sorted(both) == sorted(f"0830:{s}:00" for s in stans)
    stan = term.take_stan()
    one = raw_frame(term, "0820", {11: stan, 41: term.tid, 42: term.mid, 60: "00000001301"})
    assert await exchange(one, 1, True) == [f"0830:{stan}:00"]


async def test_f23_with_a_bad_leading_pad_nibble_is_answered_30(demo: DemoSwitch) -> None:
    term = demo.terminal("10000001")
    async with term.connect():
        await term.sign_on("003")
        f = term.card_fields(processing_code="000000", type_code="22", card=CARD, amount_fen=62,
                             expiry="3012", entry="ic", card_seq="001")
        frame, _ = term.build_frame("0200", f, mac=True)
        f22_f23 = bytes.fromhex("0520" + "0001")
        assert frame.count(f22_f23) == 1
        r = await term.send_raw(frame.replace(f22_f23, bytes.fromhex("0520" + "F001")))
        assert r is not None and (r.mti, r.code) == ("0210", "30")
        assert {11, 39, 41} <= set(r.fields)
