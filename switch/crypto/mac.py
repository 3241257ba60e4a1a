"""The CUP POS MAC of field 64 (protocol §10.1).

Owns computing and verifying F64 over a MAC block (MAB). The caller extracts the MAB: the
message bytes from the MTI to the end of field 63, with bit 64 already set in the bitmap.

Algorithm: pad the MAB with ``00`` to a multiple of 8; XOR all 8-byte blocks into R; write R as
16 upper-case hex characters H1||H2; E1 = DES(MAK, H1); E2 = DES(MAK, E1 XOR H2);
F64 = the first 8 upper-case hex characters of E2, as ASCII.

Must not log the MAK, and must not import I/O (sockets, anyio) or ``switch.pipeline`` /
``switch.adapters``.
"""

from __future__ import annotations

import hmac
import sys
from dataclasses import dataclass
from functools import reduce
from operator import xor

from switch.crypto.des import BLOCK, des_ecb_encrypt

__all__ = ["MacSteps", "cup_mac", "mac_steps", "verify_mac"]


@dataclass(frozen=True)
class MacSteps:
    """Every intermediate value of the §10.1 MAC, for step-by-step tests against the vectors.

    ``xor`` = R (8 bytes); ``hex_ascii`` = R as 16 upper-case hex ASCII bytes (H1||H2);
    ``e1`` = DES(MAK, H1); ``t`` = E1 XOR H2; ``e2`` = DES(MAK, T); ``f64`` = 8 ASCII bytes.
    """

    xor: bytes
    hex_ascii: bytes
    e1: bytes
    t: bytes
    e2: bytes
    f64: bytes


def _xor_blocks(mab: bytes) -> bytes:
    """XOR of the 8-byte blocks of ``mab`` (zero-padded): one C-level pass over 64-bit words
    (XOR is bytewise, so the words' byte order does not matter as long as it is the same)."""
    padded = mab + bytes(-len(mab) % BLOCK)
    acc = reduce(xor, memoryview(padded).cast("Q"), 0)
    return acc.to_bytes(BLOCK, sys.byteorder)


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ValueError("XOR of blocks of different lengths")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def mac_steps(mak: bytes, mab: bytes) -> MacSteps:
    """Compute the MAC of ``mab`` under the 8-byte (single DES) ``mak``, keeping every step."""
    if len(mak) != 8:
        raise ValueError(f"MAK must be 8 bytes, got {len(mak)}")
    r = _xor_blocks(mab)
    hex_ascii = r.hex().upper().encode("ascii")
    e1 = des_ecb_encrypt(mak, hex_ascii[:BLOCK])
    t = _xor(e1, hex_ascii[BLOCK:])
    e2 = des_ecb_encrypt(mak, t)
    f64 = e2.hex().upper()[:BLOCK].encode("ascii")
    return MacSteps(xor=r, hex_ascii=hex_ascii, e1=e1, t=t, e2=e2, f64=f64)


def cup_mac(mak: bytes, mab: bytes) -> bytes:
    """The 8 ASCII bytes of F64 for ``mab`` under the 8-byte ``mak`` (mac_steps without keeping
    the steps: every request computes one or two of these)."""
    if len(mak) != 8:
        raise ValueError(f"MAK must be 8 bytes, got {len(mak)}")
    hex_ascii = _xor_blocks(mab).hex().upper().encode("ascii")
    e1 = des_ecb_encrypt(mak, hex_ascii[:BLOCK])
    e2 = des_ecb_encrypt(mak, _xor(e1, hex_ascii[BLOCK:]))
    return e2.hex().upper()[:BLOCK].encode("ascii")


def verify_mac(mak: bytes, mab: bytes, f64: bytes) -> bool:
    """True when ``f64`` is the MAC of ``mab`` under ``mak`` (constant-time comparison)."""
    return hmac.compare_digest(cup_mac(mak, mab), bytes(f64))
