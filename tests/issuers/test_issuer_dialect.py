"""The issuer host-to-host dialect (specs/issuer.json, specs/issuer.md): loads, and golden ASCII
bytes both ways for a consume and a reversal with F90 (secondary bitmap)."""

from __future__ import annotations

import pytest

from switch.core.codec import Codec, CodecError, Fields, load_dialect
from switch.adapters.issuer_link import issuer_codec

CODEC = Codec(load_dialect("issuer"))

PIN_BLOCK = bytes.fromhex("0123456789ABCDEF")

CONSUME: Fields = {
    2: "6222029375642931684",
    3: "000000",
    4: "000000012345",
    7: "1126135959",
    11: "000042",
    12: "215959",
    13: "1126",
    14: "3012",
    22: "021",
    32: "48521000",
    35: "6222029375642931684=30121010000000000",
    37: "633012000001",
    41: "10000001",
    42: "898310048990001",
    49: "156",
    52: PIN_BLOCK,
}
# written out by hand from specs/issuer.md, field by field
CONSUME_WIRE = (
    b"0200"
    # bitmap: 2,3,4,7 | 11,12,13,14 | 22 | 32 | 35,37 | 41,42 | 49,52 | -
    + b"723C040128C09000"
    + b"19" + b"6222029375642931684"  # 2  LL
    + b"000000"  # 3
    + b"000000012345"  # 4
    + b"1126135959"  # 7
    + b"000042"  # 11
    + b"215959"  # 12
    + b"1126"  # 13
    + b"3012"  # 14
    + b"021"  # 22
    + b"08" + b"48521000"  # 32 LL
    + b"37" + b"6222029375642931684=30121010000000000"  # 35 LL, '=' stays ASCII
    + b"633012000001"  # 37
    + b"10000001"  # 41
    + b"898310048990001"  # 42
    + b"156"  # 49
    + PIN_BLOCK  # 52: 8 raw bytes
)

F90 = "0200" + "000042" + "1126135959" + "00048521000" + "00000000000"
REVERSAL: Fields = {
    2: "6222029375642931684",
    3: "000000",
    4: "000000012345",
    7: "1126140003",
    11: "000043",
    32: "48521000",
    37: "633012000001",
    41: "10000001",
    42: "898310048990001",
    49: "156",
    90: F90,
}
REVERSAL_WIRE = (
    b"0400"
    # primary: 1(secondary),2,3,4 | 7 | 11 | - | 32 | 37 | 41,42 | 49 | -
    + b"F220000108C08000"
    # secondary: 90 is bit 26 of the secondary bitmap
    + b"0000004000000000"
    + b"19" + b"6222029375642931684"
    + b"000000"
    + b"000000012345"
    + b"1126140003"
    + b"000043"
    + b"08" + b"48521000"
    + b"633012000001"
    + b"10000001"
    + b"898310048990001"
    + b"156"
    + F90.encode()  # 90: n42
)


def test_dialect_loads_with_framing() -> None:
    dialect = load_dialect("issuer")
    assert dialect.name == "issuer"
    assert dialect.framing["length_prefix"] == 2
    assert dialect.framing["length_encoding"] == "binary-big-endian"
    assert dialect.fields["h"]["max_len"] == 0
    assert dialect.fields["p"]["data_enc"] == "ascii" and dialect.fields["p"]["max_len"] == 16
    assert dialect.fmt(52) == "b" and dialect.fmt(35) == "z" and dialect.fmt(90) == "n"
    assert issuer_codec() is issuer_codec()  # loaded once


@pytest.mark.parametrize(
    ("mti", "fields", "wire"),
    [("0200", CONSUME, CONSUME_WIRE), ("0400", REVERSAL, REVERSAL_WIRE)],
    ids=["consume", "reversal-f90"],
)
def test_golden_bytes_both_ways(mti: str, fields: Fields, wire: bytes) -> None:
    assert CODEC.encode(mti, fields) == wire
    assert CODEC.decode(wire) == (mti, fields)


def test_fixed_numeric_is_zero_filled_and_text_space_padded() -> None:
    body = CODEC.encode("0800", {7: "1126135959", 11: "7", 41: "T1"})
    assert body == b"0800" + b"0220000000800000" + b"1126135959" + b"000007" + b"T1      "


def test_f90_longer_than_42_digits_is_rejected() -> None:
    with pytest.raises(CodecError) as info:
        CODEC.encode("0400", {11: "000001", 90: F90 + "0"})
    assert info.value.field == "90"


def test_truncated_message_names_the_field() -> None:
    with pytest.raises(CodecError) as info:
        CODEC.decode(CONSUME_WIRE[:-3])
    assert info.value.field == "52"
    assert info.value.partial[11] == "000042"
