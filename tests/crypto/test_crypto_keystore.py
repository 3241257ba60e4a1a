"""Master key loading (env vs file, permissions) and AES-256-GCM wrapping of keys at rest."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from switch.crypto.keystore import ENV_VAR, MasterKey, MasterKeyError

HEX_A = "00112233445566778899AABBCCDDEEFF" * 2
HEX_B = "FFEEDDCCBBAA99887766554433221100" * 2
TMK = bytes.fromhex("E54E7BCB2078DE2AF51B9DA88AB5B395")


@pytest.fixture
def master() -> MasterKey:
    return MasterKey.from_hex(HEX_A)


def _key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "master.key"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_wrap_unwrap_round_trip(master: MasterKey) -> None:
    blob = master.wrap(TMK, "tmk:10000001")
    assert master.unwrap(blob, "tmk:10000001") == TMK


def test_blob_format(master: MasterKey) -> None:
    blob = master.wrap(TMK, "tmk:10000001")
    assert blob[0] == 1
    assert len(blob) == 1 + 12 + len(TMK) + 16
    assert TMK not in blob


def test_nonce_is_fresh_per_wrap(master: MasterKey) -> None:
    blobs = {master.wrap(TMK, "tmk:10000001") for _ in range(10)}
    assert len(blobs) == 10
    assert len({b[1:13] for b in blobs}) == 10


@pytest.mark.parametrize("index", [1, 12, 13, 20, -1], ids=["nonce0", "nonce11", "ct0", "ct7", "tag"])
def test_tamper_detected(master: MasterKey, index: int) -> None:
    blob = bytearray(master.wrap(TMK, "tmk:10000001"))
    blob[index] ^= 0x01
    with pytest.raises(MasterKeyError, match="does not unwrap"):
        master.unwrap(bytes(blob), "tmk:10000001")


def test_unknown_version_rejected(master: MasterKey) -> None:
    blob = b"\x02" + master.wrap(TMK, "tmk:10000001")[1:]
    with pytest.raises(MasterKeyError, match="version"):
        master.unwrap(blob, "tmk:10000001")


def test_truncated_blob_rejected(master: MasterKey) -> None:
    with pytest.raises(MasterKeyError, match="too short"):
        master.unwrap(master.wrap(b"", "x")[:-1], "x")


def test_wrong_context_rejected(master: MasterKey) -> None:
    blob = master.wrap(TMK, "tmk:10000001")
    with pytest.raises(MasterKeyError):
        master.unwrap(blob, "tmk:10000002")
    with pytest.raises(MasterKeyError):
        master.unwrap(blob, "zpk:10000001")


def test_wrong_master_key_rejected(master: MasterKey) -> None:
    other = MasterKey.from_hex(HEX_B)
    assert other.key_id != master.key_id
    with pytest.raises(MasterKeyError, match=other.key_id):
        other.unwrap(master.wrap(TMK, "tmk:10000001"), "tmk:10000001")


def test_key_id_and_repr(master: MasterKey) -> None:
    assert master.key_id == hashlib.sha256(bytes.fromhex(HEX_A)).digest()[:4].hex()
    assert len(master.key_id) == 8
    for text in (repr(master), str(master)):
        assert master.key_id in text
        assert HEX_A.lower() not in text.lower()
        assert HEX_A[:16].lower() not in text.lower()


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "empty"), ("   \n", "empty"), (HEX_A[:-2], "64 hex"), (HEX_A + "00", "64 hex"),
     ("G" + HEX_A[1:], "not hex")],
)
def test_from_hex_errors(text: str, reason: str) -> None:
    with pytest.raises(MasterKeyError, match=reason) as err:
        MasterKey.from_hex(text)
    if len(text) > 8:
        assert text.strip()[:16] not in str(err.value)


def test_from_hex_ignores_surrounding_whitespace() -> None:
    assert MasterKey.from_hex(f"  {HEX_A.lower()}\n").key_id == MasterKey.from_hex(HEX_A).key_id


def test_env_wins_over_file(tmp_path: Path) -> None:
    path = _key_file(tmp_path, HEX_B)
    key = MasterKey.load({ENV_VAR: HEX_A}, path)
    assert key.key_id == MasterKey.from_hex(HEX_A).key_id


def test_file_used_without_env(tmp_path: Path) -> None:
    path = _key_file(tmp_path, HEX_B + "\n")
    assert MasterKey.load({"OTHER": HEX_A}, path).key_id == MasterKey.from_hex(HEX_B).key_id


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(MasterKeyError, match=f"{ENV_VAR} is not hex"):
        MasterKey.load({ENV_VAR: "Z" * 64}, _key_file(tmp_path, HEX_B))


def test_nothing_configured() -> None:
    with pytest.raises(MasterKeyError, match="no master key"):
        MasterKey.load({}, None)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MasterKeyError, match="missing"):
        MasterKey.load({}, tmp_path / "nope.key")


def test_unreadable_file(tmp_path: Path) -> None:
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(MasterKeyError, match="unreadable"):
        MasterKey.load({}, directory)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o610])
def test_file_open_to_group_or_others_refused(tmp_path: Path, mode: int) -> None:
    path = _key_file(tmp_path, HEX_A, mode)
    with pytest.raises(MasterKeyError, match=f"{mode:04o}.*group or others"):
        MasterKey.load({}, path)


def test_file_with_bad_content(tmp_path: Path) -> None:
    with pytest.raises(MasterKeyError, match="master key file .* must be 64 hex"):
        MasterKey.load({}, _key_file(tmp_path, "abc"))


def test_create_file(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    created = MasterKey.create_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = MasterKey.load({}, path)
    assert loaded.key_id == created.key_id
    assert loaded.unwrap(created.wrap(TMK, "tmk:1"), "tmk:1") == TMK


def test_create_file_ignores_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "new.key"
        MasterKey.create_file(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_create_file_keys_are_random(tmp_path: Path) -> None:
    a = MasterKey.create_file(tmp_path / "a.key")
    b = MasterKey.create_file(tmp_path / "b.key")
    assert a.key_id != b.key_id


def test_create_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = _key_file(tmp_path, HEX_A)
    with pytest.raises(MasterKeyError, match="already exists"):
        MasterKey.create_file(path)
    assert path.read_text() == HEX_A


def test_create_file_in_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(MasterKeyError, match="cannot create"):
        MasterKey.create_file(tmp_path / "no" / "such" / "master.key")
