"""DES / 3DES primitives, check values (issue hand vectors) and key generation."""

from __future__ import annotations

import pytest

from switch.crypto.des import (
    check_value,
    des_ecb_decrypt,
    des_ecb_encrypt,
    generate_key,
    is_odd_parity,
    with_odd_parity,
)

from crypto_vectors import h


def test_classic_single_des_vector() -> None:
    # FIPS 81 / "Now is t" example: key 0123456789ABCDEF.
    key = h("0123456789ABCDEF")
    assert des_ecb_encrypt(key, b"Now is t") == h("3FA40E8A984D4815")
    assert des_ecb_decrypt(key, h("3FA40E8A984D4815")) == b"Now is t"


def test_double_length_key_is_k1_k2_k1() -> None:
    k1, k2 = h("0123456789ABCDEF"), h("FEDCBA9876543210")
    data = h("0011223344556677")
    ede = des_ecb_encrypt(k1, des_ecb_decrypt(k2, des_ecb_encrypt(k1, data)))
    assert des_ecb_encrypt(k1 + k2, data) == ede
    assert des_ecb_decrypt(k1 + k2, ede) == data


def test_ecb_is_blockwise() -> None:
    key = h("0123456789ABCDEFFEDCBA9876543210")
    a, b = h("0000000000000000"), h("1111111111111111")
    assert des_ecb_encrypt(key, a + b) == des_ecb_encrypt(key, a) + des_ecb_encrypt(key, b)


def test_issue_hand_vector_pik_check_value_is_of_the_clear_pik() -> None:
    tmk, pik = h("11" * 16), h("22" * 16)
    assert check_value(pik) == h("00962B60")
    # Not the CV of the TMK, nor of the PIK as encrypted under the TMK.
    assert check_value(tmk) != h("00962B60")
    assert check_value(des_ecb_encrypt(tmk, pik)) != h("00962B60")


def test_issue_hand_vector_mak_check_value() -> None:
    assert check_value(h("3333333333333333")) == h("ADC67D84")


@pytest.mark.parametrize("length", [0, 7, 9, 15, 24, 32])
def test_bad_key_length_rejected(length: int) -> None:
    with pytest.raises(ValueError, match="8 or 16 bytes"):
        des_ecb_encrypt(bytes(length), bytes(8))


@pytest.mark.parametrize("length", [1, 7, 9, 15])
def test_bad_data_length_rejected(length: int) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        des_ecb_decrypt(bytes(8), bytes(length))


def test_odd_parity_fix() -> None:
    assert with_odd_parity(h("0000FFFE0102")) == h("0101FEFE0102")
    assert is_odd_parity(h("0101FEFE0102"))
    assert not is_odd_parity(h("00"))


@pytest.mark.parametrize("length", [8, 16])
def test_generate_key_length_and_parity(length: int) -> None:
    keys = {generate_key(length) for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert len(key) == length
        assert is_odd_parity(key)


def test_generate_key_rejects_equal_halves_and_weak_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    good = h("0123456789ABCDEFFEDCBA9876543210")
    batches = iter([h("22" * 16), h("0101010101010101") + good[8:], good])
    monkeypatch.setattr("switch.crypto.des.secrets.token_bytes", lambda n: next(batches))
    assert generate_key(16) == with_odd_parity(good)


@pytest.mark.parametrize("length", [0, 12, 24])
def test_generate_key_bad_length(length: int) -> None:
    with pytest.raises(ValueError):
        generate_key(length)
