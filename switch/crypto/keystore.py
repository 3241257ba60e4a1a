"""Keys at rest: the switch master key(s) and AES-256-GCM wrapping of stored keys (TMKs, ZPKs).

Owns loading the 32-byte master key (env ``SWITCH_MASTER_KEY`` first, else a key file that must
not be accessible to group or others), creating a new key file (mode 0600, never overwriting),
wrapping / unwrapping key material bound to a context string (e.g. ``"tmk:10000001"``), so a
wrapped key copied to another row does not unwrap, the :class:`MasterKeyring` (the current key
plus the previous ones, for rotation without downtime) and the key files of a rotation
(``master.key`` and ``master.key.old.<id>``).

Blob formats (``key id`` = first 4 bytes of SHA-256 of the master key):

* v1: ``0x01 || nonce(12) || ciphertext || tag(16)``, associated data ``0x01 || context``.
  Written by a bare :class:`MasterKey`; the blob does not say which master key wrapped it.
* v2: ``0x02 || key id(4) || nonce(12) || ciphertext || tag(16)``, associated data
  ``0x02 || key id || context``. Written by :class:`MasterKeyring`: the blob names its key, so
  the ring picks the right one, and meeting an id it does not hold makes it re-read the key files.

Must not log, print or put the master key or any unwrapped key into a message or ``repr``
(``key_id`` identifies a key instead), and must not import I/O frameworks (sockets, anyio) or
``switch.pipeline`` / ``switch.adapters``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "ENV_VAR", "KEY_FILE", "OLD_ENV_VAR", "OLD_KEY_FILE_PREFIX", "KeyWrapper", "MasterKey",
    "MasterKeyError", "MasterKeyring", "UnknownMasterKeyError", "blob_key_id", "install_new_key",
]

ENV_VAR = "SWITCH_MASTER_KEY"
OLD_ENV_VAR = "SWITCH_MASTER_KEY_OLD"  # previous keys, comma-separated hex (unwrap only)
KEY_FILE = "master.key"
OLD_KEY_FILE_PREFIX = "master.key.old."  # + key id: a previous key kept after a rotation
_NEW_KEY_FILE = "master.key.new"  # a rotation's next key before it becomes master.key
_KEY_BYTES = 32
_VERSION = b"\x01"
_VERSION_2 = b"\x02"
_KEY_ID = 4
_NONCE = 12
_TAG = 16


class MasterKeyError(RuntimeError):
    """The master key is missing, unreadable, malformed, unsafe, or a blob does not unwrap."""


class UnknownMasterKeyError(MasterKeyError):
    """A v2 blob names a master key that is not loaded (``key_id`` says which)."""

    def __init__(self, message: str, key_id: str) -> None:
        super().__init__(message)
        self.key_id = key_id


class KeyWrapper(Protocol):
    """What the store needs from its master key: :class:`MasterKey` and :class:`MasterKeyring`."""

    @property
    def key_id(self) -> str: ...

    def wrap(self, plaintext: bytes, context: str) -> bytes: ...

    def unwrap(self, blob: bytes, context: str) -> bytes: ...


def blob_key_id(blob: bytes) -> str | None:
    """The id of the master key a v2 blob was wrapped under; ``None`` for a v1 blob (which does
    not say). :class:`MasterKeyError` for anything else."""
    if blob[:1] == _VERSION:
        return None
    if blob[:1] == _VERSION_2 and len(blob) >= 1 + _KEY_ID:
        return blob[1 : 1 + _KEY_ID].hex()
    raise MasterKeyError("wrapped key has unknown format version")


class MasterKey:
    """The 32-byte AES-256 master key. ``repr`` shows only ``key_id``."""

    __slots__ = ("_aead", "_id", "_key", "key_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != _KEY_BYTES:
            raise MasterKeyError(f"master key must be {_KEY_BYTES} bytes, got {len(key)}")
        self._key = bytes(key)
        self._aead = AESGCM(self._key)
        self._id = hashlib.sha256(self._key).digest()[:_KEY_ID]
        self.key_id: str = self._id.hex()

    def __repr__(self) -> str:
        return f"MasterKey(key_id={self.key_id})"

    __str__ = __repr__

    @classmethod
    def from_hex(cls, hex64: str, source: str = "master key") -> MasterKey:
        """Parse 64 hex characters (surrounding whitespace ignored). ``source`` names the origin
        in error messages (never the value)."""
        text = hex64.strip()
        if not text:
            raise MasterKeyError(f"{source} is empty")
        if len(text) != 2 * _KEY_BYTES:
            raise MasterKeyError(
                f"{source} must be {2 * _KEY_BYTES} hex characters, got {len(text)}"
            )
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise MasterKeyError(f"{source} is not hex") from None
        return cls(key)

    @classmethod
    def load(cls, env: Mapping[str, str], key_file: Path | None) -> MasterKey:
        """Env ``SWITCH_MASTER_KEY`` if set, else ``key_file`` (0600 or stricter), else an error."""
        if ENV_VAR in env:
            return cls.from_hex(env[ENV_VAR], source=f"environment variable {ENV_VAR}")
        if key_file is None:
            raise MasterKeyError(f"no master key: set {ENV_VAR} or configure a master key file")
        return cls.from_file(key_file)

    @classmethod
    def from_file(cls, key_file: Path) -> MasterKey:
        """A key file: 64 hex characters, a regular file not accessible to group or others."""
        try:
            st = key_file.stat()
        except FileNotFoundError:
            raise MasterKeyError(f"master key file {key_file} is missing") from None
        except OSError as exc:
            raise MasterKeyError(
                f"master key file {key_file} is unreadable: {exc.strerror}"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise MasterKeyError(f"master key file {key_file} is unreadable: not a regular file")
        if st.st_mode & 0o077:
            raise MasterKeyError(
                f"master key file {key_file} has mode {stat.S_IMODE(st.st_mode):04o}; "
                "it must not be accessible to group or others (chmod 600)"
            )
        try:
            text = key_file.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
            raise MasterKeyError(f"master key file {key_file} is unreadable: {reason}") from None
        return cls.from_hex(text, source=f"master key file {key_file}")

    @classmethod
    def create_file(cls, path: Path) -> MasterKey:
        """Write a new random key to ``path`` (mode 0600). Refuses to overwrite an existing file."""
        key = cls(secrets.token_bytes(_KEY_BYTES))
        key._write_new_file(path)
        return key

    def _write_new_file(self, path: Path) -> None:
        """This key as a new 0600 file (``O_EXCL``: never overwrites), fsynced."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise MasterKeyError(f"master key file {path} already exists; not overwriting") from None
        except OSError as exc:
            raise MasterKeyError(f"cannot create master key file {path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (self._key.hex() + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _aad(self, context: str) -> bytes:
        return _VERSION + context.encode("utf-8")

    def _aad_v2(self, context: str) -> bytes:
        return _VERSION_2 + self._id + context.encode("utf-8")

    def wrap(self, plaintext: bytes, context: str, *, version: int = 1) -> bytes:
        """Encrypt ``plaintext`` bound to ``context``: v1 ``0x01 || nonce || ciphertext || tag``
        (the default, kept for existing callers) or v2 ``0x02 || key id || nonce || ...``."""
        nonce = os.urandom(_NONCE)  # what secrets.token_bytes does, without its two extra calls
        if version == 2:
            return _VERSION_2 + self._id + nonce + self._aead.encrypt(
                nonce, plaintext, self._aad_v2(context)
            )
        if version != 1:
            raise MasterKeyError(f"unknown wrap format version {version}")
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, self._aad(context))

    def unwrap(self, blob: bytes, context: str) -> bytes:
        """Decrypt a :meth:`wrap` blob (v1, or v2 naming this key); :class:`MasterKeyError` on
        tamper, wrong context or key (:class:`UnknownMasterKeyError` when a v2 blob names
        another key)."""
        if blob[:1] == _VERSION_2:
            if len(blob) < 1 + _KEY_ID + _NONCE + _TAG:
                raise MasterKeyError(f"wrapped key for {context!r} is too short")
            key_id = blob[1 : 1 + _KEY_ID]
            if key_id != self._id:
                raise UnknownMasterKeyError(
                    f"wrapped key for {context!r} is format version 2 under master key "
                    f"{key_id.hex()}, not master key {self.key_id}",
                    key_id.hex(),
                )
            start = 1 + _KEY_ID
            aad = self._aad_v2(context)
        else:
            if len(blob) < 1 + _NONCE + _TAG:
                raise MasterKeyError(f"wrapped key for {context!r} is too short")
            if blob[:1] != _VERSION:
                raise MasterKeyError(f"wrapped key for {context!r} has unknown format version")
            start = 1
            aad = self._aad(context)
        nonce, body = blob[start : start + _NONCE], blob[start + _NONCE :]
        try:
            return self._aead.decrypt(nonce, body, aad)
        except InvalidTag:
            raise MasterKeyError(
                f"wrapped key for {context!r} does not unwrap under master key {self.key_id} "
                "(tampered, wrong context, or wrong master key)"
            ) from None


