"""The model artifact format: build, sign, verify, and every way verification refuses."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from edgefed.common import artifact
from edgefed.common.artifact import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Manifest,
    Quantization,
    SigningKey,
    SplitInfo,
    TensorSpec,
    VerifyKey,
    generate_signing_key,
    key_id,
    load_signing_key,
    load_verify_key,
    parse_manifest,
    sign_bytes,
    sign_manifest,
    verify,
    write_artifact,
)
from edgefed.common.errors import (
    ArtifactError,
    ArtifactRejected,
    PermanentError,
    RejectReason,
    SigningKeyError,
)
from edgefed.common.settings import ArtifactSettings

CREATED = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def key() -> SigningKey:
    return generate_signing_key()


def _fill(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(os.urandom(3000))
    (directory / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0, "b": 1}}}')
    (directory / "extra").mkdir()
    (directory / "extra" / "config.json").write_text('{"hidden_size": 8}')


def _build(directory: Path, key: SigningKey, **overrides: Any) -> Manifest:
    fields: dict[str, Any] = {
        "name": "minilm-sst2",
        "version": 3,
        "task": "text-classification",
        "target": "x86-avx2",
        "signing_key": key,
        "inputs": [TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])],
        "outputs": [TensorSpec(name="logits", dtype="float32", shape=["batch", 2])],
        "quantization": Quantization(scheme="dynamic-int8", per_channel=True),
        "parent_version": 2,
        "metrics": {"accuracy": 0.91, "p50_ms": 3.5},
        "opset": 17,
        "created_at": CREATED,
    }
    fields.update(overrides)
    return write_artifact(directory, **fields)


@pytest.fixture
def built(tmp_path: Path, key: SigningKey) -> Path:
    directory = tmp_path / "artifact"
    _fill(directory)
    _build(directory, key)
    return directory


def _rejected(directory: Path, keys: Any, **kwargs: Any) -> ArtifactRejected:
    with pytest.raises(ArtifactRejected) as info:
        verify(directory, keys, **kwargs)
    return info.value


def _rewrite_manifest(
    directory: Path, key: SigningKey, edit: Callable[[dict[str, Any]], None]
) -> None:
    """Edit manifest.json as JSON and sign the result (a hand-crafted, validly signed manifest)."""
    data = json.loads((directory / MANIFEST_NAME).read_bytes())
    edit(data)
    (directory / MANIFEST_NAME).write_text(json.dumps(data))
    sign_manifest(directory, key)


# --------------------------------------------------------------------------- the good path


def test_verify_accepts_a_good_artifact_and_returns_its_manifest(
    built: Path, key: SigningKey
) -> None:
    manifest = verify(built, key.verify_key)

    assert manifest.name == "minilm-sst2"
    assert manifest.version == 3
    assert manifest.key_id == key.key_id
    assert [f.path for f in manifest.files] == ["extra/config.json", "model.onnx", "tokenizer.json"]
    assert manifest.file("model.onnx").size == 3000
    assert manifest.created_at == CREATED
    assert manifest.quantization == Quantization(scheme="dynamic-int8", per_channel=True)
    assert manifest.inputs[0].shape == ["batch", "sequence"]


def test_verify_accepts_a_directory_given_as_a_string_and_a_list_of_keys(
    built: Path, key: SigningKey
) -> None:
    assert verify(str(built), [key.verify_key]).version == 3


def test_any_of_several_trusted_keys_verifies_during_key_rotation(tmp_path: Path) -> None:
    old, new = generate_signing_key(), generate_signing_key()
    by_old, by_new = tmp_path / "old", tmp_path / "new"
    _fill(by_old)
    _fill(by_new)
    _build(by_old, old)
    _build(by_new, new)

    trusted = (old.verify_key, new.verify_key)
    assert verify(by_old, trusted).key_id == old.key_id
    assert verify(by_new, iter(trusted)).key_id == new.key_id
    assert _rejected(by_old, new.verify_key).reason is RejectReason.UNTRUSTED_SIGNER


def test_verify_accepts_the_same_version_when_min_version_is_the_running_one(
    built: Path, key: SigningKey
) -> None:
    assert verify(built, key.verify_key, min_version=3).version == 3


def test_verify_accepts_a_split_head_artifact(tmp_path: Path, key: SigningKey) -> None:
    directory = tmp_path / "head"
    _fill(directory)
    _build(directory, key, split=SplitInfo(role="head", split_point=2), quantization=None)
    manifest = verify(directory, key.verify_key)
    assert manifest.split == SplitInfo(role="head", split_point=2)
    assert manifest.quantization is None


# --------------------------------------------------------------------------- one test per reason


def test_verify_rejects_a_missing_directory_as_not_a_directory(
    tmp_path: Path, key: SigningKey
) -> None:
    err = _rejected(tmp_path / "nope", key.verify_key)
    assert err.reason is RejectReason.NOT_A_DIRECTORY
    assert "nope" in err.detail


def test_verify_rejects_a_regular_file_as_not_a_directory(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x")
    assert _rejected(path, key.verify_key).reason is RejectReason.NOT_A_DIRECTORY


def test_verify_rejects_a_directory_without_manifest_json(built: Path, key: SigningKey) -> None:
    (built / MANIFEST_NAME).unlink()
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.MISSING_MANIFEST
    assert MANIFEST_NAME in err.detail


def test_verify_rejects_a_manifest_that_is_not_json_even_when_signed(
    built: Path, key: SigningKey
) -> None:
    (built / MANIFEST_NAME).write_bytes(b"{not json")
    sign_manifest(built, key)
    assert _rejected(built, key.verify_key).reason is RejectReason.MALFORMED_MANIFEST


def test_verify_rejects_a_manifest_missing_a_field_as_malformed(
    built: Path, key: SigningKey
) -> None:
    _rewrite_manifest(built, key, lambda m: m.pop("task"))
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.MALFORMED_MANIFEST
    assert "task" in err.detail


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("format", 2),
        ("name", "bad/name"),
        ("version", 0),
        ("version", "4"),
        ("task", "image-generation"),
        ("created_at", "2025-01-02T03:04:05"),
        ("unexpected", 1),
    ],
)
def test_verify_rejects_a_manifest_with_an_invalid_field_as_malformed(
    built: Path, key: SigningKey, field: str, value: Any
) -> None:
    _rewrite_manifest(built, key, lambda m: m.__setitem__(field, value))
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.MALFORMED_MANIFEST
    assert field in err.detail


def test_verify_rejects_a_manifest_that_lists_a_path_twice_as_malformed(
    built: Path, key: SigningKey
) -> None:
    _rewrite_manifest(built, key, lambda m: m["files"].append(dict(m["files"][0])))
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.MALFORMED_MANIFEST
    assert "extra/config.json" in err.detail


def test_verify_rejects_a_manifest_over_one_mebibyte_as_oversized(
    built: Path, key: SigningKey
) -> None:
    data = b" " * (1024 * 1024 + 1)
    (built / MANIFEST_NAME).write_bytes(data)
    (built / SIGNATURE_NAME).write_bytes(sign_bytes(data, key).to_json_bytes())
    assert _rejected(built, key.verify_key).reason is RejectReason.OVERSIZED


def test_verify_rejects_a_directory_without_manifest_sig(built: Path, key: SigningKey) -> None:
    (built / SIGNATURE_NAME).unlink()
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.MISSING_SIGNATURE
    assert SIGNATURE_NAME in err.detail


@pytest.mark.parametrize(
    "content",
    [
        b"garbage",
        b'{"key_id": "0123456789abcdef", "algorithm": "ed25519"}',
        b'{"key_id": "0123456789abcdef", "algorithm": "rsa", "signature": "AAAA"}',
        b'{"key_id": "0123456789abcdef", "algorithm": "ed25519", "signature": "not base64!"}',
        b'{"key_id": "0123456789abcdef", "algorithm": "ed25519", "signature": "AAAA"}',
    ],
)
def test_verify_rejects_a_malformed_signature_file_as_bad_signature(
    built: Path, key: SigningKey, content: bytes
) -> None:
    (built / SIGNATURE_NAME).write_bytes(content)
    assert _rejected(built, key.verify_key).reason is RejectReason.BAD_SIGNATURE


def test_verify_rejects_a_signature_of_other_bytes_as_bad_signature(
    built: Path, key: SigningKey
) -> None:
    (built / SIGNATURE_NAME).write_bytes(sign_bytes(b"other bytes", key).to_json_bytes())
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.BAD_SIGNATURE
    assert key.key_id in err.detail


def test_verify_rejects_a_manifest_edited_after_signing_as_bad_signature(
    built: Path, key: SigningKey
) -> None:
    path = built / MANIFEST_NAME
    path.write_bytes(path.read_bytes().replace(b'"version": 3', b'"version": 9'))
    assert _rejected(built, key.verify_key).reason is RejectReason.BAD_SIGNATURE


def test_verify_rejects_an_artifact_signed_by_another_key_as_untrusted_signer(
    built: Path, key: SigningKey
) -> None:
    stranger = generate_signing_key()
    err = _rejected(built, stranger.verify_key)
    assert err.reason is RejectReason.UNTRUSTED_SIGNER
    assert key.key_id in err.detail


def test_verify_rejects_an_artifact_when_no_key_is_trusted(built: Path) -> None:
    assert _rejected(built, []).reason is RejectReason.UNTRUSTED_SIGNER


def test_verify_rejects_a_manifest_naming_another_key_than_its_signer(
    built: Path, key: SigningKey
) -> None:
    other = generate_signing_key()
    _rewrite_manifest(built, other, lambda m: None)  # manifest names `key`, signed by `other`
    err = _rejected(built, [key.verify_key, other.verify_key])
    assert err.reason is RejectReason.UNTRUSTED_SIGNER
    assert other.key_id in err.detail


def test_verify_rejects_a_lower_version_than_min_version(built: Path, key: SigningKey) -> None:
    err = _rejected(built, key.verify_key, min_version=4)
    assert err.reason is RejectReason.VERSION_TOO_LOW
    assert "3" in err.detail


@pytest.mark.parametrize(
    "path",
    [
        "../evil",
        "extra/../../evil",
        "/etc/passwd",
        "extra\\config.json",
        "extra//config.json",
        "./model.onnx",
        "extra/",
        "",
        "model\x00.onnx",
        SIGNATURE_NAME,
    ],
    ids=[
        "parent",
        "nested-parent",
        "absolute",
        "backslash",
        "empty-segment",
        "dot-segment",
        "trailing-slash",
        "empty",
        "nul",
        "reserved",
    ],
)
def test_verify_rejects_an_unsafe_path_in_a_signed_manifest(
    built: Path, key: SigningKey, path: str
) -> None:
    def point_at(m: dict[str, Any]) -> None:
        m["files"][0]["path"] = path

    _rewrite_manifest(built, key, point_at)
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.UNSAFE_PATH
    assert repr(path) in err.detail


def test_verify_rejects_path_traversal_without_touching_the_file_outside(
    tmp_path: Path, key: SigningKey
) -> None:
    directory = tmp_path / "artifact"
    _fill(directory)
    (tmp_path / "evil").write_bytes(b"outside")
    _build(directory, key)

    def escape(m: dict[str, Any]) -> None:
        m["files"].append({"path": "../evil", "sha256": "0" * 64, "size": 7})

    _rewrite_manifest(directory, key, escape)
    assert _rejected(directory, key.verify_key).reason is RejectReason.UNSAFE_PATH


def test_verify_rejects_a_symlink_inside_pointing_outside(
    tmp_path: Path, built: Path, key: SigningKey
) -> None:
    (tmp_path / "secret").write_bytes(b"secret")
    (built / "link").symlink_to(tmp_path / "secret")
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.UNSAFE_PATH
    assert "link" in err.detail


def test_verify_rejects_a_listed_file_replaced_by_a_symlink_with_the_same_content(
    tmp_path: Path, built: Path, key: SigningKey
) -> None:
    outside = tmp_path / "copy.onnx"
    outside.write_bytes((built / "model.onnx").read_bytes())
    (built / "model.onnx").unlink()
    (built / "model.onnx").symlink_to(outside)
    assert _rejected(built, key.verify_key).reason is RejectReason.UNSAFE_PATH


def test_verify_rejects_a_symlinked_subdirectory(
    tmp_path: Path, built: Path, key: SigningKey
) -> None:
    outside = tmp_path / "outside"
    (built / "extra").rename(outside)
    (built / "extra").symlink_to(outside, target_is_directory=True)
    assert _rejected(built, key.verify_key).reason is RejectReason.UNSAFE_PATH


def test_verify_rejects_a_symlinked_manifest(tmp_path: Path, built: Path, key: SigningKey) -> None:
    outside = tmp_path / "manifest.json"
    (built / MANIFEST_NAME).rename(outside)
    (built / MANIFEST_NAME).symlink_to(outside)
    assert _rejected(built, key.verify_key).reason is RejectReason.UNSAFE_PATH


def test_verify_rejects_a_fifo_inside_the_directory(built: Path, key: SigningKey) -> None:
    os.mkfifo(built / "pipe")
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.UNSAFE_PATH
    assert "pipe" in err.detail


def test_verify_rejects_a_listed_file_that_is_missing(built: Path, key: SigningKey) -> None:
    (built / "tokenizer.json").unlink()
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.MISSING_FILE
    assert "tokenizer.json" in err.detail


def test_verify_rejects_a_file_that_is_not_listed_as_extra(built: Path, key: SigningKey) -> None:
    (built / "payload.py").write_text("import os")
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.EXTRA_FILE
    assert "payload.py" in err.detail


def test_verify_rejects_a_hidden_file_that_is_not_listed_as_extra(
    built: Path, key: SigningKey
) -> None:
    (built / "extra" / ".hidden").write_bytes(b"")
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.EXTRA_FILE
    assert "extra/.hidden" in err.detail


def test_verify_rejects_a_truncated_file_as_size_mismatch(built: Path, key: SigningKey) -> None:
    path = built / "model.onnx"
    path.write_bytes(path.read_bytes()[:-1])
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.SIZE_MISMATCH
    assert "model.onnx" in err.detail


def test_verify_rejects_a_grown_file_as_size_mismatch(built: Path, key: SigningKey) -> None:
    with (built / "tokenizer.json").open("ab") as fh:
        fh.write(b" ")
    assert _rejected(built, key.verify_key).reason is RejectReason.SIZE_MISMATCH


def test_verify_rejects_a_flipped_bit_with_hash_mismatch(built: Path, key: SigningKey) -> None:
    path = built / "model.onnx"
    data = bytearray(path.read_bytes())
    data[1234] ^= 0x10
    path.write_bytes(bytes(data))
    err = _rejected(built, key.verify_key)
    assert err.reason is RejectReason.HASH_MISMATCH
    assert "model.onnx" in err.detail


def test_verify_rejects_an_oversized_file_without_reading_it(
    built: Path, key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(fd: int, size: int) -> tuple[str, int]:
        raise AssertionError("an oversized file was read")

    monkeypatch.setattr(artifact._files, "hash_fd", never)
    err = _rejected(built, key.verify_key, limits=ArtifactSettings(max_file_bytes=2999))
    assert err.reason is RejectReason.OVERSIZED
    assert "model.onnx" in err.detail


def test_verify_rejects_more_files_than_max_files_as_oversized(
    built: Path, key: SigningKey
) -> None:
    err = _rejected(built, key.verify_key, limits=ArtifactSettings(max_files=2))
    assert err.reason is RejectReason.OVERSIZED
    assert "max_files=2" in err.detail


def test_verify_rejects_a_total_over_max_total_bytes_as_oversized(
    built: Path, key: SigningKey
) -> None:
    limits = ArtifactSettings(max_file_bytes=3000, max_total_bytes=3010)
    err = _rejected(built, key.verify_key, limits=limits)
    assert err.reason is RejectReason.OVERSIZED
    assert "max_total_bytes=3010" in err.detail


def test_every_reject_reason_is_a_permanent_artifact_error(built: Path, key: SigningKey) -> None:
    err = _rejected(built, key.verify_key, min_version=10)
    assert isinstance(err, ArtifactError)
    assert isinstance(err, PermanentError)
    assert not err.retryable
    assert str(RejectReason.VERSION_TOO_LOW) in str(err)


# --------------------------------------------------------------------------- building


def test_manifest_json_is_deterministic_for_the_same_created_at(
    tmp_path: Path, key: SigningKey
) -> None:
    directory = tmp_path / "artifact"
    _fill(directory)
    _build(directory, key)
    first = (directory / MANIFEST_NAME).read_bytes()
    _build(directory, key)  # the second build must not list the first's manifest
    assert (directory / MANIFEST_NAME).read_bytes() == first

    data = json.loads(first)
    assert list(data) == sorted(data)
    assert [f["path"] for f in data["files"]] == sorted(f["path"] for f in data["files"])
    assert data["created_at"] == "2025-01-02T03:04:05Z"


def test_manifest_round_trips_through_its_canonical_bytes(built: Path) -> None:
    raw = (built / MANIFEST_NAME).read_bytes()
    manifest = parse_manifest(raw)
    assert manifest.to_json_bytes() == raw


def test_created_at_is_stored_in_utc(tmp_path: Path, key: SigningKey) -> None:
    directory = tmp_path / "artifact"
    _fill(directory)
    local = CREATED.astimezone(timezone(timedelta(hours=2)))
    manifest = _build(directory, key, created_at=local)
    assert manifest.created_at.utcoffset() == timedelta(0)
    assert manifest.created_at == CREATED


def test_write_artifact_refuses_a_symlink(tmp_path: Path, key: SigningKey) -> None:
    directory = tmp_path / "artifact"
    _fill(directory)
    (directory / "link").symlink_to(directory / "model.onnx")
    with pytest.raises(ArtifactError, match="symbolic link"):
        _build(directory, key)
    assert not (directory / MANIFEST_NAME).exists()


def test_write_artifact_refuses_an_invalid_model_name(tmp_path: Path, key: SigningKey) -> None:
    directory = tmp_path / "artifact"
    _fill(directory)
    with pytest.raises(ArtifactError, match="name"):
        _build(directory, key, name="../bad")


def test_write_artifact_refuses_a_missing_directory(tmp_path: Path, key: SigningKey) -> None:
    with pytest.raises(ArtifactError):
        _build(tmp_path / "missing", key)


def test_signature_file_names_the_key_and_algorithm(built: Path, key: SigningKey) -> None:
    sig = json.loads((built / SIGNATURE_NAME).read_bytes())
    assert sig["key_id"] == key.key_id
    assert sig["algorithm"] == "ed25519"
    assert set(sig) == {"key_id", "algorithm", "signature"}


# --------------------------------------------------------------------------- keys


def test_key_id_is_the_first_16_hex_of_the_sha256_of_the_raw_public_key(key: SigningKey) -> None:
    import hashlib

    raw = key.verify_key.raw
    assert len(raw) == 32
    assert key_id(key.verify_key) == hashlib.sha256(raw).hexdigest()[:16] == key.key_id


def test_signing_key_round_trips_through_a_0600_pem_file(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "signing.pem"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_signing_key(path)
    assert loaded.key_id == key.key_id
    assert loaded.verify_key.verify(key.sign(b"data"), b"data")


def test_signing_key_file_keeps_mode_0600_when_overwritten(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "signing.pem"
    path.write_text("old")
    path.chmod(0o644)
    key.save(path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_signing_key(path).key_id == key.key_id


def test_saving_a_signing_key_refuses_to_replace_a_file(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "signing.pem"
    path.write_text("keep me")
    with pytest.raises(SigningKeyError, match="exists"):
        key.save(path)
    assert path.read_text() == "keep me"


def test_password_protected_signing_key_round_trips(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "signing.pem"
    key.save(path, password=b"hunter2")
    assert load_signing_key(path, password=b"hunter2").key_id == key.key_id
    with pytest.raises(SigningKeyError):
        load_signing_key(path, password=b"wrong")
    with pytest.raises(SigningKeyError):
        load_signing_key(path)


def test_verify_key_loads_from_pem_file_and_raw_base64(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "verify.pem"
    key.verify_key.save(path)
    assert load_verify_key(path) == key.verify_key
    assert load_verify_key(key.verify_key.to_base64().encode()) == key.verify_key
    assert VerifyKey.from_base64(key.verify_key.to_base64()).key_id == key.key_id
    b64_file = tmp_path / "verify.b64"
    b64_file.write_text(key.verify_key.to_base64() + "\n")
    assert load_verify_key(b64_file) == key.verify_key


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"])
def test_loading_a_garbage_signing_key_file_raises_signing_key_error(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "garbage.pem"
    path.write_bytes(content)
    with pytest.raises(SigningKeyError, match=r"garbage\.pem"):
        load_signing_key(path)


@pytest.mark.parametrize("content", [b"garbage!", b"AAAA", b"\xff\xfe", b"-----BEGIN PUBLIC KEY"])
def test_loading_a_garbage_verify_key_raises_signing_key_error(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "garbage.pub"
    path.write_bytes(content)
    with pytest.raises(SigningKeyError):
        load_verify_key(path)


def test_loading_a_missing_key_file_raises_signing_key_error(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match=r"missing\.pem"):
        load_signing_key(tmp_path / "missing.pem")
    with pytest.raises(SigningKeyError, match=r"missing\.pub"):
        load_verify_key(tmp_path / "missing.pub")


def test_loading_an_rsa_key_raises_signing_key_error(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = tmp_path / "rsa.pem"
    private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = tmp_path / "rsa.pub"
    public.write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(SigningKeyError, match="not Ed25519"):
        load_signing_key(private)
    with pytest.raises(SigningKeyError, match="not Ed25519"):
        load_verify_key(public)


def test_signing_key_repr_does_not_show_the_secret(key: SigningKey) -> None:
    assert repr(key) == f"SigningKey(key_id={key.key_id!r})"


def test_verify_manifest_checks_signature_and_version_from_bytes_alone(
    built: Path, key: SigningKey
) -> None:
    from edgefed.common.artifact import verify_manifest

    manifest_bytes = (built / "manifest.json").read_bytes()
    signature_bytes = (built / "manifest.sig").read_bytes()
    manifest = verify_manifest(manifest_bytes, signature_bytes, key.verify_key, min_version=1)
    assert manifest.version >= 1
    stranger = SigningKey.generate().verify_key
    with pytest.raises(ArtifactRejected) as untrusted:
        verify_manifest(manifest_bytes, signature_bytes, stranger)
    assert untrusted.value.reason is RejectReason.UNTRUSTED_SIGNER
    with pytest.raises(ArtifactRejected) as too_low:
        verify_manifest(manifest_bytes, signature_bytes, key.verify_key, min_version=999)
    assert too_low.value.reason is RejectReason.VERSION_TOO_LOW
    with pytest.raises(ArtifactRejected) as edited:
        verify_manifest(
            manifest_bytes.replace(b'"version"', b'"version" '), signature_bytes, key.verify_key
        )
    assert edited.value.reason is RejectReason.BAD_SIGNATURE
