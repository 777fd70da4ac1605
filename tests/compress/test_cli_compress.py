"""`edgefed compress` as a user runs it: a process, a table, exit codes, a verifiable artifact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .tiny_teachers import save_model

EDGEFED = [sys.executable, "-m", "edgefed.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    env.update({"COLUMNS": "160", "HF_HUB_OFFLINE": "1"})
    return subprocess.run([*EDGEFED, *args], capture_output=True, text=True, timeout=300, env=env)


def test_compress_publishes_a_signed_artifact_and_prints_the_report_table(
    tmp_path: Path,
) -> None:
    teacher = save_model("bert", tmp_path / "tiny-encoder")
    store = tmp_path / "store"

    result = run(
        "compress", str(teacher), "--task", "feature-extraction", "--target", "x86-avx2",
        "--out", str(store), "--max-steps", "4", "--batch-size", "8", "--max-examples", "60",
        "--min", "cosine_mean=-1",
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert "tiny-encoder v1 (feature-extraction)" in result.stdout
    assert "published" in result.stdout
    assert "cosine_mean" in result.stdout
    artifact = store / "tiny-encoder" / "v1" / "x86-avx2"
    verified = run("artifact", "verify", str(artifact), "--trust", str(store / "signing.pub"))
    assert verified.returncode == 0, verified.stderr


def test_compress_exits_65_and_says_by_how_much_a_refused_model_missed(tmp_path: Path) -> None:
    teacher = save_model("bert", tmp_path / "tiny-encoder")
    store = tmp_path / "store"

    result = run(
        "compress", str(teacher), "--task", "feature-extraction", "--out", str(store),
        "--layers", "3", "--max-steps", "0", "--max-examples", "40", "--min", "cosine_mean=0.999",
    )  # fmt: skip

    assert result.returncode == 65
    assert "refused" in result.stdout
    assert "missed by" in result.stdout
    assert not (store / "tiny-encoder").exists()


def test_compress_with_an_unknown_target_is_a_configuration_error(tmp_path: Path) -> None:
    result = run(
        "compress", str(tmp_path), "--task", "feature-extraction", "--target", "tpu-v9",
        "--out", str(tmp_path / "store"),
    )  # fmt: skip
    assert result.returncode == 78
    assert "unknown target 'tpu-v9'" in result.stderr


def test_compress_of_a_missing_teacher_says_so(tmp_path: Path) -> None:
    result = run(
        "compress", str(tmp_path / "nope"), "--task", "feature-extraction",
        "--out", str(tmp_path / "store"),
    )  # fmt: skip
    assert result.returncode == 65
    assert "does not exist" in result.stderr
