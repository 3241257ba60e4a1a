"""Format-0 PIN blocks (protocol §10.2): vectors, translation PIK -> ZPK, and invalid blocks."""

from __future__ import annotations

import pytest
from crypto_vectors import VECTORS, h

from switch.crypto.des import des_ecb_decrypt, des_ecb_encrypt, generate_key
from switch.crypto.pin import (
    PinBlockError,
    encrypt_pin_block,
    pin_block_clear,
    pin_matches,
    translate_pin_block,
)

V = VECTORS["consume_request_swipe_pin"]
PIK = h(VECTORS["sign_on_response_004"]["clear_pik"])
PAN = V["fields"]["35"].split("=")[0]
F52 = h(V["fields"]["52"])
ZPK = h("89ABCDEF0123456776543210FEDCBA98")


def _xor_pan(clear_nibbles: str, pan: str) -> bytes:
    """Build a (possibly invalid) clear block from 16 PIN-field nibbles, XORed with the PAN."""
    pan_field = bytes.fromhex("0000" + pan[:-1][-12:])
    return bytes(a ^ b for a, b in zip(bytes.fromhex(clear_nibbles), pan_field, strict=True))


def test_issue_hand_vector() -> None:
    assert pin_block_clear("123456", "123456789012345678") == h("061253DFFEDCBA98")


def test_vector_pan_is_from_track() -> None:
    assert PAN == "6222029375642931684"


def test_vector_f52_decrypts_to_clear_block() -> None:
    assert des_ecb_decrypt(PIK, F52) == h(V["clear_pin_block"]) == h("0612A7239BD6CE97")
    assert pin_block_clear("123456", PAN) == h(V["clear_pin_block"])


def test_encrypt_pin_block_gives_vector_f52() -> None:
    assert encrypt_pin_block(PIK, "123456", PAN) == F52


def test_pin_matches_vector() -> None:
    assert pin_matches(PIK, PAN, F52, "123456")
    assert not pin_matches(PIK, PAN, F52, "123457")
    assert not pin_matches(PIK, PAN, F52, "12345")


def test_short_pan_is_left_zero_padded() -> None:
    # 12 digits excluding the check digit would need 13; fewer are padded on the left.
    block = pin_block_clear("1234", "123456789")
    pan_field = h("0000000012345678")  # "12345678" (check digit 9 dropped) right-aligned in 12
    assert block == bytes(a ^ b for a, b in zip(h("041234FFFFFFFFFF"), pan_field, strict=True))


def test_translate_then_pin_matches_under_zpk() -> None:
    out = translate_pin_block(PIK, ZPK, PAN, F52)
    assert out != F52
    assert des_ecb_decrypt(ZPK, out) == h(V["clear_pin_block"])
    assert pin_matches(ZPK, PAN, out, "123456")
    assert not pin_matches(ZPK, PAN, out, "654321")


def test_translate_from_single_des_pik() -> None:
    pik8 = generate_key(8)
    block = encrypt_pin_block(pik8, "0000", PAN)
    assert des_ecb_decrypt(pik8, block) == pin_block_clear("0000", PAN)
    assert pin_matches(ZPK, PAN, translate_pin_block(pik8, ZPK, PAN, block), "0000")


@pytest.mark.parametrize("pin", ["1234", "123456789012"])
def test_pin_length_limits(pin: str) -> None:
    block = encrypt_pin_block(PIK, pin, PAN)
    assert pin_matches(ZPK, PAN, translate_pin_block(PIK, ZPK, PAN, block), pin)


def test_translate_under_wrong_pan_is_rejected_or_differs() -> None:
    # The block is bound to its PAN: with another PAN it either fails to decode or
    # decodes to a different PIN.
    other = "6222029375642931692"
    try:
        assert not pin_matches(PIK, other, F52, "123456")
    except PinBlockError:
        pass


BAD_BLOCKS = {
    "control nibble 1": "16123456FFFFFFFF",
    "control nibble F": "F6123456FFFFFFFF",
    "length 3": "03123FFFFFFFFFFF",
    "length 13": "0D1234567890123F",
    "length 0": "00FFFFFFFFFFFFFF",
    "non-digit A": "061234A6FFFFFFFF",
    "fill not F": "06123456FFFFFFFE",
    "fill zeros": "0612345600000000",
}


@pytest.mark.parametrize("nibbles", BAD_BLOCKS.values(), ids=BAD_BLOCKS.keys())
def test_bad_blocks_raise_pin_block_error(nibbles: str) -> None:
    block = des_ecb_encrypt(PIK, _xor_pan(nibbles, PAN))
    with pytest.raises(PinBlockError) as translated:
        translate_pin_block(PIK, ZPK, PAN, block)
    with pytest.raises(PinBlockError) as matched:
        pin_matches(PIK, PAN, block, "123456")
    for exc in (translated.value, matched.value):
        text = str(exc)
        assert "123456" not in text and PAN not in text and nibbles not in text
        assert exc.__cause__ is None and exc.__suppress_context__


def test_block_under_wrong_key_is_rejected() -> None:
    with pytest.raises(PinBlockError):
        translate_pin_block(ZPK, ZPK, PAN, F52)


@pytest.mark.parametrize("length", [0, 7, 9, 16])
def test_block_wrong_length(length: int) -> None:
    with pytest.raises(PinBlockError):
        translate_pin_block(PIK, ZPK, PAN, bytes(length))


@pytest.mark.parametrize("pin", ["123", "1234567890123", "12a4", ""])
def test_invalid_pin_input(pin: str) -> None:
    with pytest.raises(PinBlockError):
        pin_block_clear(pin, PAN)


@pytest.mark.parametrize("pan", ["", "62220293756429316X4", "6222 0293"])
def test_invalid_pan(pan: str) -> None:
    with pytest.raises(PinBlockError):
        pin_block_clear("1234", pan)
    with pytest.raises(PinBlockError):
        translate_pin_block(PIK, ZPK, pan, F52)


def test_zone_pin_key_must_be_double_length() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        translate_pin_block(PIK, ZPK[:8], PAN, F52)


def test_pin_block_error_is_value_error() -> None:
    assert issubclass(PinBlockError, ValueError)
