"""Keys at rest: the switch master key and AES-256-GCM wrapping of stored keys (TMKs, ZPKs).

Owns loading the 32-byte master key (env ``SWITCH_MASTER_KEY`` first, else a key file that must
not be accessible to group or others), creating a new key file (mode 0600, never overwriting),
and wrapping / unwrapping key material bound to a context string (e.g. ``"tmk:10000001"``), so a
wrapped key copied to another row does not unwrap.

Blob format: ``version(1) = 0x01 || nonce(12) || ciphertext || tag(16)``; the associated data
is ``version || context`` (UTF-8).

Must not log, print or put the master key or any unwrapped key into a message or ``repr``
(``key_id`` — first 4 bytes of SHA-256 of the key, hex — identifies it instead), and must not
import I/O frameworks (sockets, anyio) or ``switch.pipeline`` / ``switch.adapters``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["ENV_VAR", "MasterKey", "MasterKeyError"]

ENV_VAR = "SWITCH_MASTER_KEY"
_KEY_BYTES = 32
_VERSION = b"\x01"
_NONCE = 12
_TAG = 16


class MasterKeyError(RuntimeError):
    """The master key is missing, unreadable, malformed, unsafe, or a blob does not unwrap."""


class MasterKey:
    """The 32-byte AES-256 master key. ``repr`` shows only ``key_id``."""

    __slots__ = ("_aead", "_key", "key_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != _KEY_BYTES:
            raise MasterKeyError(f"master key must be {_KEY_BYTES} bytes, got {len(key)}")
        self._key = bytes(key)
        self._aead = AESGCM(self._key)
        self.key_id: str = hashlib.sha256(self._key).digest()[:4].hex()

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
        key = secrets.token_bytes(_KEY_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise MasterKeyError(f"master key file {path} already exists; not overwriting") from None
        except OSError as exc:
            raise MasterKeyError(f"cannot create master key file {path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (key.hex() + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(key)

    def _aad(self, context: str) -> bytes:
        return _VERSION + context.encode("utf-8")

    def wrap(self, plaintext: bytes, context: str) -> bytes:
        """Encrypt ``plaintext`` bound to ``context``: ``0x01 || nonce || ciphertext || tag``."""
        nonce = secrets.token_bytes(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, self._aad(context))

    def unwrap(self, blob: bytes, context: str) -> bytes:
        """Decrypt a :meth:`wrap` blob; :class:`MasterKeyError` on tamper, wrong context or key."""
        if len(blob) < 1 + _NONCE + _TAG:
            raise MasterKeyError(f"wrapped key for {context!r} is too short")
        if blob[:1] != _VERSION:
            raise MasterKeyError(f"wrapped key for {context!r} has unknown format version")
        nonce, body = blob[1 : 1 + _NONCE], blob[1 + _NONCE :]
        try:
            return self._aead.decrypt(nonce, body, self._aad(context))
        except InvalidTag:
            raise MasterKeyError(
                f"wrapped key for {context!r} does not unwrap under master key {self.key_id} "
                "(tampered, wrong context, or wrong master key)"
            ) from None
