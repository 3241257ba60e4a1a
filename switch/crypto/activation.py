"""Activation key transport (protocol §9.1): the TMK wrapped under the terminal's RSA key.

Owns: validating a terminal's public key (DER SubjectPublicKeyInfo, RSA 2048), wrapping a
16-byte TMK with RSA-OAEP (SHA-256, MGF1-SHA-256) into the 256-byte block followed by the TMK's
4-byte check value (the activation response F62), and the inverse for the terminal side (POS
simulator), including generating the terminal's key pair so callers never import
``cryptography`` themselves.

Must not log or show the TMK or private keys, and must not import I/O (sockets, anyio) or
``switch.pipeline`` / ``switch.adapters``.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from switch.crypto.des import check_value

__all__ = [
    "RSA_BITS",
    "WRAPPED_TMK_LENGTH",
    "ActivationKeyError",
    "generate_terminal_key",
    "load_private_key",
    "load_public_key",
    "private_key_der",
    "public_key_der",
    "unwrap_tmk",
    "wrap_tmk_for_terminal",
]

RSA_BITS = 2048
_RSA_BYTES = RSA_BITS // 8
WRAPPED_TMK_LENGTH = _RSA_BYTES + 4


class ActivationKeyError(ValueError):
    """A terminal public/private key is not usable, or a wrapped TMK does not unwrap or check."""


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def load_public_key(public_key_der: bytes) -> rsa.RSAPublicKey:
    """Parse a DER SubjectPublicKeyInfo; it must be an RSA 2048-bit key."""
    try:
        key = serialization.load_der_public_key(public_key_der)
    except (ValueError, TypeError):
        raise ActivationKeyError("public key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ActivationKeyError("public key is not RSA")
    if key.key_size != RSA_BITS:
        raise ActivationKeyError(f"RSA key must be {RSA_BITS} bits, got {key.key_size}")
    return key


def wrap_tmk_for_terminal(tmk: bytes, public_key_der: bytes) -> bytes:
    """Activation response F62: RSA-OAEP(TMK) (256 bytes) followed by the TMK's check value."""
    if len(tmk) != 16:
        raise ValueError(f"TMK must be 16 bytes, got {len(tmk)}")
    key = load_public_key(public_key_der)
    return key.encrypt(tmk, _oaep()) + check_value(tmk)


def generate_terminal_key() -> rsa.RSAPrivateKey:
    """Terminal side: a fresh RSA 2048 key pair."""
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def public_key_der(private_key: rsa.RSAPrivateKey) -> bytes:
    """Terminal side: the DER SubjectPublicKeyInfo sent in the activation request F62."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_key_der(private_key: rsa.RSAPrivateKey) -> bytes:
    """Terminal side: the private key as unencrypted PKCS#8 DER (for the simulator's own store)."""
    return private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(der: bytes) -> rsa.RSAPrivateKey:
    """Terminal side: inverse of :func:`private_key_der`; must be an RSA 2048-bit key."""
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError):
        raise ActivationKeyError("private key is not unencrypted PKCS#8 DER") from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != RSA_BITS:
        raise ActivationKeyError(f"private key is not RSA {RSA_BITS}")
    return key


def unwrap_tmk(private_key: rsa.RSAPrivateKey, blob: bytes) -> bytes:
    """Terminal side: recover the TMK from an activation response F62 and verify its check value."""
    if private_key.key_size != RSA_BITS:
        raise ActivationKeyError(f"RSA key must be {RSA_BITS} bits, got {private_key.key_size}")
    if len(blob) != WRAPPED_TMK_LENGTH:
        raise ActivationKeyError(f"wrapped TMK must be {WRAPPED_TMK_LENGTH} bytes, got {len(blob)}")
    try:
        tmk = private_key.decrypt(blob[:_RSA_BYTES], _oaep())
    except ValueError:
        raise ActivationKeyError("wrapped TMK does not decrypt under this key") from None
    if len(tmk) != 16:
        raise ActivationKeyError("wrapped TMK is not a 16-byte key")
    if check_value(tmk) != blob[_RSA_BYTES:]:
        raise ActivationKeyError("TMK check value mismatch")
    return tmk
