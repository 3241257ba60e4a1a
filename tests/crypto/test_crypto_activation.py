"""Activation key transport (protocol §9.1): TMK under the terminal's RSA-2048 key, OAEP-SHA-256."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from switch.crypto.activation import (
    WRAPPED_TMK_LENGTH,
    ActivationKeyError,
    generate_terminal_key,
    load_private_key,
    load_public_key,
    private_key_der,
    public_key_der,
    unwrap_tmk,
    wrap_tmk_for_terminal,
)
from switch.crypto.des import check_value

TMK = bytes.fromhex("E54E7BCB2078DE2AF51B9DA88AB5B395")


@pytest.fixture(scope="module")
def terminal_key() -> rsa.RSAPrivateKey:
    return generate_terminal_key()


def test_wrap_layout_and_round_trip(terminal_key: rsa.RSAPrivateKey) -> None:
    blob = wrap_tmk_for_terminal(TMK, public_key_der(terminal_key))
    assert len(blob) == WRAPPED_TMK_LENGTH == 260
    assert blob[256:] == check_value(TMK)
    assert unwrap_tmk(terminal_key, blob) == TMK


def test_wrap_is_oaep_sha256(terminal_key: rsa.RSAPrivateKey) -> None:
    blob = wrap_tmk_for_terminal(TMK, public_key_der(terminal_key))
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    assert terminal_key.decrypt(blob[:256], oaep) == TMK


def test_wrap_is_randomised(terminal_key: rsa.RSAPrivateKey) -> None:
    der = public_key_der(terminal_key)
    assert wrap_tmk_for_terminal(TMK, der)[:256] != wrap_tmk_for_terminal(TMK, der)[:256]


def test_tampered_blob(terminal_key: rsa.RSAPrivateKey) -> None:
    blob = bytearray(wrap_tmk_for_terminal(TMK, public_key_der(terminal_key)))
    blob[10] ^= 0x01
    with pytest.raises(ActivationKeyError, match="does not decrypt"):
        unwrap_tmk(terminal_key, bytes(blob))


def test_wrong_check_value(terminal_key: rsa.RSAPrivateKey) -> None:
    blob = bytearray(wrap_tmk_for_terminal(TMK, public_key_der(terminal_key)))
    blob[-1] ^= 0x01
    with pytest.raises(ActivationKeyError, match="check value"):
        unwrap_tmk(terminal_key, bytes(blob))


def test_wrong_private_key(terminal_key: rsa.RSAPrivateKey) -> None:
    blob = wrap_tmk_for_terminal(TMK, public_key_der(terminal_key))
    with pytest.raises(ActivationKeyError):
        unwrap_tmk(generate_terminal_key(), blob)


def test_wrong_blob_length(terminal_key: rsa.RSAPrivateKey) -> None:
    blob = wrap_tmk_for_terminal(TMK, public_key_der(terminal_key))
    with pytest.raises(ActivationKeyError, match="260"):
        unwrap_tmk(terminal_key, blob[:-1])


@pytest.mark.parametrize("der", [b"", b"\x30\x03\x02\x01\x01", b"not a key" * 30])
def test_garbage_public_key(der: bytes) -> None:
    with pytest.raises(ActivationKeyError, match="DER"):
        wrap_tmk_for_terminal(TMK, der)


def test_rsa_1024_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ActivationKeyError, match="2048"):
        wrap_tmk_for_terminal(TMK, public_key_der(small))
    with pytest.raises(ActivationKeyError, match="2048"):
        unwrap_tmk(small, bytes(WRAPPED_TMK_LENGTH))


def test_ec_key_refused() -> None:
    der = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ActivationKeyError, match="not RSA"):
        wrap_tmk_for_terminal(TMK, der)


def test_tmk_length(terminal_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        wrap_tmk_for_terminal(TMK[:8], public_key_der(terminal_key))


def test_private_key_der_round_trip(terminal_key: rsa.RSAPrivateKey) -> None:
    loaded = load_private_key(private_key_der(terminal_key))
    assert public_key_der(loaded) == public_key_der(terminal_key)
    assert load_public_key(public_key_der(loaded)).key_size == 2048
    with pytest.raises(ActivationKeyError):
        load_private_key(b"junk")


def test_activation_key_error_is_value_error() -> None:
    assert issubclass(ActivationKeyError, ValueError)
