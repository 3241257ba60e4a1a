"""CUP MAC (protocol §10.1), every step against consume_request_swipe_pin.mac_steps."""

from __future__ import annotations

import pytest
from crypto_vectors import VECTORS, h

from switch.crypto.mac import cup_mac, mac_steps, verify_mac

V = VECTORS["consume_request_swipe_pin"]
STEPS = V["mac_steps"]
MAK = h(VECTORS["sign_on_response_004"]["clear_mak"])
MAB = h(STEPS["mab_hex"])


def test_mab_is_frame_from_mti_to_end_of_field_63() -> None:
    frame = h(V["frame_hex"])
    assert frame[2 + 5 + 6 : -8] == MAB  # LEN, TPDU, header stripped; F64 (8 bytes) last


def test_every_step_matches_vector() -> None:
    steps = mac_steps(MAK, MAB)
    assert steps.xor == h(STEPS["xor"])
    assert steps.hex_ascii == STEPS["hex_ascii"].encode("ascii")
    assert steps.e1 == h(STEPS["e1"])
    assert steps.t == h(STEPS["t"])
    assert steps.e2 == h(STEPS["e2"])
    assert steps.f64 == STEPS["f64_ascii"].encode("ascii")


def test_cup_mac_is_field_64() -> None:
    assert cup_mac(MAK, MAB) == h(V["fields"]["64"]) == b"369D3F70"


def test_verify_mac_accepts_the_right_mac() -> None:
    assert verify_mac(MAK, MAB, b"369D3F70")


@pytest.mark.parametrize("f64", [b"369D3F71", b"369d3f70", b"369D3F7", b"", b"369D3F700"])
def test_verify_mac_rejects_wrong_mac(f64: bytes) -> None:
    assert not verify_mac(MAK, MAB, f64)


def test_verify_mac_rejects_changed_message() -> None:
    changed = bytearray(MAB)
    changed[20] ^= 0x01
    assert not verify_mac(MAK, bytes(changed), b"369D3F70")


def test_verify_mac_rejects_wrong_key() -> None:
    assert not verify_mac(h("1A2B3C4D5E6F7083"), MAB, b"369D3F70")


def test_zero_padding_to_block_boundary() -> None:
    short = MAB[:-3]
    assert len(short) % 8 != 0
    assert cup_mac(MAK, short) == cup_mac(MAK, short + bytes(3))
    assert cup_mac(MAK, b"12345678") != cup_mac(MAK, b"1234567")


def test_mak_must_be_single_length() -> None:
    with pytest.raises(ValueError, match="8 bytes"):
        cup_mac(MAK * 2, MAB)


def test_cup_mac_agrees_with_the_steps_for_any_length() -> None:
    # cup_mac computes without keeping the steps; the two must never drift apart
    for n in range(0, 200, 7):
        mab = bytes((i * 37 + n) % 256 for i in range(n))
        assert cup_mac(MAK, mab) == mac_steps(MAK, mab).f64
