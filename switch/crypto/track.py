"""Track 2 / track 3 encryption under the TDK (protocol §10.3, ``004`` terminals).

Owns: packing a track as BCD (§3: separator ``=`` is nibble ``D``; an odd nibble count gets a
trailing ``0`` pad nibble), replacing the 8 bytes immediately before the last byte with their
3DES-ECB encryption (or decryption) under the 16-byte TDK, and unpacking back to the same
number of nibbles. Tracks shorter than 18 nibbles are sent in clear and pass through unchanged.

String forms (decided here, used by the simulator and the switch):
- clear form: digits with ``=`` as the separator, exactly what the terminal codec gives for a
  ``z`` field. ``encrypt_track`` also accepts ``D`` for the separator.
- encrypted form: every nibble as an upper-case hex character ``0-9A-F``; a separator nibble
  that is outside the encrypted 8 bytes stays ``D`` (never ``=``). ``decrypt_track`` accepts
  either case and ``=`` in place of ``D``.

On the wire an encrypted track has nibbles A-F, which the terminal codec rejects for a ``z``
field; the switch therefore decodes F35/F36 as raw bytes when F53 digit 3 = ``1`` and calls
:func:`decrypt_track_packed` with the digit count from the length prefix.

Must not log tracks or the TDK (a clear track holds the full PAN), and must not import I/O
(sockets, anyio) or ``switch.pipeline`` / ``switch.adapters``.
"""

from __future__ import annotations

from switch.crypto.des import des_ecb_decrypt, des_ecb_encrypt

__all__ = [
    "MIN_ENCRYPTED_NIBBLES",
    "TrackError",
    "decrypt_track",
    "decrypt_track_packed",
    "encrypt_track",
]

MIN_ENCRYPTED_NIBBLES = 18  # 9 bytes: the 8 encrypted bytes plus the last byte
_CLEAR = frozenset("0123456789D")
_HEX = frozenset("0123456789ABCDEF")


class TrackError(ValueError):
    """A track is malformed, or its decryption does not yield digits and separators."""


def _check_tdk(tdk: bytes) -> None:
    if len(tdk) != 16:
        raise ValueError(f"TDK must be 16 bytes, got {len(tdk)}")


def _pack(nibbles: str) -> bytes:
    return bytes.fromhex(nibbles + "0" * (len(nibbles) % 2))


def _unpack(packed: bytes, nibbles: int) -> str:
    return packed.hex().upper()[:nibbles]


def _to_clear_form(nibbles: str) -> str:
    if not set(nibbles) <= _CLEAR:
        raise TrackError("track does not decrypt to digits and separators (wrong TDK?)")
    return nibbles.replace("D", "=")


def _transform(tdk: bytes, packed: bytes, encrypt: bool) -> bytes:
    middle = packed[-9:-1]
    done = des_ecb_encrypt(tdk, middle) if encrypt else des_ecb_decrypt(tdk, middle)
    return packed[:-9] + done + packed[-1:]


def encrypt_track(tdk: bytes, track: str) -> str:
    """Terminal side: the encrypted form (upper-case hex nibbles) of a clear track."""
    _check_tdk(tdk)
    nibbles = track.replace("=", "D")
    if not set(nibbles) <= _CLEAR:
        raise TrackError("clear track must be digits with '=' (or 'D') separators")
    if len(nibbles) < MIN_ENCRYPTED_NIBBLES:
        return track
    return _unpack(_transform(tdk, _pack(nibbles), encrypt=True), len(nibbles))


def decrypt_track(tdk: bytes, track: str) -> str:
    """The clear form (digits, ``=``) of an encrypted track given as hex nibbles.

    Accepts upper- or lower-case hex and ``=`` for ``D``. A track shorter than 18 nibbles was
    sent in clear and is returned as is (with any ``D`` shown as ``=``).
    """
    _check_tdk(tdk)
    nibbles = track.upper().replace("=", "D")
    if not set(nibbles) <= _HEX:
        raise TrackError("encrypted track must be hex nibbles")
    if len(nibbles) < MIN_ENCRYPTED_NIBBLES:
        return _to_clear_form(nibbles)
    return _to_clear_form(_unpack(_transform(tdk, _pack(nibbles), encrypt=False), len(nibbles)))


def decrypt_track_packed(tdk: bytes, nibbles: int, packed: bytes) -> str:
    """The clear form of a track taken raw from the wire: ``nibbles`` digits packed in ``packed``.

    ``nibbles`` is the LL/LLL length prefix (a digit count); ``packed`` must be exactly
    ``ceil(nibbles / 2)`` bytes. The trailing pad nibble of an odd count is not checked.
    """
    _check_tdk(tdk)
    if nibbles < 0 or len(packed) != (nibbles + 1) // 2:
        raise TrackError(f"{nibbles} nibbles need {(nibbles + 1) // 2} bytes, got {len(packed)}")
    if nibbles < MIN_ENCRYPTED_NIBBLES:
        return _to_clear_form(_unpack(packed, nibbles))
    return _to_clear_form(_unpack(_transform(tdk, packed, encrypt=False), nibbles))
