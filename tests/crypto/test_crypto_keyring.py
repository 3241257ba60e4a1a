"""MasterKeyring and blob format v2 (switch/crypto/keystore.py): v2 names its key (bound into the
associated data), the ring unwraps across rotations, v1 blobs stay readable, a blob under a key
the ring does not hold makes it re-read the data directory's key files (rate-limited), keys from
the environment, the key files of a rotation (install_new_key, read_key_files) and their checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from switch.crypto.keystore import (
    ENV_VAR,
    KEY_FILE,
    OLD_ENV_VAR,
    OLD_KEY_FILE_PREFIX,
    MasterKey,
    MasterKeyError,
    MasterKeyring,
    UnknownMasterKeyError,
    blob_key_id,
    install_new_key,
    read_key_files,
)

HEX_A = "00112233445566778899AABBCCDDEEFF" * 2
HEX_B = "FFEEDDCCBBAA99887766554433221100" * 2
HEX_C = "0F1E2D3C4B5A69788796A5B4C3D2E1F0" * 2
TMK = bytes.fromhex("E54E7BCB2078DE2AF51B9DA88AB5B395")
CTX = "tmk:10000001"


@pytest.fixture
def a() -> MasterKey:
    return MasterKey.from_hex(HEX_A)


@pytest.fixture
def b() -> MasterKey:
    return MasterKey.from_hex(HEX_B)


@pytest.fixture
def c() -> MasterKey:
    return MasterKey.from_hex(HEX_C)


def key_dir(tmp_path: Path, current: str, *old: str) -> Path:
    """A data directory holding ``current`` as master.key and each of ``old`` as old key files."""
    (tmp_path / KEY_FILE).write_text(current + "\n")
    (tmp_path / KEY_FILE).chmod(0o600)
    for hex64 in old:
        path = tmp_path / (OLD_KEY_FILE_PREFIX + MasterKey.from_hex(hex64).key_id)
        path.write_text(hex64 + "\n")
        path.chmod(0o600)
    return tmp_path


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- format v2 ------------------------------------------------------------------------------
def test_v2_blob_names_its_key(a: MasterKey) -> None:
    blob = MasterKeyring(a).wrap(TMK, CTX)
    assert blob[0] == 2
    assert blob[1:5] == bytes.fromhex(a.key_id)
    assert blob_key_id(blob) == a.key_id
    assert len(blob) == 1 + 4 + 12 + len(TMK) + 16
    assert TMK not in blob


def test_v1_blob_has_no_key_id_and_other_versions_are_rejected(a: MasterKey) -> None:
    assert blob_key_id(a.wrap(TMK, CTX)) is None
    with pytest.raises(MasterKeyError, match="version"):
        blob_key_id(b"\x03" + a.wrap(TMK, CTX)[1:])
    with pytest.raises(MasterKeyError, match="version"):
        MasterKeyring(a).unwrap(b"\x03" + a.wrap(TMK, CTX)[1:], CTX)
    with pytest.raises(MasterKeyError, match="version"):
        a.wrap(TMK, CTX, version=3)


def test_master_key_unwraps_its_own_v2_and_names_a_foreign_one(a: MasterKey, b: MasterKey) -> None:
    assert a.unwrap(a.wrap(TMK, CTX, version=2), CTX) == TMK
    with pytest.raises(UnknownMasterKeyError) as err:
        a.unwrap(b.wrap(TMK, CTX, version=2), CTX)
    assert err.value.key_id == b.key_id


@pytest.mark.parametrize("index", [5, 16, 17, -1], ids=["nonce0", "nonce11", "ct0", "tag"])
def test_v2_tamper_detected(a: MasterKey, index: int) -> None:
    ring = MasterKeyring(a)
    blob = bytearray(ring.wrap(TMK, CTX))
    blob[index] ^= 0x01
    with pytest.raises(MasterKeyError, match="does not unwrap"):
        ring.unwrap(bytes(blob), CTX)


def test_relabelled_blobs_do_not_unwrap(a: MasterKey, b: MasterKey) -> None:
    """Relabelling a blob with another loaded key's id does not make that key accept it."""
    ring = MasterKeyring(a, [b])
    blob = ring.wrap(TMK, CTX)
    relabelled = blob[:1] + bytes.fromhex(b.key_id) + blob[5:]
    with pytest.raises(MasterKeyError, match="does not unwrap"):
        ring.unwrap(relabelled, CTX)
    # and a v2 blob re-labelled as v1 does not unwrap either (version is in the AAD)
    forged_v1 = b"\x01" + blob[5:]
    with pytest.raises(MasterKeyError, match="does not unwrap"):
        ring.unwrap(forged_v1, CTX)


