"""DES / 3DES primitives for the software security module: ECB, check values, key generation.

Owns the single place where a DES-family cipher object is built (through ``cryptography``;
no hand-rolled cipher). Single DES is 3DES with K1=K2=K3 (8-byte key repeated to 24 bytes);
a 16-byte (double-length) key is used as K1K2K1.

Must not log, print or put key bytes or clear data into exception messages, and must not
import anything that does I/O (sockets, anyio) or anything from ``switch.pipeline`` /
``switch.adapters``.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, modes

try:  # cryptography >= 43 moved TripleDES to "decrepit"; importing it there raises no warning.
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.algorithms import (  # type: ignore[assignment,no-redef,unused-ignore]
        TripleDES,
    )

__all__ = [
    "BLOCK",
    "check_value",
    "des_ecb_decrypt",
    "des_ecb_encrypt",
    "generate_key",
    "is_odd_parity",
    "with_odd_parity",
]

BLOCK = 8

# DES weak and semi-weak keys (odd-parity form); generate_key never returns one as a half.
_WEAK_KEYS = frozenset(
    bytes.fromhex(h)
    for h in (
        "0101010101010101", "FEFEFEFEFEFEFEFE", "E0E0E0E0F1F1F1F1", "1F1F1F1F0E0E0E0E",
        "011F011F010E010E", "1F011F010E010E01", "01E001E001F101F1", "E001E001F101F101",
        "01FE01FE01FE01FE", "FE01FE01FE01FE01", "1FE01FE00EF10EF1", "E01FE01FF10EF10E",
        "1FFE1FFE0EFE0EFE", "FE1FFE1FFE0EFE0E", "E0FEE0FEF1FEF1FE", "FEE0FEE0FEF1FEF1",
    )
)


def _expand(key: bytes) -> bytes:
    """8-byte key -> K1K1K1 (single DES); 16-byte key -> K1K2K1 (double-length 3DES)."""
    if len(key) == 8:
        return key * 3
    if len(key) == 16:
        return key + key[:8]
    raise ValueError(f"DES key must be 8 or 16 bytes, got {len(key)}")


def _check_data(data: bytes) -> None:
    if len(data) % BLOCK:
        raise ValueError(f"DES data must be a multiple of 8 bytes, got {len(data)}")


# ECB keeps no state between blocks, so one encryptor/decryptor context per key can serve every
# block-aligned call (update() returns all full blocks at once). Creating a context costs more than
# a DES operation; the most recently used keys keep theirs (keys already live in process memory).
_CONTEXT_CACHE_SIZE = 4096
_contexts: OrderedDict[tuple[bytes, bool], Any] = OrderedDict()


def _context(key: bytes, encrypt: bool) -> Any:
    slot = (key, encrypt)
    ctx = _contexts.get(slot)
    if ctx is None:
        cipher = Cipher(TripleDES(_expand(key)), modes.ECB())
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        _contexts[slot] = ctx
        if len(_contexts) > _CONTEXT_CACHE_SIZE:
            _contexts.popitem(last=False)
    else:
        _contexts.move_to_end(slot)
    return ctx


def des_ecb_encrypt(key: bytes, data: bytes) -> bytes:
    """ECB-encrypt ``data`` (multiple of 8 bytes) under an 8-byte (DES) or 16-byte (3DES) key."""
    _check_data(data)
    if len(key) not in (8, 16):
        _expand(key)  # raises, naming the length
    return bytes(_context(key if type(key) is bytes else bytes(key), True).update(data))


def des_ecb_decrypt(key: bytes, data: bytes) -> bytes:
    """ECB-decrypt ``data`` (multiple of 8 bytes) under an 8-byte (DES) or 16-byte (3DES) key."""
    _check_data(data)
    if len(key) not in (8, 16):
        _expand(key)  # raises, naming the length
    return bytes(_context(key if type(key) is bytes else bytes(key), False).update(data))


def check_value(key: bytes) -> bytes:
    """Key check value: the first 4 bytes of encrypting 8 zero bytes under ``key`` (§8)."""
    return des_ecb_encrypt(key, bytes(BLOCK))[:4]


def _odd(byte: int) -> int:
    """``byte`` with its least significant bit set so the byte has odd parity."""
    high = byte & 0xFE
    return high | (0 if bin(high).count("1") % 2 else 1)


def with_odd_parity(key: bytes) -> bytes:
    """Return ``key`` with odd parity fixed on every byte (the low bit of each byte)."""
    return bytes(_odd(b) for b in key)


def is_odd_parity(key: bytes) -> bool:
    """True when every byte of ``key`` has an odd number of set bits."""
    return all(bin(b).count("1") % 2 == 1 for b in key)


def generate_key(length: int) -> bytes:
    """A fresh random DES (8) or double-length 3DES (16) key with odd parity on every byte.

    Never returns a DES weak/semi-weak half, nor a 16-byte key whose halves are equal (which
    would silently degrade to single DES).
    """
    if length not in (8, 16):
        raise ValueError(f"key length must be 8 or 16, got {length}")
    for _ in range(64):  # a rejection is ~2**-50 likely; the bound only keeps the loop finite
        key = with_odd_parity(secrets.token_bytes(length))
        halves = [key[i : i + BLOCK] for i in range(0, length, BLOCK)]
        if any(h in _WEAK_KEYS for h in halves):
            continue
        if length == 16 and halves[0] == halves[1]:
            continue
        return key
    raise RuntimeError("random source keeps producing weak DES keys")  # pragma: no cover
