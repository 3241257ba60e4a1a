"""ISO 9564 format-0 PIN blocks: build, translate between keys, and check (protocol §10.2).

Owns the only places where a clear PIN or clear PIN block exists in the switch:
- ``translate_pin_block``: terminal PIK -> issuer zone PIN key (the switch's hot path);
- ``pin_matches``: the mock issuers' check of a PIN they hold;
- ``pin_block_clear`` / ``encrypt_pin_block``: the terminal side (POS simulator, tests).

Format 0: ``0`` + PIN length + PIN + ``F`` fill (16 nibbles), XOR ``0000`` + the 12 rightmost
PAN digits excluding the check digit. Encrypted with the PIK: single DES for an 8-byte key
(``001`` sign-on), 3DES for a 16-byte key.

Must not log, print, return (except where the API says so) or put into an exception message a
clear PIN, a clear PIN block, a key or a full PAN. Exceptions raised while a clear block is in
scope are raised ``from None`` so no traceback chains carry it. Must not import I/O (sockets,
anyio) or ``switch.pipeline`` / ``switch.adapters``.
"""

from __future__ import annotations

import hmac

from switch.crypto.des import des_ecb_decrypt, des_ecb_encrypt

__all__ = [
    "PinBlockError",
    "encrypt_pin_block",
    "pin_block_clear",
    "pin_matches",
    "translate_pin_block",
]

_DIGITS = frozenset("0123456789")


class PinBlockError(ValueError):
    """A PIN block (or the PIN/PAN it is built from) is not a valid format-0 block (→ ``99``)."""


def _pan_field(pan: str) -> bytes:
    """``0000`` + the 12 rightmost PAN digits excluding the check digit (left zero-padded)."""
    if not pan or not set(pan) <= _DIGITS:
        raise PinBlockError("PAN must be a non-empty digit string")
    part = pan[:-1][-12:].rjust(12, "0")
    return bytes.fromhex("0000" + part)


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ValueError("XOR of blocks of different lengths")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def pin_block_clear(pin: str, pan: str) -> bytes:
    """The clear format-0 PIN block (8 bytes) for ``pin`` (4..12 digits) and ``pan``."""
    if not 4 <= len(pin) <= 12 or not set(pin) <= _DIGITS:
        raise PinBlockError("PIN must be 4 to 12 digits")
    pin_field = bytes.fromhex(f"0{len(pin):X}{pin}".ljust(16, "F"))
    return _xor(pin_field, _pan_field(pan))


def encrypt_pin_block(pik: bytes, pin: str, pan: str) -> bytes:
    """Terminal side: the F52 value, the format-0 block encrypted under ``pik`` (8 or 16 bytes)."""
    return des_ecb_encrypt(pik, pin_block_clear(pin, pan))


def _decode_pin(key: bytes, pan: str, block: bytes) -> str:
    """Decrypt ``block`` under ``key`` and return the PIN; PinBlockError if not valid format 0."""
    if len(block) != 8:
        raise PinBlockError(f"PIN block must be 8 bytes, got {len(block)}")
    nibbles = _xor(des_ecb_decrypt(key, block), _pan_field(pan)).hex().upper()
    if nibbles[0] != "0":
        raise PinBlockError("PIN block is not format 0")
    length = int(nibbles[1], 16)
    if not 4 <= length <= 12:
        raise PinBlockError("PIN block has an invalid PIN length")
    pin = nibbles[2 : 2 + length]
    if not set(pin) <= _DIGITS:
        raise PinBlockError("PIN block has a non-digit PIN nibble")
    if set(nibbles[2 + length :]) - {"F"}:
        raise PinBlockError("PIN block fill is not F")
    return pin


def translate_pin_block(src_key: bytes, dst_key: bytes, pan: str, block: bytes) -> bytes:
    """Re-encrypt a terminal PIN block from ``src_key`` (PIK) to ``dst_key`` (issuer ZPK, 16 bytes).

    The block is checked to be a valid format-0 block for ``pan`` first; otherwise
    :class:`PinBlockError`. The clear block never leaves this function.
    """
    if len(dst_key) != 16:
        raise ValueError(f"zone PIN key must be 16 bytes, got {len(dst_key)}")
    try:
        pin = _decode_pin(src_key, pan, block)
        return encrypt_pin_block(dst_key, pin, pan)
    except PinBlockError as exc:
        raise PinBlockError(str(exc)) from None


def pin_matches(key: bytes, pan: str, block: bytes, expected_pin: str) -> bool:
    """Mock issuer: does ``block`` (under ``key``) carry ``expected_pin``? Constant-time compare.

    Raises :class:`PinBlockError` when the block does not decode to a valid format-0 PIN.
    """
    try:
        pin = _decode_pin(key, pan, block)
    except PinBlockError as exc:
        raise PinBlockError(str(exc)) from None
    return hmac.compare_digest(pin.encode("utf-8"), expected_pin.encode("utf-8"))
