"""Sign-on working keys and the F62 layouts of protocol §8, against sign_on_response_004."""

from __future__ import annotations

import pytest
from crypto_vectors import VECTORS, h

from switch.crypto.des import check_value, des_ecb_encrypt, is_odd_parity
from switch.crypto.working_keys import (
    F62_LENGTHS,
    KEY_MODES,
    KeyCheckError,
    WorkingKeys,
    build_f62,
    generate_working_keys,
    parse_f62,
)

V = VECTORS["sign_on_response_004"]
TMK = h(V["tmk"])
F62 = h(V["fields"]["62"])
CLEAR = WorkingKeys(pik=h(V["clear_pik"]), mak=h(V["clear_mak"]), tdk=h(V["clear_tdk"]))


def test_vector_check_values_are_of_the_clear_keys() -> None:
    assert check_value(CLEAR.pik) == h(V["check_values"]["pik"])
    assert check_value(CLEAR.mak) == h(V["check_values"]["mak"])
    assert CLEAR.tdk is not None
    assert check_value(CLEAR.tdk) == h(V["check_values"]["tdk"])


def test_build_f62_004_matches_vector_byte_for_byte() -> None:
    assert build_f62(TMK, "004", CLEAR) == F62


def test_vector_layout_mak_fill_is_clear_zeros() -> None:
    # PIK(16) CV(4) MAK(8) then eight clear 00 bytes (not DES(TMK, 00..00)).
    assert F62[28:36] == bytes(8)
    assert des_ecb_encrypt(TMK, bytes(8)) != bytes(8)


def test_parse_vector_f62_gives_clear_keys() -> None:
    assert parse_f62(TMK, "004", F62) == CLEAR


@pytest.mark.parametrize("mode", sorted(KEY_MODES))
def test_generated_keys_fit_mode(mode: str) -> None:
    keys = generate_working_keys(mode)
    assert len(keys.pik) == (8 if mode == "001" else 16)
    assert len(keys.mak) == 8
    assert (keys.tdk is not None) == (mode == "004")
    for key in (keys.pik, keys.mak, keys.tdk or b"\x01"):
        assert is_odd_parity(key)


@pytest.mark.parametrize("mode", sorted(KEY_MODES))
def test_build_then_parse_round_trip(mode: str) -> None:
    keys = generate_working_keys(mode)
    f62 = build_f62(TMK, mode, keys)
    assert len(f62) == F62_LENGTHS[mode] == {"001": 24, "003": 40, "004": 60}[mode]
    assert parse_f62(TMK, mode, f62) == keys


def test_layout_001() -> None:
    keys = WorkingKeys(pik=h("22" * 8), mak=h("33" * 8), tdk=None)
    tmk = h("11" * 16)
    f62 = build_f62(tmk, "001", keys)
    assert f62 == (
        des_ecb_encrypt(tmk, keys.pik) + check_value(keys.pik)
        + des_ecb_encrypt(tmk, keys.mak) + h("ADC67D84")
    )


def test_layout_003_is_004_without_tdk() -> None:
    keys003 = WorkingKeys(pik=CLEAR.pik, mak=CLEAR.mak, tdk=None)
    assert build_f62(TMK, "003", keys003) == F62[:40]


def test_issue_hand_vector_in_f62() -> None:
    tmk = h("11" * 16)
    keys = WorkingKeys(pik=h("22" * 16), mak=h("33" * 8), tdk=None)
    f62 = build_f62(tmk, "003", keys)
    assert f62[16:20] == h("00962B60")
    assert f62[36:40] == h("ADC67D84")


def test_repr_never_shows_key_bytes() -> None:
    text = repr(CLEAR) + str(CLEAR)
    for key in (V["clear_pik"], V["clear_mak"], V["clear_tdk"]):
        assert key.upper() not in text.upper()
        assert key.upper()[:8] not in text.upper()
    assert "08D7B4FB" in text  # check values are fine to show


@pytest.mark.parametrize("mode", sorted(KEY_MODES))
def test_parse_wrong_length(mode: str) -> None:
    f62 = build_f62(TMK, mode, generate_working_keys(mode))
    with pytest.raises(KeyCheckError, match="bytes"):
        parse_f62(TMK, mode, f62 + b"\x00")
    with pytest.raises(KeyCheckError):
        parse_f62(TMK, mode, f62[:-1])


@pytest.mark.parametrize(("offset", "name"), [(16, "PIK"), (36, "MAK"), (56, "TDK"), (0, "PIK"),
                                              (20, "MAK"), (40, "TDK")])
def test_parse_detects_corruption(offset: int, name: str) -> None:
    bad = bytearray(F62)
    bad[offset] ^= 0x01
    with pytest.raises(KeyCheckError, match=name):
        parse_f62(TMK, "004", bytes(bad))


def test_parse_rejects_nonzero_mak_fill() -> None:
    bad = bytearray(F62)
    bad[30] = 0xFF
    with pytest.raises(KeyCheckError, match="zero"):
        parse_f62(TMK, "004", bytes(bad))


def test_parse_under_wrong_tmk_fails() -> None:
    with pytest.raises(KeyCheckError):
        parse_f62(h("11" * 16), "004", F62)


def test_key_check_error_is_value_error() -> None:
    assert issubclass(KeyCheckError, ValueError)


def test_build_rejects_keys_that_do_not_fit_mode() -> None:
    with pytest.raises(ValueError, match="8-byte PIK"):
        build_f62(TMK, "001", CLEAR)
    with pytest.raises(ValueError, match="no TDK"):
        build_f62(TMK, "003", CLEAR)
    with pytest.raises(ValueError, match="needs a TDK"):
        build_f62(TMK, "004", WorkingKeys(pik=CLEAR.pik, mak=CLEAR.mak, tdk=None))
    with pytest.raises(ValueError, match="unknown key mode"):
        build_f62(TMK, "002", CLEAR)
    with pytest.raises(ValueError, match="TMK"):
        build_f62(TMK[:8], "004", CLEAR)


def test_working_keys_validates_lengths() -> None:
    with pytest.raises(ValueError):
        WorkingKeys(pik=bytes(12), mak=bytes(8), tdk=None)
    with pytest.raises(ValueError):
        WorkingKeys(pik=bytes(16), mak=bytes(16), tdk=None)
    with pytest.raises(ValueError):
        WorkingKeys(pik=bytes(16), mak=bytes(8), tdk=bytes(8))
    with pytest.raises(ValueError):
        generate_working_keys("002")
