"""Artifact downloads against a real HTTP server (the controller stub): the good path, every
attack refused with its reason before (or without) installing anything, resumption with
Range requests, and the errors that say whether a retry helps."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefed.common.artifact import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Manifest,
    SigningKey,
    generate_signing_key,
)
from edgefed.common.errors import ArtifactRejected, PermanentError, RejectReason
from edgefed.common.settings import ArtifactSettings
from edgefed.edge.errors import FetchError
from edgefed.edge.fetch import (
    ArtifactAccessDenied,
    ArtifactFetcher,
    ArtifactNotFound,
    fetch_artifact,
)

from .controller_stub import ControllerStub
from .random_artifacts import (
    TARGET,
    build,
    closed_port_url,
    flip_byte,
    manifest_sha256,
    reset,
    rewrite_manifest,
    shared_controller,
)


@pytest.fixture
def key() -> SigningKey:
    return generate_signing_key()


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerStub]:
    with shared_controller(tmp_path_factory.mktemp("controller")) as stub:
        yield stub


@pytest.fixture
def stub(controller: ControllerStub, tmp_path: Path) -> ControllerStub:
    return reset(controller, tmp_path / "store")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as c:
        yield c


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "agent" / "staging" / "m" / "v1"


async def _fetch(
    stub: ControllerStub,
    client: httpx.AsyncClient,
    key: SigningKey,
    dest: Path,
    *,
    version: int = 1,
    **kwargs: Any,
) -> Manifest:
    options: dict[str, Any] = {
        "token": stub.agent_token,
        "trusted_keys": [key.verify_key],
        "min_version": 1,
        "limits": ArtifactSettings(),
        "retries": 2,
        "backoff_s": 0.01,
    }
    options.update(kwargs)
    return await fetch_artifact(
        stub.artifact_url("m", version, TARGET), dest, client=client, **options
    )


async def _rejected(*args: Any, **kwargs: Any) -> ArtifactRejected:
    with pytest.raises(ArtifactRejected) as info:
        await _fetch(*args, **kwargs)
    return info.value


def _file_requests(stub: ControllerStub) -> list[tuple[str, str | None]]:
    """(file name, Range header) of every model-file download the stub served."""
    return [
        (path.rsplit("/", 1)[-1], rng)
        for method, path, rng in stub.requests
        if method == "GET" and not path.endswith((MANIFEST_NAME, SIGNATURE_NAME))
    ]


def _exists(path: Path) -> bool:
    return path.exists()


# --------------------------------------------------------------------------- the good path


async def test_a_good_artifact_downloads_and_verifies(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    source = build(stub.store, key, extra={"sub/dir/config.json": b'{"a": 1}'})
    progress: list[tuple[int, int]] = []

    manifest = await _fetch(
        stub,
        client,
        key,
        dest,
        expected_manifest_sha256=manifest_sha256(source),
        on_progress=lambda done, total: progress.append((done, total)),
    )

    assert (manifest.name, manifest.version) == ("m", 1)
    for entry in manifest.files:
        assert (dest / entry.path).read_bytes() == (source / entry.path).read_bytes()
    assert (dest / MANIFEST_NAME).read_bytes() == (source / MANIFEST_NAME).read_bytes()
    assert progress[-1] == (manifest.total_size, manifest.total_size)
    assert all(rng is None for _, rng in _file_requests(stub))


async def test_the_bound_fetcher_is_the_same_download(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    build(stub.store, key)
    fetcher = ArtifactFetcher(client, stub.agent_token, [key.verify_key], ArtifactSettings())
    manifest = await fetcher(stub.artifact_url("m", 1, TARGET), dest, min_version=1)
    assert manifest.file("model.onnx").size == 3000


async def test_a_complete_file_is_not_downloaded_again(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    build(stub.store, key)
    await _fetch(stub, client, key, dest)
    stub.requests.clear()

    await _fetch(stub, client, key, dest)
    assert _file_requests(stub) == []


async def test_files_left_from_an_earlier_attempt_are_removed_before_verifying(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    build(stub.store, key)
    (dest / "old" / "deep").mkdir(parents=True)
    (dest / "old" / "deep" / "stale.bin").write_bytes(b"stale")
    (dest / ".hidden").write_bytes(b"x")

    await _fetch(stub, client, key, dest)
    assert sorted(os.listdir(dest)) == [
        MANIFEST_NAME,
        SIGNATURE_NAME,
        "model.onnx",
        "tokenizer.json",
    ]


async def test_a_symlink_planted_in_the_download_folder_is_never_written_through(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path, tmp_path: Path
) -> None:
    build(stub.store, key)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"precious")
    os.makedirs(dest)
    os.symlink(outside, dest / "model.onnx")

    await _fetch(stub, client, key, dest)
    assert outside.read_bytes() == b"precious"
    assert not (dest / "model.onnx").is_symlink()


# --------------------------------------------------------------------------- attacks


async def test_one_flipped_byte_is_rejected_as_a_hash_mismatch(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    source = build(stub.store, key)
    flip_byte(source / "model.onnx")
    err = await _rejected(stub, client, key, dest)
    assert err.reason is RejectReason.HASH_MISMATCH
    assert "model.onnx" in err.detail


async def test_an_unsigned_artifact_is_rejected_before_any_model_byte(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    source = build(stub.store, key)
    (source / SIGNATURE_NAME).unlink()
    err = await _rejected(stub, client, key, dest)
    assert err.reason is RejectReason.MISSING_SIGNATURE
    assert _file_requests(stub) == []
    assert not _exists(dest)


async def test_an_artifact_signed_by_another_key_is_rejected_before_any_model_byte(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    build(stub.store, generate_signing_key())
    err = await _rejected(stub, client, key, dest)
    assert err.reason is RejectReason.UNTRUSTED_SIGNER
    assert _file_requests(stub) == []


async def test_an_older_version_than_installed_is_rejected_before_any_model_byte(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    build(stub.store, key, version=2)
    err = await _rejected(stub, client, key, dest, version=2, min_version=3)
    assert err.reason is RejectReason.VERSION_TOO_LOW
    assert _file_requests(stub) == []


async def test_a_manifest_other_than_the_desired_state_names_is_rejected(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    build(stub.store, key)
    wanted = hashlib.sha256(b"another manifest").hexdigest()
    err = await _rejected(stub, client, key, dest, expected_manifest_sha256=wanted)
    assert err.reason is RejectReason.HASH_MISMATCH
    assert "desired state" in err.detail
    assert wanted in err.detail
    assert _file_requests(stub) == []


async def test_a_file_over_the_limits_is_rejected_before_it_is_downloaded(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    build(stub.store, key, size=5000)
    err = await _rejected(stub, client, key, dest, limits=ArtifactSettings(max_file_bytes=4096))
    assert err.reason is RejectReason.OVERSIZED
    assert _file_requests(stub) == []


async def test_a_file_longer_than_declared_is_never_written_past_its_size(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    source = build(stub.store, key)
    with (source / "model.onnx").open("ab") as fh:
        fh.write(os.urandom(10_000))  # the server's copy grew after signing
    err = await _rejected(stub, client, key, dest)
    assert err.reason is RejectReason.SIZE_MISMATCH
    assert (dest / "model.onnx").stat().st_size <= 3000


async def test_a_manifest_bigger_than_the_cap_is_rejected_unread(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    source = build(stub.store, key)
    (source / MANIFEST_NAME).write_bytes(b" " * (1024 * 1024 + 1))
    err = await _rejected(stub, client, key, dest)
    assert err.reason is RejectReason.OVERSIZED


async def test_a_path_traversal_entry_signed_by_the_trusted_key_is_rejected(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    source = build(stub.store, key)
    (source.parent / "evil").write_bytes(b"outside")

    def escape(m: dict[str, Any]) -> None:
        m["files"].append(
            {"path": "../evil", "sha256": hashlib.sha256(b"outside").hexdigest(), "size": 7}
        )

    rewrite_manifest(source, key, escape)
    err = await _rejected(stub, client, key, dest)
    assert err.reason is RejectReason.UNSAFE_PATH
    assert "../evil" in err.detail
    assert _file_requests(stub) == []
    assert not (dest.parent / "evil").exists()


# --------------------------------------------------------------------------- resumption


async def test_a_cut_download_is_retried_with_range_requests_and_completes(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    source = build(stub.store, key, size=3000)
    stub.fail_after_bytes = 1000

    await _fetch(stub, client, key, dest, retries=1)

    assert (dest / "model.onnx").read_bytes() == (source / "model.onnx").read_bytes()
    ranges = [rng for name, rng in _file_requests(stub) if name == "model.onnx"]
    assert ranges == [None, "bytes=1000-", "bytes=2000-"]


async def test_a_download_that_keeps_failing_is_a_temporary_error_and_resumes_later(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    source = build(stub.store, key, size=3000)
    stub.fail_after_bytes = 1200

    with pytest.raises(FetchError) as info:
        await _fetch(stub, client, key, dest, retries=0)
    assert info.value.retryable
    assert (dest / "model.onnx").stat().st_size == 1200

    stub.fail_after_bytes = None
    stub.requests.clear()
    await _fetch(stub, client, key, dest)
    assert (dest / "model.onnx").read_bytes() == (source / "model.onnx").read_bytes()
    assert ("model.onnx", "bytes=1200-") in _file_requests(stub)


async def test_another_artifacts_partial_download_is_discarded(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    build(stub.store, key)
    await _fetch(stub, client, key, dest)
    (dest / "model.onnx").write_bytes(b"partial of something else")
    (dest / MANIFEST_NAME).write_bytes(b'{"another": "manifest"}')
    stub.requests.clear()

    await _fetch(stub, client, key, dest)
    assert ("model.onnx", None) in _file_requests(stub)


# --------------------------------------------------------------------------- HTTP errors


async def test_a_refused_agent_token_is_a_permanent_error(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    build(stub.store, key)
    with pytest.raises(ArtifactAccessDenied, match="agent token") as info:
        await _fetch(stub, client, key, dest, token="wrong-token")
    assert isinstance(info.value, PermanentError)
    assert info.value.exit_code == 77


async def test_a_missing_artifact_is_a_permanent_not_found(
    stub: ControllerStub, client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    with pytest.raises(ArtifactNotFound, match="artifact not found"):
        await _fetch(stub, client, key, dest, version=9)


async def test_an_unreachable_controller_is_a_temporary_error(
    client: httpx.AsyncClient, key: SigningKey, dest: Path
) -> None:
    with pytest.raises(FetchError) as info:
        await fetch_artifact(
            closed_port_url(),
            dest,
            client=client,
            token="t",
            trusted_keys=[key.verify_key],
            min_version=1,
            limits=ArtifactSettings(),
            retries=1,
            backoff_s=0.01,
        )
    assert info.value.retryable
    assert "ConnectError" in str(info.value)
