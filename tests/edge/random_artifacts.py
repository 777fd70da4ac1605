"""Small signed artifacts of random bytes, laid out the way the controller stub serves them
(``<store>/<name>/v<version>/<target>/``), for the store, fetch and reconcile tests. The bytes
are not a model: these tests are about moving and checking files, not running them."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgefed.common.artifact import (
    MANIFEST_NAME,
    Manifest,
    SigningKey,
    sign_manifest,
    write_artifact,
)
from edgefed.common.schemas import DesiredModel, DesiredState

from .controller_stub import ControllerStub, running_controller

TARGET = "x86-avx2"


def build(
    store: Path,
    key: SigningKey,
    *,
    name: str = "m",
    version: int = 1,
    size: int = 3000,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A signed artifact with ``model.onnx`` (``size`` random bytes), ``tokenizer.json`` and
    ``extra`` files, under the stub's store; returns its folder."""
    directory = store / name / f"v{version}" / TARGET
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(os.urandom(size))
    (directory / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    for rel, data in (extra or {}).items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    write_artifact(
        directory,
        name=name,
        version=version,
        task="text-classification",
        target=TARGET,
        signing_key=key,
    )
    return directory


def manifest_sha256(directory: Path) -> str:
    return hashlib.sha256((directory / MANIFEST_NAME).read_bytes()).hexdigest()


def rewrite_manifest(
    directory: Path, key: SigningKey, edit: Callable[[dict[str, Any]], None]
) -> None:
    """Edit ``manifest.json`` as JSON and sign the result with ``key`` (a validly signed,
    hand-crafted manifest)."""
    data = json.loads((directory / MANIFEST_NAME).read_bytes())
    edit(data)
    (directory / MANIFEST_NAME).write_text(json.dumps(data))
    sign_manifest(directory, key)


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def desired_model(stub: ControllerStub, directory: Path, **overrides: Any) -> DesiredModel:
    """The desired-state entry for an artifact built by :func:`build` and served by ``stub``."""
    manifest = Manifest.model_validate_json((directory / MANIFEST_NAME).read_bytes())
    fields: dict[str, Any] = {
        "name": manifest.name,
        "version": manifest.version,
        "artifact_url": stub.artifact_url(manifest.name, manifest.version, TARGET),
        "manifest_sha256": manifest_sha256(directory),
    }
    fields.update(overrides)
    return DesiredModel(**fields)


@contextmanager
def shared_controller(tmp: Path) -> Iterator[ControllerStub]:
    """One stub server for a whole test module: stopping one costs half a second."""
    stub = ControllerStub(
        store=tmp / "store", fleet="f", broker_url="mqtt://127.0.0.1:1883", signing_keys=[]
    )
    with running_controller(stub):
        yield stub


def reset(stub: ControllerStub, store: Path) -> ControllerStub:
    """Point a shared stub at a fresh store and forget what earlier tests did to it."""
    stub.store = store
    stub.requests.clear()
    stub.fail_after_bytes = None
    stub.agent_token = "agent-secret-token"
    return stub


def closed_port_url() -> str:
    """A loopback URL nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/v1/artifacts/m/v1/{TARGET}"


def desired_state(generation: int, *models: DesiredModel) -> DesiredState:
    return DesiredState(agent_id="agent-1", generation=generation, models=list(models))
