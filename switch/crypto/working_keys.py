"""Working keys issued at sign-on and the field 62 layouts that carry them (protocol §8).

Owns: generating a fresh PIK / MAK / TDK set for a sign-on mode (``001`` / ``003`` / ``004``),
building the sign-on response F62 (each key ECB-encrypted under the 16-byte TMK, followed by the
check value of the CLEAR key), and parsing it back on the terminal side (POS simulator) with
check-value verification.

Layouts (the golden vector ``sign_on_response_004`` is the truth)::

    001 (24): PIK(8)  CV(4) MAK(8)          CV(4)
    003 (40): PIK(16) CV(4) MAK(8) 00 x 8   CV(4)
    004 (60): as 003, then TDK(16) CV(4)

The eight ``00`` bytes after the MAK are clear zeros on the wire (not encrypted zeros).

Must not log or show key bytes (``WorkingKeys.__repr__`` shows lengths and check values only),
and must not import I/O (sockets, anyio) or ``switch.pipeline`` / ``switch.adapters``.
"""

from __future__ import annotations

from dataclasses import dataclass

from switch.crypto.des import check_value, des_ecb_decrypt, des_ecb_encrypt, generate_key

__all__ = [
    "F62_LENGTHS",
    "KEY_MODES",
    "KeyCheckError",
    "WorkingKeys",
    "build_f62",
    "generate_working_keys",
    "parse_f62",
    "pik_length",
]

KEY_MODES = {"001", "003", "004"}
F62_LENGTHS = {"001": 24, "003": 40, "004": 60}
_CV = 4
_MAK_FILL = bytes(8)


class KeyCheckError(ValueError):
    """F62 has the wrong length for its mode, a wrong check value, or a non-zero MAK fill."""


@dataclass(frozen=True, repr=False)
class WorkingKeys:
    """Clear working keys of one sign-on: PIK (8 or 16 bytes), MAK (8), TDK (16, mode 004 only)."""

    pik: bytes
    mak: bytes
    tdk: bytes | None = None

    def __post_init__(self) -> None:
        if len(self.pik) not in (8, 16):
            raise ValueError(f"PIK must be 8 or 16 bytes, got {len(self.pik)}")
        if len(self.mak) != 8:
            raise ValueError(f"MAK must be 8 bytes, got {len(self.mak)}")
        if self.tdk is not None and len(self.tdk) != 16:
            raise ValueError(f"TDK must be 16 bytes, got {len(self.tdk)}")

    def __repr__(self) -> str:
        def show(key: bytes | None) -> str:
            if key is None:
                return "None"
            return f"<{len(key)} bytes cv={check_value(key).hex().upper()}>"

        return f"WorkingKeys(pik={show(self.pik)}, mak={show(self.mak)}, tdk={show(self.tdk)})"

    __str__ = __repr__


def _check_mode(mode: str) -> None:
    if mode not in KEY_MODES:
        raise ValueError(f"unknown key mode {mode!r}; expected one of {sorted(KEY_MODES)}")


def _check_tmk(tmk: bytes) -> None:
    if len(tmk) != 16:
        raise ValueError(f"TMK must be 16 bytes, got {len(tmk)}")


def pik_length(mode: str) -> int:
    """PIK length for a sign-on mode: 8 for ``001`` (single DES), else 16."""
    _check_mode(mode)
    return 8 if mode == "001" else 16


def generate_working_keys(mode: str) -> WorkingKeys:
    """Fresh random keys for a sign-on in ``mode`` (``001`` / ``003`` / ``004``)."""
    _check_mode(mode)
    return WorkingKeys(
        pik=generate_key(pik_length(mode)),
        mak=generate_key(8),
        tdk=generate_key(16) if mode == "004" else None,
    )


def _check_keys_fit_mode(mode: str, keys: WorkingKeys) -> None:
    if len(keys.pik) != pik_length(mode):
        raise ValueError(f"mode {mode} needs a {pik_length(mode)}-byte PIK, got {len(keys.pik)}")
    if mode == "004" and keys.tdk is None:
        raise ValueError("mode 004 needs a TDK")
    if mode != "004" and keys.tdk is not None:
        raise ValueError(f"mode {mode} carries no TDK")


def build_f62(tmk: bytes, mode: str, keys: WorkingKeys) -> bytes:
    """The sign-on response F62 for ``mode``: keys encrypted under ``tmk``, each + clear-key CV."""
    _check_mode(mode)
    _check_tmk(tmk)
    _check_keys_fit_mode(mode, keys)
    out = bytearray()
    out += des_ecb_encrypt(tmk, keys.pik) + check_value(keys.pik)
    out += des_ecb_encrypt(tmk, keys.mak)
    if mode != "001":
        out += _MAK_FILL
    out += check_value(keys.mak)
    if keys.tdk is not None:
        out += des_ecb_encrypt(tmk, keys.tdk) + check_value(keys.tdk)
    assert len(out) == F62_LENGTHS[mode]
    return bytes(out)


def _take(f62: bytes, pos: int, n: int) -> tuple[bytes, int]:
    return f62[pos : pos + n], pos + n


def _decrypt_checked(tmk: bytes, name: str, enc: bytes, cv: bytes) -> bytes:
    clear = des_ecb_decrypt(tmk, enc)
    if check_value(clear) != cv:
        raise KeyCheckError(f"{name} check value mismatch")
    return clear


def parse_f62(tmk: bytes, mode: str, f62: bytes) -> WorkingKeys:
    """Terminal side: decrypt F62 under ``tmk`` and verify every check value.

    Raises :class:`KeyCheckError` on a wrong length, a check value mismatch, or a MAK fill that
    is not eight zero bytes.
    """
    _check_mode(mode)
    _check_tmk(tmk)
    if len(f62) != F62_LENGTHS[mode]:
        raise KeyCheckError(
            f"F62 for mode {mode} must be {F62_LENGTHS[mode]} bytes, got {len(f62)}"
        )
    pos = 0
    enc, pos = _take(f62, pos, pik_length(mode))
    cv, pos = _take(f62, pos, _CV)
    pik = _decrypt_checked(tmk, "PIK", enc, cv)
    enc, pos = _take(f62, pos, 8)
    if mode != "001":
        fill, pos = _take(f62, pos, 8)
        if fill != _MAK_FILL:
            raise KeyCheckError("MAK must be followed by eight zero bytes")
    cv, pos = _take(f62, pos, _CV)
    mak = _decrypt_checked(tmk, "MAK", enc, cv)
    tdk: bytes | None = None
    if mode == "004":
        enc, pos = _take(f62, pos, 16)
        cv, pos = _take(f62, pos, _CV)
        tdk = _decrypt_checked(tmk, "TDK", enc, cv)
    return WorkingKeys(pik=pik, mak=mak, tdk=tdk)
