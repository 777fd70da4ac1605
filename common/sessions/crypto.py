"""Encryption of session contexts at rest and in transit (AES-256-GCM, per-fleet key).

A sealed record is ``version (1 byte) | nonce (12 bytes) | ciphertext + tag``. The associated
data binds it to its format version, its fleet and its session id: a record moved to another
session or fleet, or changed by a single bit, does not open (:class:`SessionKeyError`).

The fleet key is 32 random bytes. The controller keeps it in its data directory
(``session.key``, :meth:`FleetKey.load_or_create`); agents get it base64-encoded from their
config (``AgentConfig.session_key``, :meth:`FleetKey.from_base64`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import ValidationError

from edgefed.common.sessions.context import SessionContext, owner_digest_key
from edgefed.common.sessions.errors import SessionKeyError

__all__ = ["RECORD_VERSION", "FleetKey"]

RECORD_VERSION = 1
"""First byte of a sealed record."""
_NONCE_BYTES = 12
_TAG_BYTES = 16
_AAD_PREFIX = b"edgefed session record\x00"


def _aad(version: int, fleet: str, session_id: str) -> bytes:
    return (
        _AAD_PREFIX
        + bytes([version])
        + fleet.encode("utf-8")
        + b"\x00"
        + session_id.encode("utf-8")
    )


class FleetKey:
    """A fleet's session key (never printed: ``repr`` shows a fingerprint only)."""

    KEY_BYTES: ClassVar[int] = 32

    def __init__(self, key: bytes) -> None:
        if len(key) != self.KEY_BYTES:
            raise SessionKeyError(
                f"a fleet session key has {self.KEY_BYTES} bytes, not {len(key)}: generate one "
                "with FleetKey.generate() (or copy the controller's session.key)"
            )
        self._key = bytes(key)
        self._aead = AESGCM(self._key)

    def __repr__(self) -> str:
        return f"FleetKey(fingerprint={self.fingerprint()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FleetKey) and hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    @property
    def raw(self) -> bytes:
        """The key bytes (for :func:`~edgefed.common.sessions.context.owner_of_key`)."""
        return self._key

    def fingerprint(self) -> str:
        """A short public name of the key (compare keys in logs without showing them)."""
        return hashlib.sha256(b"edgefed fleet key fingerprint\x00" + self._key).hexdigest()[:16]

    # ------------------------------------------------------------------------ making, loading

    @classmethod
    def generate(cls) -> FleetKey:
        return cls(secrets.token_bytes(cls.KEY_BYTES))

    @classmethod
    def from_base64(cls, text: str) -> FleetKey:
        """The key from its base64 text (standard or URL-safe alphabet, padding optional).
        Raises :class:`SessionKeyError` saying what is wrong with it."""
        cleaned = "".join(text.split())
        if not cleaned:
            raise SessionKeyError(
                "the session key is empty: set it to the controller's key (base64 of 32 bytes)"
            )
        padded = cleaned + "=" * (-len(cleaned) % 4)
        try:
            if "-" in padded or "_" in padded:
                raw = base64.b64decode(padded, altchars=b"-_", validate=True)
            else:
                raw = base64.b64decode(padded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SessionKeyError(
                f"the session key is not valid base64 ({exc}): copy it again from the "
                "controller's session.key"
            ) from None
        if len(raw) != cls.KEY_BYTES:
            raise SessionKeyError(
                f"the session key decodes to {len(raw)} bytes, not {cls.KEY_BYTES}: copy it "
                "again from the controller's session.key"
            )
        return cls(raw)

    def to_base64(self) -> str:
        return base64.b64encode(self._key).decode("ascii")

    @classmethod
    def load_or_create(cls, path: Path) -> FleetKey:
        """The key in ``path``, made (mode 0600, atomically: never a half-written file, and
        never over another process's fresh key) when there is none. Raises
        :class:`SessionKeyError` when the file cannot be read or holds no valid key."""
        path = Path(path)
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        key = cls.generate()
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, (key.to_base64() + "\n").encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # fails if another process made the key meanwhile
            except FileExistsError:
                return cls._load(path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise SessionKeyError(f"cannot create the session key {path}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return key

    @classmethod
    def _load(cls, path: Path) -> FleetKey:
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError) as exc:
            raise SessionKeyError(f"cannot read the session key {path}: {exc}") from exc
        try:
            return cls.from_base64(text)
        except SessionKeyError as exc:
            raise SessionKeyError(
                f"{path} holds no valid session key ({exc.message}); restore it from a backup "
                "(deleting it makes a new key, and every stored session is then lost)"
            ) from None

    # ------------------------------------------------------------------------ records

    def seal(self, fleet: str, session_id: str, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` as a record of ``session_id`` in ``fleet``."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, _aad(RECORD_VERSION, fleet, session_id))
        return bytes([RECORD_VERSION]) + nonce + sealed

    def open(self, fleet: str, session_id: str, record: bytes) -> bytes:
        """Decrypt a record of ``session_id`` in ``fleet``. Raises :class:`SessionKeyError`
        when it is truncated, of an unknown format, changed, another session's or another
        fleet's, or sealed under another key."""
        record = bytes(record)
        if len(record) < 1 + _NONCE_BYTES + _TAG_BYTES:
            raise SessionKeyError(
                f"the record of session {session_id} is truncated ({len(record)} bytes)"
            )
        version = record[0]
        if version != RECORD_VERSION:
            raise SessionKeyError(
                f"the record of session {session_id} has format {version}; this edgefed reads "
                f"format {RECORD_VERSION} (upgrade edgefed on this host)"
            )
        nonce = record[1 : 1 + _NONCE_BYTES]
        try:
            return self._aead.decrypt(
                nonce, record[1 + _NONCE_BYTES :], _aad(version, fleet, session_id)
            )
        except InvalidTag:
            raise SessionKeyError(
                f"the record of session {session_id} does not open with fleet {fleet!r}'s key "
                f"(fingerprint {self.fingerprint()}): it was changed, belongs to another session "
                "or fleet, or was sealed under another key (check that this host's session key "
                "is the controller's)"
            ) from None

    def seal_context(self, fleet: str, ctx: SessionContext) -> bytes:
        return self.seal(fleet, ctx.session_id, ctx.model_dump_json().encode("utf-8"))

    def open_context(self, fleet: str, session_id: str, record: bytes) -> SessionContext:
        """The context in a record (see :meth:`open`); :class:`SessionKeyError` also when the
        record opens but holds no valid context of ``session_id``."""
        plaintext = self.open(fleet, session_id, record)
        try:
            ctx = SessionContext.model_validate_json(plaintext)
        except ValidationError as exc:
            raise SessionKeyError(
                f"the record of session {session_id} opens but holds no valid context "
                f"({exc.error_count()} errors, first: {exc.errors()[0]['msg']}); was it written "
                "by a newer edgefed?"
            ) from None
        if ctx.session_id != session_id:
            raise SessionKeyError(
                f"the record of session {session_id} holds session {ctx.session_id}"
            )
        return ctx

    def digest(self, data: bytes) -> str:
        """Hex HMAC-SHA256 of ``data`` under a key derived from this one (HKDF, info
        ``b"edgefed owner"``): what :func:`owner_of_key` stores instead of a secret."""
        return hmac.new(owner_digest_key(self._key), data, hashlib.sha256).hexdigest()
