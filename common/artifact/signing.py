"""Ed25519 keys and the detached signature file ``manifest.sig``.

The signature file is JSON ``{"algorithm": "ed25519", "key_id": "...", "signature": "<base64>"}``
over the exact bytes of ``manifest.json``. A key's id is the first 16 hex characters of the
SHA-256 of its raw 32-byte public key; verifiers look trusted keys up by it, so several keys
can be trusted at once while keys rotate.

Private keys are stored as unencrypted (or password-protected) PKCS#8 PEM with mode ``0600``;
public keys as SubjectPublicKeyInfo PEM, or given as the base64 of the raw 32 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefed.common.artifact._files import write_all_and_sync
from edgefed.common.errors import ArtifactRejected, RejectReason, SigningKeyError

ALGORITHM: Literal["ed25519"] = "ed25519"
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
MAX_SIGNATURE_FILE_BYTES = 4096
"""Largest ``manifest.sig`` accepted (a valid one is about 150 bytes)."""
_MAX_KEY_FILE_BYTES = 64 * 1024


def key_id(public_key: VerifyKey | Ed25519PublicKey | bytes) -> str:
    """First 16 hex characters of the SHA-256 of the raw 32-byte public key."""
    if isinstance(public_key, VerifyKey):
        raw = public_key.raw
    elif isinstance(public_key, Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public_key
    if len(raw) != PUBLIC_KEY_BYTES:
        raise SigningKeyError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return hashlib.sha256(raw).hexdigest()[:16]


class VerifyKey:
    """An Ed25519 public key that checks manifest signatures."""

    __slots__ = ("_key", "_raw")

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key
        self._raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def from_raw(cls, raw: bytes) -> VerifyKey:
        """From the raw 32 bytes."""
        if len(raw) != PUBLIC_KEY_BYTES:
            raise SigningKeyError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
        try:
            return cls(Ed25519PublicKey.from_public_bytes(raw))
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise SigningKeyError(f"not an Ed25519 public key: {exc}") from exc

    @classmethod
    def from_base64(cls, text: str) -> VerifyKey:
        """From the base64 of the raw 32 bytes."""
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SigningKeyError(f"public key is not valid base64: {exc}") from exc
        return cls.from_raw(raw)

    @classmethod
    def from_pem(cls, data: bytes) -> VerifyKey:
        """From a SubjectPublicKeyInfo PEM block (``-----BEGIN PUBLIC KEY-----``)."""
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise SigningKeyError(f"not a PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise SigningKeyError(f"public key is {type(key).__name__}, not Ed25519")
        return cls(key)

    @classmethod
    def parse(cls, data: bytes | str) -> VerifyKey:
        """From PEM or from the base64 of the raw 32 bytes, whichever ``data`` is."""
        blob = data.encode("ascii", "replace") if isinstance(data, str) else data
        if blob.lstrip().startswith(b"-----BEGIN"):
            return cls.from_pem(blob)
        try:
            text = blob.decode("ascii")
        except UnicodeDecodeError as exc:
            raise SigningKeyError("public key is neither PEM nor base64") from exc
        return cls.from_base64(text)

    @classmethod
    def load(cls, path: Path | str) -> VerifyKey:
        """Read a public key file (PEM or base64 of the raw key)."""
        data = _read_key_file(Path(path))
        try:
            return cls.parse(data)
        except SigningKeyError as exc:
            raise SigningKeyError(f"{path}: {exc.message}") from exc

    @property
    def raw(self) -> bytes:
        """The raw 32-byte public key."""
        return self._raw

    @property
    def key_id(self) -> str:
        """See :func:`key_id`."""
        return key_id(self._raw)

    def to_base64(self) -> str:
        return base64.b64encode(self._raw).decode("ascii")

    def to_pem(self) -> bytes:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def save(self, path: Path | str, *, overwrite: bool = False) -> None:
        """Write the key as PEM (mode ``0644``)."""
        _write_key_file(Path(path), self.to_pem(), mode=0o644, overwrite=overwrite)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``data``."""
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"VerifyKey(key_id={self.key_id!r})"


