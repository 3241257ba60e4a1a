"""Tests for switch.core.messages (protocol §2, §6.1, §10.1, §12.1 step 1): a frame becomes a
Request or a Malformed that says whether to answer 30 or close; responses are encoded with the
echo rules, MTI + 10, the header digit 6 and F64 over the MAB."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from switch.core.codec import Codec, Fields, load_dialect
from switch.core.framing import Frame, FrameReader
from switch.core.messages import (
    ECHO_FIELDS,
    Malformed,
    Request,
    encode_response,
    format_error_response,
    read_request,
    response_mti,
)

VECTORS_PATH = Path(__file__).resolve().parents[3] / "shared" / "vectors.json"
VECTORS: dict[str, dict[str, Any]] = {
    v["name"]: v for v in json.loads(VECTORS_PATH.read_text())["vectors"]
}
CODEC = Codec(load_dialect("terminal"))

CONSUME = VECTORS["consume_request_swipe_pin"]
CONSUME_RAW = bytes.fromhex(CONSUME["frame_hex"])
CONSUME_FRAME = Frame.parse(CONSUME_RAW[2:])
SIGN_ON_RAW = bytes.fromhex(VECTORS["sign_on_request_004"]["frame_hex"])

# Byte offsets into the consume body (MTI onwards): where each field starts.
F35_AT, F41_AT, F42_AT, F52_AT, F60_AT, F64_AT = 26, 46, 54, 72, 88, 96


def typed(fields: dict[str, str]) -> Fields:
    return {
        int(k): (bytes.fromhex(v) if CODEC.dialect.fmt(int(k)) == "b" else v) for k, v in fields.items()
    }


def with_body(body: bytes, frame: Frame = CONSUME_FRAME) -> Frame:
    return Frame(frame.tpdu, frame.header, body)


def unframe(wire: bytes) -> Frame:
    reader = FrameReader()
    reader.receive_data(wire)
    frame = reader.next_frame()
    assert frame is not None
    assert not reader.mid_frame  # exactly one frame, LEN correct
    return frame


def consume_request() -> Request:
    req = read_request(CODEC, CONSUME_FRAME)
    assert isinstance(req, Request)
    return req


# ---- read_request: valid -------------------------------------------------------------------


def test_valid_consume_request() -> None:
    req = read_request(CODEC, CONSUME_FRAME)
    assert isinstance(req, Request)
    assert req.mti == "0200"
    assert req.fields == typed(CONSUME["fields"])
    assert req.frame is CONSUME_FRAME
    assert (req.tid, req.mid, req.stan) == ("10000001", "898310048990001", "000002")


def test_mab_excludes_f64_and_matches_vector() -> None:
    req = consume_request()
    assert req.mab.hex().upper() == CONSUME["mac_steps"]["mab_hex"]
    assert req.mab == CONSUME_FRAME.body[:-8]
    assert CONSUME_FRAME.body[-8:] == b"369D3F70"
    assert req.mab[2 + 7] & 0x01  # bit 64 is set in the MAB's bitmap (§10.1)


def test_mab_without_f64_is_the_whole_body() -> None:
    req = read_request(CODEC, Frame.parse(SIGN_ON_RAW[2:]))
    assert isinstance(req, Request)
    assert req.mti == "0800"
    assert 64 not in req.fields
    assert req.mab == SIGN_ON_RAW[13:]


def test_request_properties_when_fields_are_missing() -> None:
    req = Request(CONSUME_FRAME, "0200", {3: "000000"})
    assert (req.tid, req.mid, req.stan) == ("", "", "")


# ---- read_request: close ---------------------------------------------------------------------


def test_bit_1_set_is_closed() -> None:
    body = bytearray(CONSUME_FRAME.body)
    body[2] |= 0x80
    bad = read_request(CODEC, with_body(bytes(body)))
    assert isinstance(bad, Malformed)
    assert bad.close
    assert bad.mti == "0200"


@pytest.mark.parametrize("mti", ["0210", "0900", "0A00", "0410", "0810", "0300", "FFFF"])
def test_mti_outside_request_classes_is_closed(mti: str) -> None:
    body = bytes.fromhex(mti) + CONSUME_FRAME.body[2:]
    bad = read_request(CODEC, with_body(body))
    assert isinstance(bad, Malformed)
    assert bad.close
    assert bad.mti is None


@pytest.mark.parametrize("mti", ["0100", "0200", "0220", "0320", "0400", "0500", "0800", "0820"])
def test_every_request_class_is_read(mti: str) -> None:
    req = read_request(CODEC, with_body(bytes.fromhex(mti) + CONSUME_FRAME.body[2:]))
    assert isinstance(req, Request)
    assert req.mti == mti


@pytest.mark.parametrize("length", [0, 1, 2, 9])
def test_body_too_short_for_mti_and_bitmap_is_closed(length: int) -> None:
    bad = read_request(CODEC, with_body(CONSUME_FRAME.body[:length]))
    assert isinstance(bad, Malformed)
    assert bad.close


@pytest.mark.parametrize("cut", [10, 20, F35_AT + 5, F41_AT, F41_AT + 4])
def test_truncated_before_f41_decodes_is_closed(cut: int) -> None:
    bad = read_request(CODEC, with_body(CONSUME_FRAME.body[:cut]))
    assert isinstance(bad, Malformed)
    assert bad.close
    assert 41 not in bad.partial


def test_non_digit_in_f11_is_closed() -> None:
    body = bytearray(CONSUME_FRAME.body)
    body[19] = 0xA0  # first byte of F11 (n6)
    bad = read_request(CODEC, with_body(bytes(body)))
    assert isinstance(bad, Malformed)
    assert bad.close
    assert 11 not in bad.partial


# ---- read_request: answer 30 -------------------------------------------------------------------


@pytest.mark.parametrize("cut", [F42_AT, F42_AT + 7, F52_AT + 3, F60_AT + 2, F64_AT + 7])
def test_truncated_after_f11_and_f41_is_answered(cut: int) -> None:
    bad = read_request(CODEC, with_body(CONSUME_FRAME.body[:cut]))
    assert isinstance(bad, Malformed)
    assert not bad.close
    assert bad.mti == "0200"
    assert bad.partial[11] == "000002"
    assert bad.partial[41] == "10000001"
    assert bad.partial[3] == "000000"
    full = typed(CONSUME["fields"])
    for key, value in bad.partial.items():  # partial fields are clean, typed values
        assert full[key] == value


def test_truncated_in_f52_keeps_every_field_before_it() -> None:
    bad = read_request(CODEC, with_body(CONSUME_FRAME.body[: F52_AT + 3]))
    assert isinstance(bad, Malformed)
    full = typed(CONSUME["fields"])
    assert bad.partial == {k: v for k, v in full.items() if k < 52}


def test_non_digit_in_f4_is_answered_with_the_rest_decoded() -> None:
    body = bytearray(CONSUME_FRAME.body)
    body[13] = 0xA0  # first byte of F4 (n12)
    bad = read_request(CODEC, with_body(bytes(body)))
    assert isinstance(bad, Malformed)
    assert not bad.close
    assert 4 not in bad.partial
    assert bad.partial[11] == "000002" and bad.partial[41] == "10000001"
    assert bad.partial[60] == "22000001000"


F22_LAST, F35_LEN, F35_LAST = 23, F35_AT, F35_AT + 19  # F22's pad byte; F35's LL and last byte


def mutated(*changes: tuple[int, int]) -> Frame:
    body = bytearray(CONSUME_FRAME.body)
    for at, value in changes:
        body[at] = value
    return with_body(bytes(body))


@pytest.mark.parametrize(
    ("changes", "bad"),
    [
        (((F22_LAST, 0x1F),), {22}),  # F22 "021" left-aligned with pad nibble F, not 0 (§3)
        (((F35_LAST, 0x0F),), {35}),  # the track's trailing pad nibble F
        (((F35_LEN, 0x38),), {35}),  # LL 38 digits: above F35's 37, its extent still known
        (((F35_LEN, 0x38), (F22_LAST, 0x1F)), {22, 35}),  # two of them
    ],
    ids=["f22-pad", "f35-pad", "f35-over-max", "both"],
)
def test_a_bad_pad_or_length_before_f41_is_read_past_and_answered(changes: tuple[tuple[int, int], ...],
                                                                  bad: set[int]) -> None:
    # §12.1 step 1: 30 when MTI, F11 and F41 decode; these fields' extent is known, so they do
    bad_req = read_request(CODEC, mutated(*changes))
    assert isinstance(bad_req, Malformed) and not bad_req.close
    full = typed(CONSUME["fields"])
    assert bad_req.partial == {k: v for k, v in full.items() if k not in bad}


def test_fixed_length_text_that_does_not_decode_is_read_past() -> None:
    """A fixed-length field's extent is its length whatever it holds: F42 of bytes that are not
    GBK text is left out and the request is still answered 30 (§12.1 step 1)."""
    body = bytearray(CONSUME_FRAME.body)
    body[F42_AT:F42_AT + 15] = b"\xff" * 15
    bad = read_request(CODEC, with_body(bytes(body)))
    assert isinstance(bad, Malformed) and not bad.close
    full = typed(CONSUME["fields"])
    assert bad.partial == {k: v for k, v in full.items() if k != 42}


def test_ans_text_that_is_not_ascii_is_gbk() -> None:
    """§3: ans text that is not ASCII is GBK, F41 and F42 too (ans8 / ans15: bytes)."""
    body = bytearray(CONSUME_FRAME.body)
    body[F41_AT:F41_AT + 8] = "终端号码".encode("gbk")
    body[F42_AT:F42_AT + 15] = "商户号".encode("gbk") + b" " * 9
    req = read_request(CODEC, with_body(bytes(body)))
    assert isinstance(req, Request)
    assert req.tid == "终端号码" and req.mid == "商户号" + " " * 9


@pytest.mark.parametrize("f60", ["22000001", "", "2200000100"], ids=["8-digits", "empty", "10-digits"])
def test_field_60_shorter_than_11_digits_is_answered_30(f60: str) -> None:
    """§5: F60 has at least 11 digits (60.1 and 60.3 are key parts, §6): a shorter one is a format
    error, answered 30 with it echoed as received."""
    fields = typed(CONSUME["fields"])
    fields[60] = f60
    body = CODEC.encode("0200", dict(sorted(fields.items())))
    bad = read_request(CODEC, with_body(body))
    assert isinstance(bad, Malformed) and not bad.close and bad.reason == "decode:60"
    assert bad.partial[60] == f60 and bad.partial[41] == "10000001"


def test_missing_field_60_is_answered_30() -> None:
    fields = {k: v for k, v in typed(CONSUME["fields"]).items() if k != 60}
    bad = read_request(CODEC, with_body(CODEC.encode("0200", dict(sorted(fields.items())))))
    assert isinstance(bad, Malformed) and not bad.close and 60 not in bad.partial


@pytest.mark.parametrize("ll", [0x3A, 0xFF], ids=["non-bcd-length", "non-bcd-length-ff"])
def test_an_unreadable_length_before_f41_still_closes(ll: int) -> None:
    bad_req = read_request(CODEC, mutated((F35_LEN, ll)))
    assert isinstance(bad_req, Malformed) and bad_req.close
    assert 41 not in bad_req.partial and 35 not in bad_req.partial


def test_undefined_field_after_f41_is_answered_not_closed() -> None:
    body = bytearray(CONSUME_FRAME.body)
    body[2 + 5] |= 0x08  # bit 45: not defined in specs/terminal.json, comes after F11 and F41
    bad = read_request(CODEC, with_body(bytes(body)))
    assert isinstance(bad, Malformed)
    assert not bad.close
    assert bad.partial.get(41) == "10000001"


# ---- format_error_response ---------------------------------------------------------------------


def test_format_error_response_echoes_only_what_decoded() -> None:
    bad = read_request(CODEC, with_body(CONSUME_FRAME.body[: F52_AT + 3]))
    assert isinstance(bad, Malformed) and not bad.close
    frame = unframe(format_error_response(CODEC, bad))
    assert frame.tpdu == CONSUME_FRAME.tpdu
    assert frame.header == CONSUME_FRAME.header
    mti, fields = CODEC.decode(frame.body)
    assert mti == "0210"
    # partial held 3,4,11,22,25,26,35,41,42,49; 22, 26 and 35 are not on the echo list
    assert fields == {
        3: "000000",
        4: "000000012345",
        11: "000002",
        25: "00",
        39: "30",
        41: "10000001",
        42: "898310048990001",
        49: "156",
    }


def test_format_error_response_with_minimum_decoded() -> None:
    bad = read_request(CODEC, with_body(CONSUME_FRAME.body[: F42_AT + 3]))
    assert isinstance(bad, Malformed) and not bad.close
    mti, fields = CODEC.decode(unframe(format_error_response(CODEC, bad)).body)
    assert mti == "0210"
    assert fields == {3: "000000", 4: "000000012345", 11: "000002", 25: "00", 39: "30", 41: "10000001"}


def test_format_error_response_for_0800_and_header_digit6_zero() -> None:
    raw = SIGN_ON_RAW
    header = bytes.fromhex("60311AFFFFFF")  # status 1, digit 6 'A', reserved F
    frame = Frame(raw[2:7], header, raw[13:-2])  # truncated inside F63
    bad = read_request(CODEC, frame)
    assert isinstance(bad, Malformed) and not bad.close
    out = unframe(format_error_response(CODEC, bad))
    assert out.header == bytes.fromhex("603110FFFFFF")
    mti, fields = CODEC.decode(out.body)
    assert mti == "0810"
    assert fields == {11: "000001", 39: "30", 41: "10000001", 42: "898310048990001", 60: "00000001004"}


def test_format_error_response_hand_built_malformed() -> None:
    partial: Fields = {11: "000123", 41: "ABCD0001", 2: "6222000011112222", 35: "6222=1", 52: bytes(8)}
    bad = Malformed("decode:53", False, CONSUME_FRAME, "0100", partial)
    mti, fields = CODEC.decode(unframe(format_error_response(CODEC, bad)).body)
    assert mti == "0110"
    assert fields == {2: "6222000011112222", 11: "000123", 39: "30", 41: "ABCD0001"}
    assert set(fields) - {39} <= set(ECHO_FIELDS)


# ---- encode_response ---------------------------------------------------------------------------


def test_encode_response_reproduces_approved_vector_with_mac() -> None:
    vec = VECTORS["consume_response_approved"]
    raw = bytes.fromhex(vec["frame_hex"])
    fields = typed(vec["fields"])
    f64 = fields.pop(64)
    assert isinstance(f64, bytes)
    seen: list[bytes] = []

    def mac(mab: bytes) -> bytes:
        seen.append(mab)
        return f64

    wire = encode_response(CODEC, consume_request(), fields, 0, mac)
    assert wire == raw
    assert len(seen) == 1
    assert seen[0] == raw[13:-8]
    assert seen[0][2 + 7] & 0x01  # bit 64 set in the MAB (§10.1)


def test_encode_response_mac_covers_body_without_last_8() -> None:
    seen: list[bytes] = []

    def mac(mab: bytes) -> bytes:
        seen.append(mab)
        return b"DEADBEEF"

    fields: Fields = {3: "000000", 11: "000002", 39: "00", 41: "10000001"}
    wire = encode_response(CODEC, consume_request(), fields, 3, mac)
    frame = unframe(wire)
    assert frame.body[-8:] == b"DEADBEEF"
    assert seen == [frame.body[:-8]]
    assert seen[0][2 + 7] & 0x01
    mti, decoded = CODEC.decode(frame.body)
    assert mti == "0210"
    assert decoded == {**fields, 64: b"DEADBEEF"}
    assert frame.header == bytes.fromhex("603103000000")
    assert frame.tpdu == CONSUME_FRAME.tpdu


def test_encode_response_without_mac_drops_f64_and_reproduces_decline_vector() -> None:
    vec = VECTORS["consume_response_declined_51"]
    raw = bytes.fromhex(vec["frame_hex"])
    fields = typed(vec["fields"])
    fields[64] = b"12345678"  # a stray F64 must not go out without a mac callable
    wire = encode_response(CODEC, consume_request(), fields, 0)
    assert wire == raw
    assert not raw[13 + 2 + 7] & 0x01


def test_encode_response_does_not_mutate_fields() -> None:
    fields: Fields = {11: "000002", 39: "00", 64: b"12345678"}
    snapshot = dict(fields)
    encode_response(CODEC, consume_request(), fields, 0)
    encode_response(CODEC, consume_request(), fields, 0, lambda _: b"ABCDEF01")
    assert fields == snapshot


# ---- response_mti --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_mti", "expected"),
    [
        ("0100", "0110"),
        ("0200", "0210"),
        ("0220", "0230"),
        ("0320", "0330"),
        ("0400", "0410"),
        ("0500", "0510"),
        ("0800", "0810"),
        ("0820", "0830"),
    ],
)
def test_response_mti(request_mti: str, expected: str) -> None:
    assert response_mti(request_mti) == expected
