"""TransactionManager end to end in memory: frames in, response frames out, journal rows in a real
SqliteStore, mock issuers behind InMemoryIssuerLinks (see conftest.py).

Covers the order of checks of protocol §12.1 (a request failing two checks gets the earlier
code, and each check alone gives its own code), the exact response field sets of §6.1, header
digit 6 (§2), the journal (one row per request, no full PAN, fee on approvals), F44 (§4), issuer
outcomes (§7) and a failing participant becoming 96.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pytest

from switch.core.codec import Fields
from switch.core.framing import encode_frame
from switch.crypto.des import des_ecb_encrypt
from switch.crypto.mac import verify_mac
from switch.domain.cards import luhn_ok, mask_pan
from switch.pos.client import TerminalClient

if TYPE_CHECKING:  # fixtures come from conftest.py; its classes are imported for typing only
    from conftest import Decoded, Harness

pytestmark = pytest.mark.anyio

ACQ = "48521000"
RICH = "6222029375642931684"  # ICBC, 1,000,000.00
POOR = "6222028992986377539"  # ICBC, 100.00
EXPIRED = "6222021007789355041"
LOST = "6222029410528228689"
STOLEN = "6222023650908004509"
CMB_CARD = "6214834474520070"
SLOW_CARD = "6228489187204683748"
BOC_CARD = "6216611771534246833"
NO_ROUTE = "4111237450925694"
BAD_LUHN = "6222029375642931685"  # RICH with the wrong check digit
ALL_PANS = (RICH, POOR, EXPIRED, LOST, STOLEN, CMB_CARD, SLOW_CARD, BOC_CARD, NO_ROUTE, BAD_LUHN)

ECHO = (2, 3, 4, 11, 25, 41, 42, 49, 60)
FIN_EXTRA = {12, 13, 15, 32, 37, 39, 44, 63}  # every 0210, approvals and declines alike (§6.1)
NOT_A_FORMAT0_BLOCK = bytes.fromhex("1412345FFFFFFFFF")  # format 1: decrypts to an invalid format 0


def test_demo_cards_are_what_the_cases_assume() -> None:
    assert all(luhn_ok(p) for p in ALL_PANS if p != BAD_LUHN)
    assert not luhn_ok(BAD_LUHN)


# ---- request building ------------------------------------------------------------------------
@dataclass(frozen=True)
class Req:
    """A consume (or balance inquiry) request, and the faults to put in it."""

    tid: str = "10000001"
    signed_on: bool = True
    card: str = RICH
    amount_fen: int | None = 12345
    pin: str | None = "123456"
    entry: str = "manual"
    expiry: str | None = "3012"
    batch: str | None = None  # replaces 60.2
    drop: tuple[int, ...] = ()
    bad_mac: bool = False
    bad_pin_block: bool = False


def frame_for(client: TerminalClient, req: Req) -> tuple[bytes, Fields]:
    """The request frame ``req`` describes, from ``client`` as it stands (keys, batch, STAN)."""
    if req.batch is not None:
        client.batch = req.batch
    balance = req.amount_fen is None
    fields = client.card_fields(
        processing_code="310000" if balance else "000000",
        type_code="01" if balance else "22",
        card=req.card,
        amount_fen=req.amount_fen,
        pin=req.pin if client.keys is not None else None,
        entry=req.entry,
        expiry=req.expiry,
    )
    if req.bad_pin_block:
        assert client.keys is not None
        fields[52] = des_ecb_encrypt(client.keys.pik, NOT_A_FORMAT0_BLOCK)
    for k in req.drop:
        fields.pop(k, None)
    if req.bad_mac:
        fields[64] = b"00000000"
        return client.build_frame("0200", fields, mac=False)
    return client.build_frame("0200", fields, mac=True)


async def build(h: Harness, req: Req) -> tuple[TerminalClient, bytes, Fields]:
    """The client (signed on and parameters downloaded when asked) and the request frame."""
    client = await h.ready(req.tid) if req.signed_on else h.terminal(req.tid)
    raw, sent = frame_for(client, req)
    return client, raw, sent


async def run(h: Harness, req: Req) -> tuple[TerminalClient, Decoded, Fields]:
    client, raw, sent = await build(h, req)
    resp = await h.exchange(raw)
    assert resp is not None
    return client, resp, sent


def expected_financial(sent: Fields, *, approved: bool, swipe: bool = False, balance: bool = False) -> set[int]:
    out = {k for k in ECHO if k in sent} | FIN_EXTRA
    if swipe:
        out.add(2)
    if approved:
        out.add(64)
        out.add(54 if balance else 38)
    return out


# ---- §12.1: each check alone, then pairs -----------------------------------------------------
UNKNOWN_TERMINAL = {"tid": "99999999", "signed_on": False}  # no keys: F64 is zeros (a bad MAC too)
NOT_SIGNED_ON = {"signed_on": False}
BAD_MAC = {"bad_mac": True}
WRONG_BATCH = {"batch": "000099"}
MISSING_F49 = {"drop": (49,)}
BAD_LUHN_CARD = {"card": BAD_LUHN}
BAD_PIN_BLOCK = {"bad_pin_block": True}
NO_ROUTE_CARD = {"card": NO_ROUTE}
INSUFFICIENT = {"card": POOR, "amount_fen": 20000}


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (UNKNOWN_TERMINAL, "97"),
        (NOT_SIGNED_ON, "77"),
        (BAD_MAC, "A0"),
        (WRONG_BATCH, "77"),
        (MISSING_F49, "30"),
        (BAD_LUHN_CARD, "14"),
        (NO_ROUTE_CARD, "15"),
        (BAD_PIN_BLOCK, "99"),
        (INSUFFICIENT, "51"),
        ({}, "00"),
    ],
    ids=["97", "77-keys", "A0", "77-batch", "30", "14", "15", "99", "51", "00"],
)
async def test_each_check_alone_gives_its_code(harness: Harness, fault: dict[str, object], code: str) -> None:
    _, resp, _ = await run(harness, replace(Req(), **fault))  # type: ignore[arg-type]
    assert (resp.mti, resp.code) == ("0210", code)


@pytest.mark.parametrize(
    ("first", "second", "code"),
    [
        (UNKNOWN_TERMINAL, BAD_MAC, "97"),
        (NOT_SIGNED_ON, BAD_MAC, "77"),
        (BAD_MAC, WRONG_BATCH, "A0"),
        (WRONG_BATCH, MISSING_F49, "77"),
        (MISSING_F49, BAD_LUHN_CARD, "30"),
        (BAD_LUHN_CARD, BAD_PIN_BLOCK, "14"),
        (NO_ROUTE_CARD, BAD_PIN_BLOCK, "15"),
        (BAD_PIN_BLOCK, INSUFFICIENT, "99"),
    ],
    ids=["97>A0", "77>A0", "A0>77", "77>30", "30>14", "14>99", "15>99", "99>51"],
)
async def test_two_failures_get_the_earlier_code(
    harness: Harness, first: dict[str, object], second: dict[str, object], code: str
) -> None:
    _, resp, _ = await run(harness, replace(Req(), **first, **second))  # type: ignore[arg-type]
    assert (resp.mti, resp.code) == ("0210", code)
    assert 38 not in resp.fields and 64 not in resp.fields
    rows = harness.journal()
    assert rows[-1]["response_code"] == code and rows[-1]["mti"] == "0200"


async def test_the_insufficient_funds_card_really_reaches_the_issuer_only_without_the_pin_fault(
    harness: Harness,
) -> None:
    """99 is decided before the issuer is asked: the issuer sees no request for the 99."""
    await run(harness, replace(Req(), **INSUFFICIENT, **BAD_PIN_BLOCK))  # type: ignore[arg-type]
    assert harness.links["ICBC"].sent == []
    await run(harness, replace(Req(), **INSUFFICIENT))  # type: ignore[arg-type]
    assert len(harness.links["ICBC"].sent) == 1


async def test_pin_key_length_must_match_the_sign_on_mode(harness: Harness) -> None:
    client, raw, sent = await build(harness, Req())
    f53 = sent[53]
    assert isinstance(f53, str) and f53[1] == "6"  # 003 sign-on: double-length
    fields = {k: v for k, v in sent.items() if k != 64}
    fields[53] = f53[0] + "0" + f53[2:]
    raw, _ = client.build_frame("0200", fields, mac=True)
    resp = await harness.exchange(raw)
    assert resp is not None and resp.code == "99"


# ---- §6.1 field sets -------------------------------------------------------------------------
async def test_sign_on_response_fields(harness: Harness) -> None:
    client = harness.terminal("10000001")
    resp = await harness.sign_on(client, "003")
    assert (resp.mti, resp.code) == ("0810", "00")
    assert set(resp.fields) == {11, 12, 13, 32, 37, 39, 41, 42, 60, 62}
    assert resp.fields[32] == ACQ
    assert resp.fields[41] == "10000001" and resp.fields[42] == "898310048990001"
    assert resp.fields[60] == "00" + "000001" + "003"  # 60.2 = the terminal's current batch
    rrn = resp.fields[37]
    assert isinstance(rrn, str) and len(rrn) == 12 and rrn.isdigit()
    assert client.keys is not None and len(client.keys.pik) == 16  # F62 parsed, check values verified
    assert resp.digit6 == 1  # keys, but parameters never downloaded


@pytest.mark.parametrize(("mode", "f62_len"), [("001", 24), ("003", 40), ("004", 60)])
async def test_sign_on_modes_give_the_f62_layouts(harness: Harness, mode: str, f62_len: int) -> None:
    client = harness.terminal("20000001")
    resp = await harness.sign_on(client, mode)
    assert resp.code == "00"
    f62 = resp.fields[62]
    assert isinstance(f62, bytes) and len(f62) == f62_len
    assert client.keys is not None and (client.keys.tdk is not None) == (mode == "004")


async def test_every_sign_on_issues_fresh_keys_and_the_old_mac_stops_working(harness: Harness) -> None:
    client = await harness.ready()
    old_keys = client.keys
    assert (await harness.sign_on(client)).code == "00"
    assert client.keys is not None and old_keys is not None and client.keys.mak != old_keys.mak
    stale = harness.terminal("10000001")
    stale.keys, stale.batch, stale.next_stan = old_keys, client.batch, 50
    f = stale.card_fields(processing_code="000000", type_code="22", card=RICH, amount_fen=100,
                          entry="manual", expiry="3012")
    resp = await harness.send(stale, "0200", f, mac=True)
    assert resp.code == "A0"


async def test_sign_on_of_an_unknown_terminal_is_97_without_keys(harness: Harness) -> None:
    client = harness.terminal("99999999")
    resp = await harness.sign_on(client)
    assert (resp.mti, resp.code, resp.digit6) == ("0810", "97", 0)
    assert 62 not in resp.fields
    assert {11, 12, 13, 39, 41, 42, 60} <= set(resp.fields)


async def test_declined_sign_on_still_carries_the_sign_on_field_set(harness: Harness) -> None:
    resp = await harness.sign_on(harness.terminal("99999999"))
    assert resp.code == "97"
    assert set(resp.fields) == {11, 12, 13, 32, 37, 39, 41, 42, 60}


async def test_a_30_to_a_sign_on_carries_the_echo_list_not_the_0810_layout(harness: Harness) -> None:
    # §6.1: a 30 carries 11, 39, 41 and whatever else of the echo list decoded, for every MTI
    client = harness.terminal("10000001")
    fields = harness.management_fields(client, "003")
    del fields[11]
    resp = await harness.send(client, "0800", fields, mac=False)
    assert (resp.mti, resp.code) == ("0810", "30")
    assert set(resp.fields) == {39, 41, 42, 60}


async def test_parameter_download_response_fields(harness: Harness) -> None:
    client = harness.terminal("10000001")
    await harness.sign_on(client)
    resp = await harness.parameter_download(client)
    assert (resp.mti, resp.code) == ("0810", "00")
    assert set(resp.fields) == {11, 39, 41, 42, 60, 62}
    f62 = resp.fields[62]
    assert isinstance(f62, bytes) and "老王便利店".encode("gbk") in f62
    assert resp.digit6 == 0


@pytest.mark.parametrize("nmc", ["301", "002"], ids=["echo", "sign_off"])
async def test_0830_response_fields(harness: Harness, nmc: str) -> None:
    client = await harness.ready()
    resp = await harness.send(client, "0820", harness.management_fields(client, nmc), mac=False)
    assert (resp.mti, resp.code) == ("0830", "00")
    assert set(resp.fields) == {11, 12, 13, 39, 41, 42, 60}
    assert resp.digit6 == (3 if nmc == "002" else 0)


async def test_a_swipe_is_routed_and_answered_by_its_track_not_by_an_f2_it_also_carries(harness: Harness) -> None:
    # §6.1: "2 or 35 M (35 for a swipe, 2 otherwise)"; a field not listed is ignored, never echoed
    client = await harness.ready()
    fields = client.card_fields(processing_code="000000", type_code="22", card=RICH, amount_fen=500,
                                pin="123456", entry="swipe", expiry="3012")
    fields[2] = "4111237450925694"  # a card with no route (15) if it were used
    resp = await harness.send(client, "0200", fields, mac=True)
    assert resp.code == "00" and resp.fields[2] == RICH
    assert harness.journal()[-1]["pan_masked"] == mask_pan(RICH)


@pytest.mark.parametrize("entry", ["swipe", "manual"])
async def test_approved_consume_fields_mac_and_auth_code(harness: Harness, entry: str) -> None:
    client, resp, sent = await run(harness, Req(entry=entry, amount_fen=12345))
    assert (resp.mti, resp.code) == ("0210", "00")
    assert set(resp.fields) == expected_financial(sent, approved=True, swipe=entry == "swipe")
    assert resp.fields[2] == RICH  # for a swipe: the PAN from track 2
    for k in (3, 4, 11, 25, 41, 42, 49, 60):
        assert resp.fields[k] == sent[k]
    auth = resp.fields[38]
    assert isinstance(auth, str) and len(auth) == 6 and " " not in auth
    assert resp.fields[63] == "CUP" and resp.fields[32] == ACQ
    f64 = resp.fields[64]
    assert client.keys is not None and isinstance(f64, bytes)
    assert verify_mac(client.keys.mak, resp.body[:-8], f64)
    assert resp.digit6 == 0


async def test_approved_balance_inquiry_carries_54_and_64_but_no_38(harness: Harness) -> None:
    client, resp, sent = await run(harness, Req(amount_fen=None, card=CMB_CARD, pin="888888", expiry="2912"))
    assert resp.code == "00"
    assert 4 not in sent
    assert set(resp.fields) == expected_financial(sent, approved=True, balance=True)
    assert resp.fields[54] == "1002156C" + f"{2_000_000:012d}"
    assert client.keys is not None
    assert verify_mac(client.keys.mak, resp.body[:-8], resp.fields[64])  # type: ignore[arg-type]


async def test_a_balance_inquiry_carrying_f4_ignores_it_and_does_not_echo_it(harness: Harness) -> None:
    # §6.1: F4 is not listed for a balance inquiry, so it is "ignored, never echoed, never a 30"
    client = await harness.ready()
    fields = client.card_fields(processing_code="310000", type_code="01", card=CMB_CARD, amount_fen=100,
                                pin="888888", entry="manual", expiry="2912")
    assert fields[4] == "000000000100"
    resp = await harness.send(client, "0200", fields, mac=True)
    assert resp.code == "00" and 4 not in resp.fields and 54 in resp.fields
    row = harness.journal()[-1]
    assert (row["txn"], row["amount_fen"]) == ("balance_inquiry", None)


@pytest.mark.parametrize(
    ("req", "code"),
    [
        (Req(card=POOR, amount_fen=20000), "51"),
        (Req(pin="000000"), "55"),
        (Req(card=LOST), "41"),
        (Req(card=STOLEN), "43"),
        (Req(card=EXPIRED, expiry="2001"), "54"),
        (Req(card=CMB_CARD, pin="888888", expiry="2912", amount_fen=2_000_001), "51"),
    ],
    ids=["51", "55", "41", "43", "54", "cmb-51"],
)
async def test_issuer_declines_carry_no_38_and_no_64(harness: Harness, req: Req, code: str) -> None:
    _, resp, sent = await run(harness, req)
    assert (resp.mti, resp.code) == ("0210", code)
    assert set(resp.fields) == expected_financial(sent, approved=False)


@pytest.mark.parametrize(
    ("req", "code"),
    [
        (Req(tid="99999999", signed_on=False), "97"),
        (Req(tid="10000001", signed_on=False), "77"),
        (Req(bad_mac=True), "A0"),
        (Req(batch="000099"), "77"),
        (Req(card=NO_ROUTE), "15"),
        (Req(card=BAD_LUHN), "14"),
    ],
    ids=["97", "77", "A0", "77-batch", "15", "14"],
)
async def test_declines_before_routing_carry_the_financial_set(harness: Harness, req: Req, code: str) -> None:
    _, resp, sent = await run(harness, req)
    assert resp.code == code
    assert set(resp.fields) == expected_financial(sent, approved=False)
    rrn = resp.fields[37]
    assert isinstance(rrn, str) and len(rrn) == 12 and rrn.isdigit()
    assert resp.fields[44] == " " * 11 + ACQ.ljust(11)  # no issuer chosen


async def test_unsupported_transaction_key_is_40_with_the_financial_set(harness: Harness) -> None:
    client = await harness.ready()
    f = client.card_fields(processing_code="990000", type_code="10", card=RICH, amount_fen=100,
                           entry="manual", expiry="3012", condition_code="06")
    raw, sent = client.build_frame("0100", f, mac=True)
    resp = await harness.exchange(raw)
    assert resp is not None and (resp.mti, resp.code) == ("0110", "40")
    assert set(resp.fields) == expected_financial(sent, approved=False)


async def test_missing_mandatory_field_is_a_30_with_the_echoes_and_no_mac(harness: Harness) -> None:
    _, resp, sent = await run(harness, Req(drop=(49,)))
    assert resp.code == "30"
    assert {11, 39, 41} <= set(resp.fields)
    assert {k for k in ECHO if k in sent} <= set(resp.fields)
    assert 38 not in resp.fields and 64 not in resp.fields


def set_bit(raw: bytes, bit: int) -> bytes:
    """Set a primary-bitmap bit in a whole frame (LEN, TPDU, header, MTI, bitmap...)."""
    b = bytearray(raw)
    at = 2 + 5 + 6 + 2 + (bit - 1) // 8
    b[at] |= 0x80 >> ((bit - 1) % 8)
    return bytes(b)


async def test_undecodable_field_after_f41_gets_a_30_with_what_decoded(harness: Harness) -> None:
    client = harness.terminal("10000001")
    f = client.card_fields(processing_code="000000", type_code="22", card=RICH, amount_fen=100,
                           entry="manual", expiry="3012")
    raw, _ = client.build_frame("0200", f, mac=True)
    resp = await harness.exchange(set_bit(raw, 43))  # 43 is not in the terminal dialect
    assert resp is not None and (resp.mti, resp.code) == ("0210", "30")
    # F2..F42 decoded before the undefined bit; 49 and 60 did not
    assert set(resp.fields) == {2, 3, 4, 11, 25, 39, 41, 42}
    assert resp.fields[11] == f[11] and resp.fields[41] == "10000001"
    assert resp.tpdu == raw[2:7]
    assert harness.metrics.malformed and harness.metrics.malformed[-1].startswith("decode")
    rows = harness.journal()
    assert len(rows) == 1 and rows[0]["response_code"] == "30" and rows[0]["stan"] == f[11]
    assert rows[0]["tid"] == "10000001"


async def test_decode_30_to_a_known_terminal_without_keys_has_digit6_3(harness: Harness) -> None:
    client = harness.terminal("10000001")
    f = client.card_fields(processing_code="000000", type_code="22", card=RICH, amount_fen=100,
                           entry="manual", expiry="3012")
    raw, _ = client.build_frame("0200", f, mac=True)
    resp = await harness.exchange(set_bit(raw, 43))
    assert resp is not None and resp.code == "30"
    assert resp.digit6 == 3


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda raw: set_bit(raw, 1), "secondary_bitmap"),
        (lambda raw: raw[:13] + bytes.fromhex("0210") + raw[15:], "bad_mti"),
    ],
    ids=["bit1", "response-mti"],
)
async def test_bit_1_or_a_non_request_mti_closes(harness: Harness, mutate: object, reason: str) -> None:
    client = harness.terminal("10000001")
    raw, _ = client.build_frame("0820", harness.management_fields(client, "301"), mac=False)
    assert callable(mutate)
    assert await harness.exchange(mutate(raw)) is None
    assert harness.metrics.malformed == [reason]
    assert harness.journal() == []


# ---- header digit 6 (§2) ----------------------------------------------------------------------
async def test_header_digit6_follows_keys_and_parameters(harness: Harness) -> None:
    h = harness
    client = h.terminal("10000001")

    async def echo_test() -> Decoded:
        return await h.send(client, "0820", h.management_fields(client, "301"), mac=False)

    async def consume() -> Decoded:
        f = client.card_fields(processing_code="000000", type_code="22", card=RICH, amount_fen=100,
                               entry="manual", expiry="3012")
        return await h.send(client, "0200", f, mac=True)

    seen = [("echo", (r := await echo_test()).code, r.digit6)]
    seen.append(("consume", (r := await consume()).code, r.digit6))
    seen.append(("sign_on", (r := await h.sign_on(client)).code, r.digit6))
    seen.append(("consume", (r := await consume()).code, r.digit6))
    seen.append(("params", (r := await h.parameter_download(client)).code, r.digit6))
    seen.append(("consume", (r := await consume()).code, r.digit6))
    seen.append(("echo", (r := await echo_test()).code, r.digit6))
    h.state.merchants[client.mid].params_version += 1  # the back office changed M1's parameters
    seen.append(("consume", (r := await consume()).code, r.digit6))
    seen.append(("params", (r := await h.parameter_download(client)).code, r.digit6))
    off = await h.send(client, "0820", h.management_fields(client, "002"), mac=False)
    seen.append(("sign_off", off.code, off.digit6))
    seen.append(("consume", (r := await consume()).code, r.digit6))
    assert seen == [
        ("echo", "00", 3),
        ("consume", "77", 3),
        ("sign_on", "00", 1),
        ("consume", "00", 1),
        ("params", "00", 0),
        ("consume", "00", 0),
        ("echo", "00", 0),
        ("consume", "00", 1),  # parameters changed since the last download (§2, §9.3)
        ("params", "00", 0),
        ("sign_off", "00", 3),
        ("consume", "77", 3),
    ]


async def test_header_digit6_for_unknown_and_inactive_terminals(harness: Harness) -> None:
    h = harness
    unknown = h.terminal("99999999")
    r = await h.send(unknown, "0820", h.management_fields(unknown, "301"), mac=False)
    assert (r.code, r.digit6) == ("97", 0)
    awaiting = h.terminal("20000002")  # known, awaiting activation: no keys
    r = await h.send(awaiting, "0820", h.management_fields(awaiting, "301"), mac=False)
    assert (r.code, r.digit6) == ("97", 3)


async def test_the_rest_of_the_header_and_the_tpdu_are_echoed(harness: Harness) -> None:
    client = harness.terminal("10000001")
    client.tpdu = bytes.fromhex("6012345678")
    client.header = bytes.fromhex("6131100FFFFF")
    resp = await harness.sign_on(client)
    assert resp.tpdu == bytes.fromhex("6012345678")
    assert resp.header == bytes.fromhex("6131110FFFFF")  # digit 6 = 1 (no parameters yet)


async def test_five_mac_failures_revoke_the_keys(harness: Harness) -> None:
    h = harness
    client = await h.ready()
    terminal = h.state.terminals["10000001"]
    codes = []
    for _ in range(5):
        raw, _ = frame_for(client, Req(bad_mac=True))
        r = await h.exchange(raw)
        assert r is not None
        codes.append((r.code, r.digit6))
    assert codes == [("A0", 0)] * 4 + [("A0", 3)]  # the 5th revokes: its response says sign on
    assert not terminal.signed_on
    raw, _ = frame_for(client, Req())  # a MAC that was valid under the revoked keys
    r = await h.exchange(raw)
    assert r is not None and (r.code, r.digit6) == ("77", 3)
    assert h.metrics.mac_failures == 5
    assert (await h.sign_on(client)).code == "00"
    raw, _ = frame_for(client, Req())
    r = await h.exchange(raw)
    assert r is not None and r.code == "00"


async def test_a_valid_mac_resets_the_failure_count(harness: Harness) -> None:
    h = harness
    client = await h.ready()
    codes = []
    for req in [Req(bad_mac=True)] * 4 + [Req()] + [Req(bad_mac=True)] * 4:
        raw, _ = frame_for(client, req)
        r = await h.exchange(raw)
        assert r is not None
        codes.append(r.code)
    assert codes == ["A0"] * 4 + ["00"] + ["A0"] * 4
    assert h.state.terminals["10000001"].signed_on


# ---- journal ------------------------------------------------------------------------------------
async def test_one_journal_row_per_request_and_no_full_pan(harness: Harness) -> None:
    h = harness
    client = await h.ready()  # 2 rows
    codes: list[str] = []
    for req in (
        Req(entry="swipe"),
        Req(card=POOR, amount_fen=20000),
        Req(card=BAD_LUHN),
        Req(card=NO_ROUTE),
        Req(card=SLOW_CARD),
        Req(card=BOC_CARD),
        Req(bad_mac=True),
        Req(drop=(49,)),
        Req(tid="99999999", signed_on=False),
        Req(tid="10000002", signed_on=False, card=CMB_CARD, expiry="2912"),
    ):
        if req.tid == "10000001":  # the ready client: only one sign-on is journaled
            raw, _ = frame_for(client, req)
        else:
            _, raw, _ = await build(h, req)
        resp = await h.exchange(raw)
        assert resp is not None
        codes.append(resp.code)
    f = client.card_fields(processing_code="000000", type_code="22", card=RICH, amount_fen=100,
                           entry="manual", expiry="3012")
    bad, _ = client.build_frame("0200", f, mac=True)
    resp = await h.exchange(set_bit(bad, 43))
    assert resp is not None
    codes.append(resp.code)
    assert codes == ["00", "51", "14", "15", "98", "91", "A0", "30", "97", "77", "30"]
    rows = h.journal()
    assert [r["response_code"] for r in rows] == ["00", "00"] + codes
    for row in rows:
        text = " ".join(str(v) for v in row.values())
        for pan in ALL_PANS:
            assert pan not in text, f"full PAN in journal row {row['id']}"
    swipe = rows[2]
    assert swipe["pan_masked"] == RICH[:6] + "*" * 9 + RICH[-4:] and swipe["pan_token"]
    assert h.metrics.in_flight_now == 0
    assert len(h.metrics.requests) == len(rows)


async def test_approvals_journal_the_fee_and_declines_do_not(harness: Harness) -> None:
    h = harness
    for amount in (12345, 250, 25):
        await run(h, Req(amount_fen=amount))
    await run(h, Req(card=POOR, amount_fen=20000))
    await run(h, Req(amount_fen=None))
    rows = [r for r in h.journal() if r["mti"] == "0200"]
    got = [(r["txn"], r["response_code"], r["amount_fen"], r["fee_fen"]) for r in rows]
    assert got == [
        ("consume", "00", 12345, 74),  # 0.60 % half-up: 74.07 -> 74
        ("consume", "00", 250, 2),  # 1.5 -> 2
        ("consume", "00", 25, 0),  # 0.15 -> 0
        ("consume", "51", 20000, None),
        ("balance_inquiry", "00", None, None),
    ]
    approved = rows[0]
    assert approved["issuer"] == "ICBC" and approved["auth_code"] and approved["rrn"]
    assert approved["issuer_stan"] and approved["issuer_response_code"] == "00"


async def test_rrns_are_unique_across_responses(harness: Harness) -> None:
    h = harness
    rrns = []
    for req in (Req(), Req(card=NO_ROUTE), Req(), Req(bad_mac=True), Req(tid="99999999", signed_on=False)):
        _, resp, _ = await run(h, req)
        rrns.append(resp.fields[37])
    assert len(set(rrns)) == len(rrns)


# ---- F44 and issuer outcomes -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("req", "code", "issuer"),
    [
        (Req(), "00", "ICBC"),
        (Req(card=CMB_CARD, pin="888888", expiry="2912"), "00", "CMB"),
        (Req(card=BOC_CARD), "91", "BOC"),  # route configured, link down: still named
        (Req(card=SLOW_CARD), "98", "SLOW"),
        (Req(card=NO_ROUTE), "15", ""),
    ],
    ids=["ICBC", "CMB", "BOC-91", "SLOW-98", "no-route"],
)
async def test_f44_names_the_routed_issuer(harness: Harness, req: Req, code: str, issuer: str) -> None:
    _, resp, _ = await run(harness, req)
    assert resp.code == code
    f44 = resp.fields[44]
    assert isinstance(f44, str) and len(f44) == 22
    assert f44 == issuer.ljust(11) + ACQ.ljust(11)


async def test_issuer_link_down_is_91(harness: Harness) -> None:
    harness.links["ICBC"].up = False
    _, resp, _ = await run(harness, Req())
    assert (resp.code, resp.fields[44]) == ("91", "ICBC".ljust(11) + ACQ.ljust(11))


async def test_silent_issuer_is_98_and_a_reversible_one_is_marked_for_reversal(harness: Harness) -> None:
    h = harness
    _, consume, _ = await run(h, Req(card=SLOW_CARD))
    _, balance, _ = await run(h, Req(card=SLOW_CARD, amount_fen=None))
    assert (consume.code, balance.code) == ("98", "98")
    rows = [r for r in h.journal() if r["mti"] == "0200"]
    assert [(r["txn"], r["needs_reversal"]) for r in rows] == [("consume", 1), ("balance_inquiry", 0)]
    assert all(r["issuer"] == "SLOW" for r in rows)


async def test_the_issuer_gets_a_pin_block_under_its_own_zone_key(harness: Harness) -> None:
    from switch.crypto.pin import pin_matches

    await run(harness, Req())
    (_, sent), = harness.links["ICBC"].sent
    block = sent[52]
    assert isinstance(block, bytes)
    assert pin_matches(harness.mocks["ICBC"].zpk, RICH, block, "123456")
    assert sent[4] == "000000012345" and sent[41] == "10000001"


async def test_a_failing_participant_becomes_96_and_is_journaled(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(mti: str, fields: Fields, timeout: float) -> tuple[str, Fields]:
        raise RuntimeError("boom")

    client = await harness.ready()
    monkeypatch.setattr(harness.links["ICBC"], "send", broken)
    f = client.card_fields(processing_code="000000", type_code="22", card=RICH, amount_fen=100,
                           pin="123456", entry="manual", expiry="3012")
    resp = await harness.send(client, "0200", f, mac=True)
    assert (resp.mti, resp.code) == ("0210", "96")
    assert set(resp.fields) == expected_financial(f, approved=False)
    assert resp.fields[44] == "ICBC".ljust(11) + ACQ.ljust(11)
    row = harness.journal()[-1]
    assert (row["mti"], row["txn"], row["response_code"]) == ("0200", "consume", "96")
    assert harness.metrics.in_flight_now == 0
    assert harness.metrics.requests[-1] == ("consume", "96")
    monkeypatch.undo()  # the switch still works afterwards
    f = client.card_fields(processing_code="000000", type_code="22", card=RICH, amount_fen=100,
                           pin="123456", entry="manual", expiry="3012")
    assert (await harness.send(client, "0200", f, mac=True)).code == "00"


async def test_responses_are_framed_with_the_right_length(harness: Harness) -> None:
    client = harness.terminal("10000001")
    raw, _ = client.build_frame("0800", harness.management_fields(client, "003"), mac=False)
    from switch.core.framing import Frame

    data = await harness.manager.handle(Frame(raw[2:7], raw[7:13], raw[13:]))
    assert data is not None
    assert int.from_bytes(data[:2], "big") == len(data) - 2
    assert encode_frame(data[2:7], data[7:13], data[13:]) == data