class SigningKey:
    """An Ed25519 private key that signs manifests. Its ``repr`` never shows the secret."""

    __slots__ = ("_key", "_verify_key")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._verify_key = VerifyKey(key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes, *, password: bytes | None = None) -> SigningKey:
        """From a PKCS#8 PEM block (``-----BEGIN PRIVATE KEY-----``)."""
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise SigningKeyError(f"not a usable PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"private key is {type(key).__name__}, not Ed25519")
        return cls(key)

    @classmethod
    def load(cls, path: Path | str, *, password: bytes | None = None) -> SigningKey:
        """Read a private key file written by :meth:`save`."""
        data = _read_key_file(Path(path))
        try:
            return cls.from_pem(data, password=password)
        except SigningKeyError as exc:
            raise SigningKeyError(f"{path}: {exc.message}") from exc

    def to_pem(self, *, password: bytes | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def save(
        self, path: Path | str, *, password: bytes | None = None, overwrite: bool = False
    ) -> None:
        """Write the key as PKCS#8 PEM with mode ``0600``; refuses to replace a file unless
        ``overwrite`` (losing a signing key is not undone)."""
        _write_key_file(Path(path), self.to_pem(password=password), mode=0o600, overwrite=overwrite)

    @property
    def verify_key(self) -> VerifyKey:
        return self._verify_key

    @property
    def key_id(self) -> str:
        return self._verify_key.key_id

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._key.sign(data)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


def generate_signing_key() -> SigningKey:
    """A new random Ed25519 signing key."""
    return SigningKey.generate()


def load_signing_key(path: Path | str, *, password: bytes | None = None) -> SigningKey:
    """Read a private key file; :class:`SigningKeyError` when it is missing or not Ed25519."""
    return SigningKey.load(path, password=password)


def load_verify_key(source: Path | str | bytes) -> VerifyKey:
    """A public key from a file path, or from PEM / base64 given as bytes."""
    if isinstance(source, bytes):
        return VerifyKey.parse(source)
    return VerifyKey.load(source)


def _b64_signature(v: str) -> str:
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("signature is not valid base64") from exc
    if len(raw) != SIGNATURE_BYTES:
        raise ValueError(f"an Ed25519 signature has {SIGNATURE_BYTES} bytes, got {len(raw)}")
    return v


class SignatureFile(BaseModel):
    """Contents of ``manifest.sig``."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    algorithm: Literal["ed25519"] = ALGORITHM
    signature: str
    """Base64 of the 64-byte Ed25519 signature."""

    @field_validator("signature")
    @classmethod
    def _signature_is_base64(cls, v: str) -> str:
        return _b64_signature(v)

    @property
    def signature_bytes(self) -> bytes:
        return base64.b64decode(self.signature, validate=True)

    def to_json_bytes(self) -> bytes:
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2)
        return (text + "\n").encode("ascii")

    @classmethod
    def parse(cls, data: bytes) -> SignatureFile:
        """Parse ``manifest.sig``; :class:`ArtifactRejected` (``BAD_SIGNATURE``) when malformed."""
        if len(data) > MAX_SIGNATURE_FILE_BYTES:
            raise ArtifactRejected(
                RejectReason.BAD_SIGNATURE,
                f"signature file is {len(data)} bytes, more than {MAX_SIGNATURE_FILE_BYTES}",
            )
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(root)"
            raise ArtifactRejected(
                RejectReason.BAD_SIGNATURE, f"signature file is malformed: {loc}: {first['msg']}"
            ) from exc


def sign_bytes(data: bytes, signing_key: SigningKey) -> SignatureFile:
    """The signature file for ``data`` (the exact bytes of ``manifest.json``)."""
    signature = base64.b64encode(signing_key.sign(data)).decode("ascii")
    return SignatureFile(key_id=signing_key.key_id, algorithm=ALGORITHM, signature=signature)


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise SigningKeyError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise SigningKeyError(f"key file {path} is larger than {_MAX_KEY_FILE_BYTES} bytes")
    return data


def _write_key_file(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write ``data`` with exactly ``mode``: atomically when replacing, exclusively otherwise."""
    target = path
    if overwrite:
        target = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = os.open(target, flags, mode)
    except FileExistsError as exc:
        raise SigningKeyError(f"key file {target} exists (pass overwrite=True)") from exc
    except OSError as exc:
        raise SigningKeyError(f"cannot write key file {target}: {exc.strerror or exc}") from exc
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits; never added any
            write_all_and_sync(fd, data)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(target, path)
    except OSError as exc:
        target.unlink(missing_ok=True)  # ours: created exclusively above
        raise SigningKeyError(f"cannot write key file {path}: {exc.strerror or exc}") from exc
