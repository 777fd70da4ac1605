"""An agent's ``max_artifact_bytes`` (a small device's own limit) caps the artifact limits it
verifies with: a bigger artifact is refused as oversized before it is downloaded. (The agent
used to ignore the setting; row 7 of the fault suite shows it end to end.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefed.common.errors import ArtifactRejected, RejectReason
from edgefed.common.settings import ArtifactSettings
from edgefed.edge.config import AgentConfig


def _config(tmp_path: Path, cap: int) -> AgentConfig:
    return AgentConfig(
        agent_id="a1",
        fleet="f",
        controller_url="http://127.0.0.1:9",
        broker_url="mqtt://127.0.0.1:1883",
        trusted_keys=["k"],
        state_dir=tmp_path,
        max_artifact_bytes=cap,
    )


def test_the_device_limit_caps_each_file_and_the_whole_artifact(tmp_path: Path) -> None:
    limits = _config(tmp_path, 1000).artifact_limits(ArtifactSettings())

    assert limits.max_file_bytes == 1000
    assert limits.max_total_bytes == 1000
    assert limits.max_files == ArtifactSettings().max_files


def test_a_stricter_process_setting_stays_in_force(tmp_path: Path) -> None:
    strict = ArtifactSettings(max_file_bytes=10, max_total_bytes=20)
    limits = _config(tmp_path, 1000).artifact_limits(strict)

    assert (limits.max_file_bytes, limits.max_total_bytes) == (10, 20)


def test_a_manifest_over_the_device_limit_is_refused_as_oversized(tmp_path: Path) -> None:
    from edgefed.common.artifact import generate_signing_key, verify, write_artifact

    key = generate_signing_key()
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "model.onnx").write_bytes(b"x" * 2000)
    write_artifact(
        tmp_path / "art", name="m", version=1, task="feature-extraction", target="x86-avx2",
        signing_key=key,
    )  # fmt: skip
    limits = _config(tmp_path / "state", 1000).artifact_limits(ArtifactSettings())

    with pytest.raises(ArtifactRejected) as info:
        verify(tmp_path / "art", [key.verify_key], min_version=1, limits=limits)
    assert info.value.reason == RejectReason.OVERSIZED
