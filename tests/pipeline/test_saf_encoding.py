"""How queued reversals/advices and write-ahead intents keep their ISO fields (switch/pipeline/saf.py):
the packed encoding written now, the JSON one written before (and still for awkward text), both
read back exactly."""

from __future__ import annotations

import json

from switch.core.codec import Fields
from switch.pipeline.saf import decode_fields, encode_fields

REVERSAL: Fields = {
    2: "6222029375642931684", 3: "000000", 4: "000000000123", 12: "101010", 13: "1127", 22: "021",
    32: "48521000", 37: "000000001234", 41: "20000001", 42: "898310058120002", 49: "156",
    90: "020000012311271010100004852100000000000000",
}


def test_a_reversal_round_trips_packed_in_field_order() -> None:
    raw = encode_fields(REVERSAL)
    assert raw.startswith(b"P1\x1e") and b"6222029375642931684" in raw
    back = decode_fields(raw)
    assert back == REVERSAL and list(back) == list(REVERSAL)


def test_bytes_empty_and_non_ascii_values_round_trip() -> None:
    fields: Fields = {52: bytes.fromhex("00ff10a5"), 55: b"", 37: "", 48: "老王便利店 #7", 61: "0000010000071127"}
    raw = encode_fields(fields)
    assert raw.startswith(b"P1\x1e")
    back = decode_fields(raw)
    assert back == fields and type(back[52]) is bytes and type(back[55]) is bytes


def test_text_holding_the_separator_or_a_lone_surrogate_is_written_as_json() -> None:
    for odd in ("a\x1eb", "x\ud800y"):
        fields: Fields = {48: odd, 52: b"\x01"}
        raw = encode_fields(fields)
        assert raw.startswith(b"{")
        assert decode_fields(raw) == fields


def test_rows_written_as_json_by_an_earlier_version_still_read() -> None:
    old = json.dumps({"2": ["s", "6222029375642931684"], "52": ["b", "0a0b"], "4": ["s", "000000000100"]}).encode()
    assert decode_fields(old) == {2: "6222029375642931684", 52: b"\x0a\x0b", 4: "000000000100"}