def test_v2_wrong_context_and_truncation(a: MasterKey) -> None:
    ring = MasterKeyring(a)
    blob = ring.wrap(TMK, CTX)
    with pytest.raises(MasterKeyError, match="does not unwrap"):
        ring.unwrap(blob, "tmk:10000002")
    with pytest.raises(MasterKeyError, match="too short"):
        ring.unwrap(ring.wrap(b"", "x")[:-1], "x")


# ---- the ring across rotations --------------------------------------------------------------
def test_ring_unwraps_across_rotations(a: MasterKey, b: MasterKey, c: MasterKey) -> None:
    ring_a = MasterKeyring(a)
    under_a = ring_a.wrap(TMK, CTX)
    ring_b = MasterKeyring(b, [a])
    under_b = ring_b.wrap(TMK, CTX)
    assert blob_key_id(under_b) == b.key_id and ring_b.key_id == b.key_id
    assert ring_b.unwrap(under_a, CTX) == TMK
    ring_c = MasterKeyring(c, [b, a])
    assert ring_c.key_ids == (c.key_id, b.key_id, a.key_id)
    assert [ring_c.unwrap(x, CTX) for x in (under_a, under_b, ring_c.wrap(TMK, CTX))] == [TMK] * 3
    assert blob_key_id(ring_c.wrap(TMK, CTX)) == c.key_id
    # a ring that dropped a key cannot read its blobs (and says which key it needs)
    with pytest.raises(UnknownMasterKeyError, match=a.key_id):
        MasterKeyring(c, [b]).unwrap(under_a, CTX)


def test_v1_blobs_stay_readable(a: MasterKey, b: MasterKey, c: MasterKey) -> None:
    v1_old = a.wrap(TMK, CTX)  # written by a bare MasterKey before the keyring existed
    v1_new = b.wrap(TMK, CTX)  # written by a process still on a bare MasterKey after rotation
    ring = MasterKeyring(b, [a])
    assert ring.unwrap(v1_old, CTX) == TMK
    assert ring.unwrap(v1_new, CTX) == TMK
    with pytest.raises(MasterKeyError, match="does not unwrap under any loaded master key"):
        ring.unwrap(c.wrap(TMK, CTX), CTX)
    with pytest.raises(MasterKeyError, match="does not unwrap"):
        ring.unwrap(v1_old, "tmk:10000002")


def test_use_current_switches_the_wrapping_key(a: MasterKey, b: MasterKey, c: MasterKey) -> None:
    ring = MasterKeyring(a, [b])
    ring.use_current(b.key_id)
    assert ring.key_id == b.key_id
    assert blob_key_id(ring.wrap(TMK, CTX)) == b.key_id
    with pytest.raises(UnknownMasterKeyError):
        ring.use_current(c.key_id)
    assert ring.key_id == b.key_id


def test_repr_shows_ids_only(a: MasterKey, b: MasterKey) -> None:
    text = repr(MasterKeyring(a, [b]))
    assert a.key_id in text and b.key_id in text
    for secret in (HEX_A, HEX_B):
        assert secret.lower() not in text.lower()
        assert secret.lower()[:16] not in text.lower()


# ---- reloading from the data directory ------------------------------------------------------
def test_unknown_key_id_triggers_a_reload_from_the_data_dir(tmp_path: Path, a: MasterKey) -> None:
    data = key_dir(tmp_path, HEX_A)
    ring = MasterKeyring.load({}, data, reload_interval=0)
    assert ring.key_ids == (a.key_id,)
    old, new = install_new_key(data)  # another process rotates
    assert old.key_id == a.key_id
    blob = MasterKeyring(new).wrap(TMK, CTX)
    assert ring.unwrap(blob, CTX) == TMK
    assert new.key_id in ring
    assert ring.key_id == a.key_id  # a reload never changes the wrapping key by itself
    ring.use_current(new.key_id)
    assert blob_key_id(ring.wrap(TMK, CTX)) == new.key_id


def test_reload_is_rate_limited(tmp_path: Path) -> None:
    data = key_dir(tmp_path, HEX_A)
    clock = FakeClock()
    ring = MasterKeyring.load({}, data, reload_interval=10.0, clock=clock)
    _, b = install_new_key(data)
    assert ring.unwrap(MasterKeyring(b).wrap(TMK, CTX), CTX) == TMK  # first reload: at once
    _, c = install_new_key(data)
    under_c = MasterKeyring(c).wrap(TMK, CTX)
    with pytest.raises(UnknownMasterKeyError):
        ring.unwrap(under_c, CTX)  # within 10 s of the last reload: no file reads
    clock.now += 10.0
    assert ring.unwrap(under_c, CTX) == TMK


