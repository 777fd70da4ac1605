"""The agent's model store: installed versions on disk, rollback floor, generation, and a
corrupted record that must not stop the agent."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from edgefed.common.artifact import Manifest, SigningKey, generate_signing_key, verify
from edgefed.common.errors import ArtifactRejected, RejectReason
from edgefed.common.schemas import DesiredModel
from edgefed.edge.store import INSTALLED_NAME, ModelStore, StoreError

from .random_artifacts import build, manifest_sha256


@pytest.fixture
def key() -> SigningKey:
    return generate_signing_key()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def _stage(
    store: ModelStore, tmp_path: Path, key: SigningKey, version: int, **desired: object
) -> tuple[Path, Manifest, DesiredModel]:
    """Build v``version`` of model "m" and copy it into the store's staging folder."""
    built = build(tmp_path / "built", key, version=version)
    staged = store.staging_dir("m", version)
    shutil.rmtree(staged)
    shutil.copytree(built, staged)
    manifest = verify(staged, key.verify_key)
    fields: dict[str, object] = {
        "name": "m",
        "version": version,
        "artifact_url": f"http://controller/m/v{version}",
        "manifest_sha256": manifest_sha256(staged),
    }
    fields.update(desired)
    return staged, manifest, DesiredModel.model_validate(fields)


def _install(
    store: ModelStore, tmp_path: Path, key: SigningKey, version: int, **desired: object
) -> Path:
    path = store.install(*_stage(store, tmp_path, key, version, **desired))
    store.activate("m", version)
    return path


def test_a_fresh_store_is_empty(state_dir: Path) -> None:
    store = ModelStore(state_dir)
    assert store.installed() == []
    assert store.current("m") is None
    assert store.floor("m") == 1
    assert store.generation == 0
    assert (state_dir / "models").is_dir()
    assert (state_dir / "staging").is_dir()


def test_install_and_activate_record_the_model_across_a_restart(
    state_dir: Path, tmp_path: Path, key: SigningKey
) -> None:
    store = ModelStore(state_dir)
    staged, manifest, desired = _stage(store, tmp_path, key, 3, max_batch_size=4)
    path = store.install(staged, manifest, desired)

    assert path == state_dir / "models" / "m" / "v3"
    assert not staged.exists()
    assert store.current("m") is None  # installed, not yet active
    store.activate("m", 3)
    assert verify(path, key.verify_key).version == 3

    reopened = ModelStore(state_dir)
    [record] = reopened.installed()
    assert (record.name, record.current, record.previous, record.highest) == ("m", 3, None, 3)
    assert record.settings == desired
    assert record.settings is not None
    assert record.settings.max_batch_size == 4
    assert reopened.floor("m") == 4
    assert reopened.path("m", 3).is_dir()


def test_a_new_version_keeps_the_previous_one_and_deletes_older(
    state_dir: Path, tmp_path: Path, key: SigningKey
) -> None:
    store = ModelStore(state_dir)
    _install(store, tmp_path, key, 1)
    shutil.rmtree(tmp_path / "built")
    _install(store, tmp_path, key, 2)
    record = store.get("m")
    assert record is not None
    assert (record.current, record.previous, record.highest) == (2, 1, 2)
    assert store.path("m", 1).is_dir()

    shutil.rmtree(tmp_path / "built")
    _install(store, tmp_path, key, 5)
    assert sorted(p.name for p in (state_dir / "models" / "m").iterdir()) == ["v2", "v5"]
    assert store.floor("m") == 6


def test_installing_the_current_version_again_is_a_no_op(
    state_dir: Path, tmp_path: Path, key: SigningKey
) -> None:
    store = ModelStore(state_dir)
    path = _install(store, tmp_path, key, 2)
    before = (path / "model.onnx").read_bytes()
    shutil.rmtree(tmp_path / "built")
    staged, manifest, desired = _stage(store, tmp_path, key, 2)  # other random bytes

    assert store.install(staged, manifest, desired) == path
    assert (path / "model.onnx").read_bytes() == before
    assert not staged.exists()


def test_a_lower_version_than_installed_is_refused(
    state_dir: Path, tmp_path: Path, key: SigningKey
) -> None:
    store = ModelStore(state_dir)
    _install(store, tmp_path, key, 5)
    shutil.rmtree(tmp_path / "built")
    staged, manifest, desired = _stage(store, tmp_path, key, 4)

    with pytest.raises(ArtifactRejected) as info:
        store.install(staged, manifest, desired)
    assert info.value.reason is RejectReason.VERSION_TOO_LOW
    assert not store.path("m", 4).exists()
    assert store.current("m") == 5