class MasterKeyring:
    """The current master key (every new wrap, format v2) and the previous ones (unwrap only).

    Same ``wrap`` / ``unwrap`` / ``key_id`` interface as :class:`MasterKey`, so the store takes
    either. A ring loaded from a data directory re-reads its key files when a blob names a key it
    does not hold (a rotation by another process installed it), at most once per
    ``reload_interval`` seconds; a reload only adds keys, it never changes the current one (see
    :meth:`use_current`). Keys are never dropped. Thread-safe: the key table is replaced, never
    mutated, under a lock.
    """

    __slots__ = ("_clock", "_current", "_data_dir", "_keys", "_last_reload", "_lock",
                 "_reload_interval")

    def __init__(
        self,
        current: MasterKey,
        old: Iterable[MasterKey] = (),
        *,
        data_dir: Path | None = None,
        reload_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        keys = {current.key_id: current}
        for k in old:
            keys.setdefault(k.key_id, k)
        self._current = current
        self._keys: dict[str, MasterKey] = keys
        self._data_dir = None if data_dir is None else Path(data_dir)
        self._reload_interval = reload_interval
        self._clock = clock
        self._last_reload: float | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        old = ",".join(k for k in self._keys if k != self._current.key_id)
        return f"MasterKeyring(key_id={self.key_id}, old=[{old}])"

    __str__ = __repr__

    # ---- loading --------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        env: Mapping[str, str],
        data_dir: Path,
        *,
        reload_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> MasterKeyring:
        """Env ``SWITCH_MASTER_KEY`` (+ ``SWITCH_MASTER_KEY_OLD``, comma-separated hex) if set —
        such a ring never reloads — else ``data_dir/master.key`` plus every
        ``data_dir/master.key.old.<id>``."""
        if ENV_VAR in env:
            current = MasterKey.from_hex(env[ENV_VAR], source=f"environment variable {ENV_VAR}")
            old = [
                MasterKey.from_hex(part, source=f"key #{i + 1} of environment variable {OLD_ENV_VAR}")
                for i, part in enumerate(env.get(OLD_ENV_VAR, "").split(","))
                if part.strip()
            ]
            return cls(current, old, reload_interval=reload_interval, clock=clock)
        current, old = read_key_files(Path(data_dir))
        return cls(current, old, data_dir=data_dir, reload_interval=reload_interval, clock=clock)

    # ---- the MasterKey interface ----------------------------------------------------------
    @property
    def key_id(self) -> str:
        """The current key's id (the one new wraps use)."""
        return self._current.key_id

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every loaded key's id, the current one first."""
        return (self.key_id, *(k for k in self._keys if k != self.key_id))

    @property
    def current(self) -> MasterKey:
        return self._current

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def wrap(self, plaintext: bytes, context: str) -> bytes:
        """A v2 blob under the current key."""
        return self._current.wrap(plaintext, context, version=2)

    def unwrap(self, blob: bytes, context: str) -> bytes:
        """A v2 blob with the key it names (re-reading the key files once if that key is not
        loaded); a v1 blob with whichever loaded key authenticates it (current first)."""
        if blob[:1] == _VERSION:
            return self._unwrap_v1(blob, context)
        if blob[:1] != _VERSION_2:
            raise MasterKeyError(f"wrapped key for {context!r} has unknown format version")
        if len(blob) < 1 + _KEY_ID + _NONCE + _TAG:
            raise MasterKeyError(f"wrapped key for {context!r} is too short")
        key_id = blob[1 : 1 + _KEY_ID].hex()
        key = self._keys.get(key_id)
        if key is None and self.reload():
            key = self._keys.get(key_id)
        if key is None:
            raise UnknownMasterKeyError(
                f"wrapped key for {context!r} is under master key {key_id}, which is not loaded "
                f"(loaded: {', '.join(self.key_ids)})",
                key_id,
            )
        return key.unwrap(blob, context)

    def _unwrap_v1(self, blob: bytes, context: str) -> bytes:
        if len(blob) < 1 + _NONCE + _TAG:
            raise MasterKeyError(f"wrapped key for {context!r} is too short")
        for attempt in range(2):
            current = self._current
            for key in (current, *(k for k in self._keys.values() if k is not current)):
                try:
                    return key.unwrap(blob, context)
                except MasterKeyError:
                    continue
            if attempt == 0 and not self.reload():
                break
        raise MasterKeyError(
            f"wrapped key for {context!r} does not unwrap under any loaded master key "
            f"({', '.join(self.key_ids)}): tampered, wrong context, or wrong master key"
        )

    # ---- rotation -------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the data directory's key files; True when that added a key. A ring from the
        environment (or built without ``data_dir``) never reloads. Rate-limited to one read per
        ``reload_interval`` seconds."""
        if self._data_dir is None:
            return False
        with self._lock:
            now = self._clock()
            if self._last_reload is not None and now - self._last_reload < self._reload_interval:
                return False
            self._last_reload = now
            current, old = read_key_files(self._data_dir)
            added = {k.key_id: k for k in (current, *old) if k.key_id not in self._keys}
            if added:
                self._keys = {**self._keys, **added}
            return bool(added)

    def add(self, key: MasterKey) -> None:
        """Hold ``key`` for unwrapping (not for new wraps)."""
        with self._lock:
            if key.key_id not in self._keys:
                self._keys = {**self._keys, key.key_id: key}

    def use_current(self, key_id: str) -> None:
        """Make the loaded key ``key_id`` the one new wraps use (re-reading the key files if it
        is not loaded yet): how a running process adopts the key a rotation installed, once the
        store's ``meta.master_key_id`` names it. :class:`UnknownMasterKeyError` if not found."""
        if key_id not in self._keys:
            with self._lock:
                self._last_reload = None  # an explicit request: do not rate-limit it
            self.reload()
        key = self._keys.get(key_id)
        if key is None:
            raise UnknownMasterKeyError(f"master key {key_id} is not loaded", key_id)
        self._current = key


# ---- key files --------------------------------------------------------------------------------
def read_key_files(data_dir: Path) -> tuple[MasterKey, list[MasterKey]]:
    """``data_dir/master.key`` and every ``master.key.old.<id>`` (each 0600, each named by its
    own id: a misnamed file is an error, not a silent extra key)."""
    current = MasterKey.from_file(data_dir / KEY_FILE)
    old: list[MasterKey] = []
    for path in sorted(data_dir.glob(OLD_KEY_FILE_PREFIX + "*")):
        key = MasterKey.from_file(path)
        if path.name != OLD_KEY_FILE_PREFIX + key.key_id:
            raise MasterKeyError(
                f"master key file {path} holds master key {key.key_id}, not the one its name says"
            )
        if key.key_id != current.key_id:
            old.append(key)
    return current, old


def install_new_key(data_dir: Path) -> tuple[MasterKey, MasterKey]:
    """The key-file half of a rotation: keep ``master.key`` as ``master.key.old.<its id>``
    (0600), then put a new random key in ``master.key`` by an atomic rename. At every instant
    each key that may have wrapped a blob is on disk. Returns ``(old, new)``. The caller holds
    the rotation lock; a ``master.key.new`` left by a crashed rotation never wrapped anything
    (it is renamed only after it is written) and is replaced."""
    data_dir = Path(data_dir)
    old = MasterKey.from_file(data_dir / KEY_FILE)
    kept = data_dir / (OLD_KEY_FILE_PREFIX + old.key_id)
    if kept.exists():
        if MasterKey.from_file(kept).key_id != old.key_id:
            raise MasterKeyError(f"master key file {kept} does not hold master key {old.key_id}")
    else:
        old._write_new_file(kept)
    staging = data_dir / _NEW_KEY_FILE
    staging.unlink(missing_ok=True)
    new = MasterKey.create_file(staging)
    os.replace(staging, data_dir / KEY_FILE)
    _fsync_dir(data_dir)
    return old, new


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
