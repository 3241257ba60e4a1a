"""Golden bytes both ways: every vector of ../shared/vectors.json decodes to its fields and
the fields encode back to the exact same bytes (protocol §2-§5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from switch.core.codec import Codec, CodecError, Fields, load_dialect

VECTORS_PATH = Path(__file__).resolve().parents[3] / "shared" / "vectors.json"
VECTORS = [v for v in json.loads(VECTORS_PATH.read_text())["vectors"] if v["frame_hex"]]
CODEC = Codec(load_dialect("terminal"))


def typed(fields: dict[str, str]) -> Fields:
    return {
        int(k): (bytes.fromhex(v) if CODEC.dialect.fmt(int(k)) == "b" else v) for k, v in fields.items()
    }


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_decode_matches_vector(vector: dict) -> None:
    raw = bytes.fromhex(vector["frame_hex"])
    assert int.from_bytes(raw[:2], "big") == len(raw) - 2
    mti, fields = CODEC.decode(raw[13:])
    assert mti == raw[13:15].hex()
    assert fields == typed(vector["fields"])


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_encode_matches_vector(vector: dict) -> None:
    raw = bytes.fromhex(vector["frame_hex"])
    mti = raw[13:15].hex()
    assert CODEC.encode(mti, typed(vector["fields"])) == raw[13:]


def test_hand_built_consume_nibble_by_nibble() -> None:
    """A manual-entry consume built by hand from §3/§4, checked nibble by nibble."""
    fields: Fields = {
        2: "6214834474520070",  # LL BCD 16, digits left-aligned
        3: "000000",
        4: "100",  # fixed n is right-aligned: 000000000100
        11: "000123",
        14: "2912",
        22: "012",  # left-aligned: 01 20
        25: "00",
        41: "10000001",
        42: "898310048990001",
        49: "156",
        60: "22000001000",  # LLL BCD 11 digits, trailing pad nibble
        63: "01 ",
    }
    body = CODEC.encode("0200", fields)
    expected = (
        "0200"
        # bitmap: 2,3,4 | 11,14 | 22 | 25 | 41,42 | 49 | 60 | 63
        + "7024048000C08012"
        + "16" + "6214834474520070"
        + "000000"
        + "000000000100"
        + "000123"
        + "2912"
        + "0120"
        + "00"
        + "3130303030303031"
        + "383938333130303438393930303031"
        + "313536"
        + "0011" + "220000010000"
        + "0003" + "303120"
    )
    assert body.hex().upper() == expected.upper()
    assert CODEC.decode(body) == ("0200", fields | {4: "000000000100"})


def test_non_digit_nibble_is_a_format_error() -> None:
    body = bytearray(CODEC.encode("0200", {3: "000000", 11: "000001", 41: "10000001"}))
    body[10] = 0x0A  # first byte of F3 becomes 0A
    with pytest.raises(CodecError) as info:
        CODEC.decode(bytes(body))
    assert info.value.field == "3"
    assert info.value.partial[11] == "000001"
    assert info.value.partial[41] == "10000001"


def test_truncated_field_names_field_and_offset() -> None:
    body = CODEC.encode("0200", {11: "000001", 41: "10000001", 42: "898310048990001"})
    with pytest.raises(CodecError) as info:
        CODEC.decode(body[:-3])
    assert info.value.field == "42"
    assert info.value.offset > 0
    assert info.value.partial.get(41) == "10000001"


def test_undefined_field_is_a_format_error() -> None:
    body = bytearray(CODEC.encode("0200", {11: "000001"}))
    body[2] |= 0x08  # bit 5 (not in the dialect)
    with pytest.raises(CodecError):
        CODEC.decode(bytes(body))


def test_gbk_text_round_trip() -> None:
    fields: Fields = {11: "000001", 63: "CUP老王便利店"}
    mti, out = CODEC.decode(CODEC.encode("0210", fields))
    assert out[63] == "CUP老王便利店"