def test_unknown_v1_blob_also_reloads(tmp_path: Path) -> None:
    data = key_dir(tmp_path, HEX_A)
    ring = MasterKeyring.load({}, data, reload_interval=0)
    _, new = install_new_key(data)
    assert ring.unwrap(new.wrap(TMK, CTX), CTX) == TMK  # v1 from a bare-MasterKey process


def test_a_ring_without_a_data_dir_never_reloads(a: MasterKey, b: MasterKey) -> None:
    ring = MasterKeyring(a)
    assert ring.reload() is False
    with pytest.raises(UnknownMasterKeyError):
        ring.unwrap(MasterKeyring(b).wrap(TMK, CTX), CTX)


def test_load_from_files_with_old_keys(tmp_path: Path, a: MasterKey, b: MasterKey, c: MasterKey) -> None:
    data = key_dir(tmp_path, HEX_C, HEX_A, HEX_B)
    ring = MasterKeyring.load({}, data)
    assert ring.key_id == c.key_id
    assert set(ring.key_ids) == {a.key_id, b.key_id, c.key_id}
    assert ring.unwrap(MasterKeyring(a).wrap(TMK, CTX), CTX) == TMK


def test_load_from_env_with_old_keys(tmp_path: Path, a: MasterKey, b: MasterKey, c: MasterKey) -> None:
    data = key_dir(tmp_path, HEX_A)  # ignored: the environment wins
    ring = MasterKeyring.load({ENV_VAR: HEX_C, OLD_ENV_VAR: f" {HEX_A} ,{HEX_B},"}, data)
    assert ring.key_id == c.key_id
    assert set(ring.key_ids) == {a.key_id, b.key_id, c.key_id}
    assert ring.reload() is False


def test_bad_old_key_in_env_is_named_not_shown(tmp_path: Path) -> None:
    bad = "zz" * 32
    with pytest.raises(MasterKeyError, match=f"key #2 of environment variable {OLD_ENV_VAR}") as err:
        MasterKeyring.load({ENV_VAR: HEX_C, OLD_ENV_VAR: f"{HEX_A},{bad}"}, tmp_path)
    assert bad not in str(err.value) and HEX_A not in str(err.value)


def test_misnamed_old_key_file_is_refused(tmp_path: Path, b: MasterKey) -> None:
    data = key_dir(tmp_path, HEX_A)
    wrong = data / (OLD_KEY_FILE_PREFIX + "deadbeef")
    wrong.write_text(HEX_B)
    wrong.chmod(0o600)
    with pytest.raises(MasterKeyError, match=f"holds master key {b.key_id}"):
        MasterKeyring.load({}, data)


def test_old_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    data = key_dir(tmp_path, HEX_A, HEX_B)
    (data / (OLD_KEY_FILE_PREFIX + MasterKey.from_hex(HEX_B).key_id)).chmod(0o644)
    with pytest.raises(MasterKeyError, match="chmod 600"):
        MasterKeyring.load({}, data)


def test_old_file_of_the_current_key_is_tolerated(tmp_path: Path, a: MasterKey) -> None:
    data = key_dir(tmp_path, HEX_A, HEX_A)  # a rotation that died before its rename
    current, old = read_key_files(data)
    assert current.key_id == a.key_id and old == []


# ---- install_new_key --------------------------------------------------------------------------
def test_install_new_key_keeps_the_old_one(tmp_path: Path, a: MasterKey) -> None:
    data = key_dir(tmp_path, HEX_A)
    (data / "master.key.new").write_text("left by a crashed rotation")
    old, new = install_new_key(data)
    assert old.key_id == a.key_id and new.key_id != a.key_id
    kept = data / (OLD_KEY_FILE_PREFIX + a.key_id)
    assert kept.stat().st_mode & 0o777 == 0o600
    assert MasterKey.from_file(kept).key_id == a.key_id
    assert (data / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert MasterKey.from_file(data / KEY_FILE).key_id == new.key_id
    assert not (data / "master.key.new").exists()
    # a second rotation keeps both previous keys
    _, newer = install_new_key(data)
    current, olds = read_key_files(data)
    assert current.key_id == newer.key_id
    assert {k.key_id for k in olds} == {a.key_id, new.key_id}


def test_install_new_key_refuses_a_kept_file_with_another_key(tmp_path: Path, a: MasterKey) -> None:
    data = key_dir(tmp_path, HEX_A)
    clash = data / (OLD_KEY_FILE_PREFIX + a.key_id)
    clash.write_text(HEX_B)
    clash.chmod(0o600)
    with pytest.raises(MasterKeyError, match="does not hold"):
        install_new_key(data)
    assert MasterKey.from_file(data / KEY_FILE).key_id == a.key_id  # nothing replaced
