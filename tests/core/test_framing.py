"""Tests for switch.core.framing (protocol §1, §2): the length prefix across arbitrary chunk
boundaries, max_frame checked before the body arrives, short frames, mid_frame, encode_frame
and the header's digit-6 rule."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from switch.core.framing import (
    DEFAULT_MAX_FRAME,
    Frame,
    FrameReader,
    FramingError,
    encode_frame,
    response_header,
)

VECTORS_PATH = Path(__file__).resolve().parents[3] / "shared" / "vectors.json"
VECTORS = [v for v in json.loads(VECTORS_PATH.read_text())["vectors"] if v["frame_hex"]]
WIRE = [bytes.fromhex(v["frame_hex"]) for v in VECTORS]
STREAM = b"".join(WIRE)


def expected_frame(raw: bytes) -> Frame:
    return Frame(tpdu=raw[2:7], header=raw[7:13], body=raw[13:])


def drain(reader: FrameReader) -> list[Frame]:
    out: list[Frame] = []
    for _ in range(len(WIRE) + 2):  # bounded: never more frames than we fed
        frame = reader.next_frame()
        if frame is None:
            return out
        out.append(frame)
    raise AssertionError("next_frame kept returning frames")


# ---- FrameReader ---------------------------------------------------------------------------


def test_vectors_are_well_formed() -> None:
    assert len(WIRE) >= 5
    for raw in WIRE:
        assert int.from_bytes(raw[:2], "big") == len(raw) - 2


def test_whole_stream_in_one_chunk_yields_every_frame_in_order() -> None:
    reader = FrameReader()
    reader.receive_data(STREAM)
    assert drain(reader) == [expected_frame(raw) for raw in WIRE]
    assert not reader.mid_frame


def test_byte_by_byte_feeding() -> None:
    reader = FrameReader()
    got: list[Frame] = []
    for i in range(len(STREAM)):
        reader.receive_data(STREAM[i : i + 1])
        got.extend(drain(reader))
    assert got == [expected_frame(raw) for raw in WIRE]
    assert not reader.mid_frame


def test_frame_completes_exactly_on_its_last_byte() -> None:
    raw = WIRE[2]
    reader = FrameReader()
    for i in range(len(raw) - 1):
        reader.receive_data(raw[i : i + 1])
        assert reader.next_frame() is None
    reader.receive_data(raw[-1:])
    assert reader.next_frame() == expected_frame(raw)
    assert reader.next_frame() is None


@pytest.mark.parametrize("seed", range(20))
def test_arbitrary_chunk_boundaries(seed: int) -> None:
    rng = random.Random(seed)
    reader = FrameReader()
    got: list[Frame] = []
    pos = 0
    while pos < len(STREAM):  # bounded: pos advances by at least 1
        step = rng.randint(1, 300)
        reader.receive_data(STREAM[pos : pos + step])
        pos += step
        got.extend(drain(reader))
    assert got == [expected_frame(raw) for raw in WIRE]
    assert not reader.mid_frame


def test_chunk_ending_inside_the_length_prefix() -> None:
    raw = WIRE[0]
    reader = FrameReader()
    reader.receive_data(raw[:1])
    assert reader.next_frame() is None
    assert reader.mid_frame
    reader.receive_data(raw[1:])
    assert reader.next_frame() == expected_frame(raw)


def test_len_over_max_frame_raises_before_the_body_arrives() -> None:
    reader = FrameReader()
    reader.receive_data((DEFAULT_MAX_FRAME + 1).to_bytes(2, "big"))  # only the prefix
    with pytest.raises(FramingError) as info:
        reader.next_frame()
    assert info.value.reason == "frame_too_large"


def test_len_of_ffff_raises_from_the_prefix_alone() -> None:
    reader = FrameReader()
    reader.receive_data(b"\xff\xff")
    with pytest.raises(FramingError):
        reader.next_frame()


def test_len_equal_to_max_frame_is_accepted() -> None:
    payload = b"\x60\x00\x03\x00\x00" + b"\x60\x31\x00\x00\x00\x00" + bytes(DEFAULT_MAX_FRAME - 11)
    reader = FrameReader()
    reader.receive_data(len(payload).to_bytes(2, "big") + payload)
    frame = reader.next_frame()
    assert frame is not None
    assert len(frame.body) == DEFAULT_MAX_FRAME - 11


def test_custom_max_frame() -> None:
    raw = WIRE[2]  # LEN 0x73 = 115
    reader = FrameReader(max_frame=114)
    reader.receive_data(raw[:2])
    with pytest.raises(FramingError):
        reader.next_frame()
    ok = FrameReader(max_frame=115)
    ok.receive_data(raw)
    assert ok.next_frame() == expected_frame(raw)


def test_oversized_frame_after_a_good_one() -> None:
    reader = FrameReader()
    reader.receive_data(WIRE[0] + (4000).to_bytes(2, "big"))
    assert reader.next_frame() == expected_frame(WIRE[0])
    with pytest.raises(FramingError):
        reader.next_frame()


@pytest.mark.parametrize("length", [0, 1, 5, 10])
def test_frame_too_short_for_tpdu_and_header(length: int) -> None:
    reader = FrameReader()
    reader.receive_data(length.to_bytes(2, "big") + bytes(range(length)))
    with pytest.raises(FramingError) as info:
        reader.next_frame()
    assert info.value.reason == "short_frame"


def test_frame_of_exactly_tpdu_and_header_has_empty_body() -> None:
    tpdu, header = bytes.fromhex("6000030000"), bytes.fromhex("603100000000")
    reader = FrameReader()
    reader.receive_data(b"\x00\x0b" + tpdu + header)
    assert reader.next_frame() == Frame(tpdu, header, b"")


def test_frame_parse_short_payload() -> None:
    with pytest.raises(FramingError):
        Frame.parse(bytes(10))
    assert Frame.parse(bytes(range(12))) == Frame(bytes(range(5)), bytes(range(5, 11)), b"\x0b")


def test_mid_frame_tracks_buffered_bytes() -> None:
    raw = WIRE[0]
    reader = FrameReader()
    assert not reader.mid_frame
    reader.receive_data(b"")
    assert not reader.mid_frame
    reader.receive_data(raw[:5])
    assert reader.mid_frame
    assert reader.next_frame() is None
    assert reader.mid_frame
    reader.receive_data(raw[5:] + WIRE[1][:3])
    assert reader.next_frame() == expected_frame(raw)
    assert reader.mid_frame  # three bytes of the next frame are buffered
    reader.receive_data(WIRE[1][3:])
    assert reader.next_frame() == expected_frame(WIRE[1])
    assert not reader.mid_frame


# ---- encode_frame ----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", WIRE, ids=[v["name"] for v in VECTORS])
def test_encode_frame_reproduces_vectors(raw: bytes) -> None:
    assert encode_frame(raw[2:7], raw[7:13], raw[13:]) == raw


def test_encode_frame_round_trips_through_reader() -> None:
    wire = encode_frame(b"\x60\x12\x34\x56\x78", b"\x61\x31\x10\xff\xff\xff", b"\x08\x00abc")
    assert wire[:2] == b"\x00\x10"
    reader = FrameReader()
    reader.receive_data(wire)
    assert reader.next_frame() == Frame(b"\x60\x12\x34\x56\x78", b"\x61\x31\x10\xff\xff\xff", b"\x08\x00abc")


def test_encode_frame_refuses_what_two_bytes_cannot_count() -> None:
    assert len(encode_frame(bytes(5), bytes(6), bytes(0xFFFF - 11))) == 0xFFFF + 2
    with pytest.raises(FramingError):
        encode_frame(bytes(5), bytes(6), bytes(0xFFFF - 10))


# ---- response_header -------------------------------------------------------------------------


@pytest.mark.parametrize("digit6", [0, 1, 3, 9])
def test_response_header_sets_digit_6_only(digit6: int) -> None:
    request = bytes.fromhex("603100000000")
    assert response_header(request, digit6).hex().upper() == f"60310{digit6}000000"


def test_response_header_echoes_status_and_reserved_f_nibbles() -> None:
    # app 61, version 31, status 1 (test), digit 6 = 0, reserved FFFFFF
    request = bytes.fromhex("613110FFFFFF")
    assert response_header(request, 3) == bytes.fromhex("613113FFFFFF")
    assert response_header(request, 1) == bytes.fromhex("613111FFFFFF")


def test_response_header_overwrites_a_nonzero_request_digit_6() -> None:
    request = bytes.fromhex("60311A5F0F1E")
    assert response_header(request, 0) == bytes.fromhex("6031105F0F1E")


def test_response_header_does_not_mutate_its_input() -> None:
    request = bytes.fromhex("603100ABCDEF")
    response_header(request, 3)
    assert request == bytes.fromhex("603100ABCDEF")


@pytest.mark.parametrize("digit6", [-1, 10, 15])
def test_response_header_rejects_non_decimal_digit(digit6: int) -> None:
    with pytest.raises(ValueError):
        response_header(bytes(6), digit6)


def test_mid_frame_means_a_partly_buffered_frame_only() -> None:
    reader = FrameReader()
    assert not reader.mid_frame
    reader.receive_data(WIRE[0][:1])
    assert reader.mid_frame  # half a LEN
    reader.receive_data(WIRE[0][1:] + WIRE[1])
    assert not reader.mid_frame  # two whole frames waiting: not a stall
    reader.receive_data(WIRE[2][:5])
    assert not reader.mid_frame  # the next frame is whole; the partial one is behind it
    assert reader.next_frame() is not None and reader.next_frame() is not None
    assert reader.mid_frame  # now the partial one is next
