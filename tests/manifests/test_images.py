"""The container images' Dockerfiles, linted (no Docker engine runs here: they are linted, not
built): hadolint's rules, then ours (pinned bases, multi-stage, numeric non-root user), and the
images the manifests run are these, at this version."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from edgefed import __version__

from .dockerfiles import base_images, dockerfile_problems
from .render import MANIFESTS, OVERLAYS, render_overlay, tool

IMAGES = MANIFESTS / "images"
DOCKERFILES = ("controller", "worker", "agent-cpu", "agent-jetson")
IMAGE_OF = {
    "ghcr.io/edgefed/edgefed-controller": "controller",
    "ghcr.io/edgefed/edgefed-worker": "worker",
    "ghcr.io/edgefed/edgefed-agent": "agent-cpu",
    "ghcr.io/edgefed/edgefed-agent-jetson": "agent-jetson",
}


def dockerfile(name: str) -> Path:
    return IMAGES / f"{name}.Dockerfile"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_dockerfile_passes_hadolint(name: str) -> None:
    result = hadolint(dockerfile(name))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_base_and_a_root_user(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nUSER root\nRUN pip install edgefed\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest
    assert "DL3002" in result.stdout  # last USER root


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_dockerfile_is_multi_stage_pinned_and_non_root(name: str) -> None:
    assert dockerfile_problems(dockerfile(name).read_text()) == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "ARG BASE=python:3.11-slim\nFROM ${BASE} AS build\nFROM python\nUSER 10001\n",
            "base image 'python' is not pinned to a version",
        ),
        (
            "FROM python:3.11-slim\nUSER 10001\n",
            "a single stage: build in one stage, copy the result into a fresh one",
        ),
        (
            "FROM python:3.11-slim AS b\nUSER 10001\nFROM python:3.11-slim\n",
            "the final stage sets no USER: it would run as root",
        ),
        (
            "FROM python:3.11-slim AS b\nFROM python:3.11-slim\nUSER edgefed\n",
            "the final USER 'edgefed' is not a numeric non-root UID",
        ),
    ],
)
def test_a_broken_dockerfile_is_caught(text: str, problem: str) -> None:
    assert dockerfile_problems(text) == [problem]


def test_the_cpu_agent_installs_the_light_edge_extra() -> None:
    instructions = [
        ln for ln in dockerfile("agent-cpu").read_text().splitlines() if not ln.startswith("#")
    ]
    assert 'RUN pip install ".[edge]"' in instructions
    assert not [ln for ln in instructions if "torch" in ln]


def test_the_jetson_agent_builds_on_l4t_with_onnxruntime_gpu_for_arm64() -> None:
    text = dockerfile("agent-jetson").read_text()
    assert all(i.startswith("nvcr.io/nvidia/l4t-jetpack:r36.") for i in base_images(text))
    assert "onnxruntime-gpu" in text
    assert "--platform linux/arm64" in text
    assert ".[edge]" not in text.replace("`edge` extra", "")  # CPU onnxruntime would clobber it


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_manifests_run_our_images_at_this_version(overlay: str) -> None:
    ours = set()
    for obj in render_overlay(overlay):
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            name, _, tag = c["image"].rpartition(":")
            if name in IMAGE_OF:
                assert tag == __version__, c["image"]
                ours.add(IMAGE_OF[name])
    assert ours
    assert all(dockerfile(n).is_file() for n in ours)
