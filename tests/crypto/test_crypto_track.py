"""Track encryption under the TDK (protocol §10.3) against track2_tdk_encryption."""

from __future__ import annotations

import pytest
from crypto_vectors import VECTORS, h

from switch.crypto.track import TrackError, decrypt_track, decrypt_track_packed, encrypt_track

V = VECTORS["track2_tdk_encryption"]
TDK = h(V["tdk"])
CASES = [(V["track_odd"], V["track_odd_encrypted"]), (V["track_even"], V["track_even_encrypted"])]


def _packed(encrypted: str) -> bytes:
    return bytes.fromhex(encrypted + "0" * (len(encrypted) % 2))


@pytest.mark.parametrize(("clear", "encrypted"), CASES, ids=["odd", "even"])
def test_encrypt_matches_vector(clear: str, encrypted: str) -> None:
    assert encrypt_track(TDK, clear) == encrypted
    assert len(encrypted) == len(clear)


@pytest.mark.parametrize(("clear", "encrypted"), CASES, ids=["odd", "even"])
def test_encrypt_accepts_d_separator(clear: str, encrypted: str) -> None:
    assert encrypt_track(TDK, clear.replace("=", "D")) == encrypted


@pytest.mark.parametrize(("clear", "encrypted"), CASES, ids=["odd", "even"])
def test_decrypt_matches_vector(clear: str, encrypted: str) -> None:
    assert decrypt_track(TDK, encrypted) == clear
    assert decrypt_track(TDK, encrypted.lower()) == clear
    assert decrypt_track(TDK, encrypted.replace("D", "=")) == clear


@pytest.mark.parametrize(("clear", "encrypted"), CASES, ids=["odd", "even"])
def test_decrypt_packed_matches_vector(clear: str, encrypted: str) -> None:
    assert decrypt_track_packed(TDK, len(encrypted), _packed(encrypted)) == clear


def test_only_the_8_bytes_before_the_last_byte_change() -> None:
    clear, encrypted = CASES[1]  # even: 36 nibbles = 18 bytes; bytes 9..16 change
    assert encrypted[:18] == clear[:18]
    assert encrypted[-2:] == clear[-2:]
    assert encrypted[18:34] != clear.replace("=", "D")[18:34]


@pytest.mark.parametrize("track", ["", "1234567890123456=", "62220293756429=31"])
def test_short_tracks_pass_through(track: str) -> None:
    assert len(track) < 18
    assert encrypt_track(TDK, track) == track
    assert decrypt_track(TDK, track) == track
    assert decrypt_track(TDK, track.replace("=", "D")) == track


def test_18_nibbles_is_the_shortest_encrypted_track() -> None:
    track = "622202937564293168"
    out = encrypt_track(TDK, track)
    assert out != track and out[-2:] == track[-2:]
    assert decrypt_track(TDK, out) == track


def test_short_packed_track_is_unpacked_in_clear() -> None:
    assert decrypt_track_packed(TDK, 5, h("12D450")) == "12=45"


def test_track3_length_round_trip() -> None:
    track = "99" + "6222029375642931684" + "=" + "1" * 80
    assert decrypt_track(TDK, encrypt_track(TDK, track)) == track


def test_wrong_tdk_is_detected() -> None:
    encrypted = CASES[0][1]
    with pytest.raises(TrackError, match="wrong TDK"):
        decrypt_track(h("FFEEDDCCBBAA99887766554433221100"), encrypted)


@pytest.mark.parametrize("track", ["6222029375642931684=3012201123456789X", "12 4"])
def test_bad_characters(track: str) -> None:
    with pytest.raises(TrackError):
        decrypt_track(TDK, track)
    with pytest.raises(TrackError):
        encrypt_track(TDK, track)


def test_encrypt_rejects_hex_nibbles_in_clear_track() -> None:
    with pytest.raises(TrackError):
        encrypt_track(TDK, "6222029375642931684A3012201123456789")


def test_packed_length_mismatch() -> None:
    with pytest.raises(TrackError):
        decrypt_track_packed(TDK, 37, bytes(18))
    with pytest.raises(TrackError):
        decrypt_track_packed(TDK, 36, bytes(19))


def test_tdk_must_be_double_length() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        encrypt_track(TDK[:8], CASES[0][0])
