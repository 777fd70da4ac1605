"""A signed manifest declares its graph's inputs and outputs (the controller, routers and split
partners plan with them); an agent must not serve a graph that is not what its manifest says,
and must serve one that is, whatever its symbolic dimensions are called."""

from __future__ import annotations

from typing import Any

import pytest

from edgefed.common.artifact import Manifest, TensorSpec
from edgefed.common.serving.errors import ModelLoadError
from edgefed.common.serving.runtime import OnnxModel

from .tiny_artifacts import TinyArtifacts


def _load(tiny: TinyArtifacts, manifest: Manifest) -> OnnxModel:
    return OnnxModel.load(tiny.embed.dir, manifest, providers=["CPUExecutionProvider"])


def _with(manifest: Manifest, **update: Any) -> Manifest:
    return manifest.model_copy(update=update)


def _renamed_dims(specs: list[TensorSpec]) -> list[TensorSpec]:
    return [
        s.model_copy(update={"shape": [d if isinstance(d, int) else f"n{i}" for i, d in
                                       enumerate(s.shape)]})
        for s in specs
    ]  # fmt: skip


def test_the_declared_graph_loads_whatever_its_symbolic_dimensions_are_called(
    tiny_artifacts: TinyArtifacts,
) -> None:
    manifest = tiny_artifacts.embed.manifest
    assert manifest.inputs
    assert manifest.outputs
    renamed = _with(
        manifest, inputs=_renamed_dims(manifest.inputs), outputs=_renamed_dims(manifest.outputs)
    )
    assert _load(tiny_artifacts, renamed).version == manifest.version


def _widened_output(manifest: Manifest) -> Manifest:
    first = manifest.outputs[0]
    wide = first.model_copy(update={"shape": [*first.shape[:-1], 64]})
    return _with(manifest, outputs=[wide, *manifest.outputs[1:]])


def _fixed_batch(manifest: Manifest) -> Manifest:
    first = manifest.inputs[0]
    fixed = first.model_copy(update={"shape": [1, *first.shape[1:]]})
    return _with(manifest, inputs=[fixed, *manifest.inputs[1:]])


def _float_input(manifest: Manifest) -> Manifest:
    first = manifest.inputs[0]
    return _with(manifest, inputs=[first.model_copy(update={"dtype": "float32"}),
                                   *manifest.inputs[1:]])  # fmt: skip


def _missing_input(manifest: Manifest) -> Manifest:
    return _with(manifest, inputs=manifest.inputs[1:])


def _phantom_output(manifest: Manifest) -> Manifest:
    ghost = TensorSpec(name="pooler_logits", dtype="float32", shape=["batch", 2])
    return _with(manifest, outputs=[*manifest.outputs, ghost])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_widened_output, r"output '\w+': the graph has float32 \[.*, 32\], the manifest "
                          r"declares float32 \[.*, 64\]"),
        (_fixed_batch, r"input '\w+': the graph has int64 \[\w+, .*the manifest declares "
                       r"int64 \[1, "),
        (_float_input, r"the manifest declares float32"),
        (_missing_input, r"input '\w+': the manifest does not declare it"),
        (_phantom_output, r"output 'pooler_logits': the graph has no such output"),
    ],
)  # fmt: skip
def test_a_graph_unlike_its_manifest_is_refused_naming_the_difference(
    tiny_artifacts: TinyArtifacts, edit: Any, message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        _load(tiny_artifacts, edit(tiny_artifacts.embed.manifest))