def test_rollback_returns_to_the_previous_version_and_keeps_the_floor(
    state_dir: Path, tmp_path: Path, key: SigningKey
) -> None:
    store = ModelStore(state_dir)
    _install(store, tmp_path, key, 1)
    shutil.rmtree(tmp_path / "built")
    _install(store, tmp_path, key, 2)

    assert store.rollback("m") == 1
    record = ModelStore(state_dir).get("m")
    assert record is not None
    assert (record.current, record.previous, record.highest) == (1, None, 2)
    assert not store.path("m", 2).exists()
    assert store.floor("m") == 3
    with pytest.raises(StoreError, match="no previous version"):
        store.rollback("m")


def test_a_version_installed_but_never_activated_is_removed_at_start(
    state_dir: Path, tmp_path: Path, key: SigningKey
) -> None:
    store = ModelStore(state_dir)
    _install(store, tmp_path, key, 1)
    shutil.rmtree(tmp_path / "built")
    store.install(*_stage(store, tmp_path, key, 2))  # the agent crashes before activate
    (state_dir / "staging" / "m" / "v3").mkdir(parents=True)
    (state_dir / "staging" / "m" / "v3" / "part").write_bytes(b"partial")

    reopened = ModelStore(state_dir)
    assert reopened.current("m") == 1
    assert not reopened.path("m", 2).exists()
    assert list((state_dir / "staging").iterdir()) == []


def test_discard_removes_a_failed_version_but_never_the_current_one(
    state_dir: Path, tmp_path: Path, key: SigningKey
) -> None:
    store = ModelStore(state_dir)
    _install(store, tmp_path, key, 1)
    shutil.rmtree(tmp_path / "built")
    store.install(*_stage(store, tmp_path, key, 2))

    store.discard("m", 2)
    store.discard("m", 1)
    assert not store.path("m", 2).exists()
    assert store.path("m", 1).is_dir()
    assert store.current("m") == 1
    assert store.floor("m") == 2


def test_the_generation_is_persisted_and_never_goes_down(state_dir: Path) -> None:
    store = ModelStore(state_dir)
    store.record_generation(7, digest="abc")
    store.record_generation(3)
    reopened = ModelStore(state_dir)
    assert reopened.generation == 7
    assert reopened.generation_digest == "abc"
    assert [p.name for p in state_dir.iterdir() if p.name.startswith(".")] == []  # no tmp left


def test_a_corrupted_record_is_moved_aside_and_the_store_starts_empty_with_floors_kept(
    state_dir: Path, tmp_path: Path, key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    store = ModelStore(state_dir)
    _install(store, tmp_path, key, 4)
    store.record_generation(9)
    (state_dir / INSTALLED_NAME).write_text('{"format": 1, "models": {"m": ')

    with caplog.at_level(logging.ERROR, logger="edgefed.edge.store"):
        reopened = ModelStore(state_dir)

    assert "corrupted" in caplog.text
    assert [p.name for p in state_dir.glob(f"{INSTALLED_NAME}.corrupt-*")] != []
    assert reopened.installed() == []
    assert reopened.generation == 0
    assert reopened.floor("m") == 5  # recovered from the version folder: never lower
    json.loads((state_dir / INSTALLED_NAME).read_text())  # a sound record again


def test_a_record_of_the_wrong_shape_is_treated_as_corrupted(state_dir: Path) -> None:
    state_dir.mkdir()
    (state_dir / INSTALLED_NAME).write_text('{"format": 1, "models": {"../x": {"name": "../x"}}}')
    assert ModelStore(state_dir).installed() == []


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden"])
def test_model_names_that_are_not_identifiers_are_refused(state_dir: Path, name: str) -> None:
    store = ModelStore(state_dir)
    with pytest.raises(StoreError):
        store.staging_dir(name, 1)
    with pytest.raises(StoreError):
        store.path(name, 1)


def test_a_disabled_model_stays_installed(state_dir: Path, tmp_path: Path, key: SigningKey) -> None:
    store = ModelStore(state_dir)
    _install(store, tmp_path, key, 1)
    store.set_enabled("m", False)
    record = ModelStore(state_dir).get("m")
    assert record is not None
    assert not record.enabled
    assert store.path("m", 1).is_dir()
