"""Publishing split pairs: ``edgefed split publish`` (and :func:`publish_split`) profiles a real
tiny encoder, signs head and tail of each split point with the controller's key into its store,
registers them like any other artifact, and stores the profile where the controller's split
placement finds it; bad input is refused before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from edgefed.cloud.api.app import open_controller
from edgefed.cloud.compress.errors import UnknownTargetError
from edgefed.cloud.registry.models import Artifact, Model, ModelVersion
from edgefed.cloud.settings import load_cloud_settings
from edgefed.cloud.split import SplitPointError
from edgefed.cloud.split.publish import (
    ProfileMissing,
    SplitPublishError,
    parse_split_points,
    publish_split,
    read_profile,
    registered_split_points,
)
from edgefed.common.artifact import verify
from tests.cloud.rollout import conftest as rollout
from tests.cloud.rollout.conftest import TARGET, Cloud
from tests.cloud.split.tiny_split import build

cloud = rollout.cloud  # the rollout tests' controller state (registry, store, key), reused

NAME = "tiny-bert"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("split-publish") / "model"
    build("bert", out)
    return out


def registered(cloud: Cloud) -> dict[str, list[tuple[int, str]]]:
    """Registered artifacts: model name -> [(version, target)]."""
    with cloud.state.sessions() as s:
        rows = s.execute(
            select(Model.name, ModelVersion.version, Artifact.target)
            .join(ModelVersion, ModelVersion.model_id == Model.id)
            .join(Artifact, Artifact.version_id == ModelVersion.id)
        ).all()
    out: dict[str, list[tuple[int, str]]] = {}
    for name, version, target in rows:
        out.setdefault(name, []).append((version, target))
    return out


def test_published_pairs_are_signed_registered_and_planned_from(
    cloud: Cloud, tiny_bert: Path
) -> None:
    with cloud.sessions() as session:
        done = publish_split(
            tiny_bert,
            store=cloud.store,
            session=session,
            name=NAME,
            version=3,
            split_points=[2, 1, 2],
            target=TARGET,
            signing_key=cloud.state.signing_key,
            seq=16,
        )
        session.commit()

    assert done.split_points == (1, 2)
    assert registered(cloud) == {
        f"{NAME}.k{k}.{role}": [(3, TARGET)] for k in (1, 2) for role in ("head", "tail")
    }
    for k, arts in done.artifacts.items():
        head = verify(arts.head_dir, cloud.state.signing_key.verify_key)
        assert (head.name, head.version, head.target) == (f"{NAME}.k{k}.head", 3, TARGET)
        assert head.split is not None
        assert (head.split.role, head.split.split_point) == ("head", k)
    profile = read_profile(cloud.store, NAME, 3)
    assert done.profile_file == cloud.store / NAME / "v3" / "split-profile.json"
    assert (profile.num_layers, profile.kind, profile.device) == (4, "encoder", "reference")
    with cloud.state.sessions() as s:
        assert registered_split_points(s, NAME, 3, TARGET) == {1, 2}
        assert registered_split_points(s, NAME, 3, "arm64") == set()  # no head for that target
        assert registered_split_points(s, NAME, 2, TARGET) == set()


def test_bad_split_points_and_targets_are_refused_before_anything_is_written(
    cloud: Cloud, tiny_bert: Path
) -> None:
    def attempt(points: list[int], target: str = TARGET) -> None:
        with cloud.sessions() as session:
            publish_split(
                tiny_bert,
                store=cloud.store,
                session=session,
                name=NAME,
                version=1,
                split_points=points,
                target=target,
                signing_key=cloud.state.signing_key,
                seq=16,
            )

    with pytest.raises(SplitPointError, match="out of range for a model with 4 layers"):
        attempt([1, 4])
    with pytest.raises(SplitPointError, match="at least one split point"):
        attempt([])
    with pytest.raises(UnknownTargetError, match="unknown target 'toaster'"):
        attempt([1], "toaster")
    with pytest.raises(SplitPointError, match=r"e\.g\. 2,4"):
        parse_split_points("2,x")

    assert list(cloud.store.iterdir()) == []
    assert registered(cloud) == {}
    with pytest.raises(ProfileMissing, match="edgefed split publish"):
        read_profile(cloud.store, NAME, 1)


def test_a_version_already_published_is_never_overwritten(cloud: Cloud, tiny_bert: Path) -> None:
    def publish() -> None:
        with cloud.sessions() as session:
            publish_split(
                tiny_bert,
                store=cloud.store,
                session=session,
                name=NAME,
                version=1,
                split_points=[2],
                target="fp32",
                signing_key=cloud.state.signing_key,
                seq=16,
            )
            session.commit()

    publish()
    before = (cloud.store / f"{NAME}.k2.head" / "v1" / "fp32" / "manifest.json").read_bytes()
    with pytest.raises(SplitPublishError, match="already published"):
        publish()

    after = (cloud.store / f"{NAME}.k2.head" / "v1" / "fp32" / "manifest.json").read_bytes()
    assert after == before
    assert registered(cloud)[f"{NAME}.k2.head"] == [(1, "fp32")]


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    env["EDGEFED_CONTROLLER__DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "edgefed.cli", "split", "publish", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def test_the_cli_publishes_into_the_controllers_store_and_registry(
    tmp_path: Path, tiny_bert: Path
) -> None:
    data_dir = tmp_path / "controller"
    common = ("--name", NAME, "--version", "1", "--seq", "16")
    ok = _cli(data_dir, str(tiny_bert), *common, "--split-points", "1,3", "--target", "fp32")
    bad = _cli(data_dir, str(tiny_bert), *common, "--split-points", "1,x")

    assert ok.returncode == 0, ok.stderr
    assert "split-profile.json" in ok.stdout
    assert bad.returncode == 65
    assert "e.g. 2,4" in bad.stderr
    settings = load_cloud_settings(controller={"data_dir": str(data_dir)})
    state = open_controller(settings)
    try:
        with state.sessions() as s:
            assert registered_split_points(s, NAME, 1, "fp32") == {1, 3}
        assert read_profile(state.artifact_store, NAME, 1).num_layers == 4
    finally:
        state.engine.dispose()
