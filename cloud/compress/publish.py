"""Publishing: a compressed model becomes a signed artifact in the artifact store.

Layout of the store: ``<store>/<name>/v<version>/<target>/`` holding the ONNX model, its
tokenizer and config, ``manifest.json`` (with the validation report in ``metrics``) and
``manifest.sig``. A published version is never overwritten: versions only go up.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import onnx

from edgefed.cloud.compress.config import TargetProfile, Task
from edgefed.cloud.compress.errors import CompressionError
from edgefed.cloud.compress.quantize import quantization_config
from edgefed.cloud.compress.validate import ValidationReport
from edgefed.common.artifact import (
    MANIFEST_NAME,
    Manifest,
    Quantization,
    SigningKey,
    SplitInfo,
    TensorSpec,
    write_artifact,
)

#: Files of an exported model folder that an agent needs (tokenizer, config, graph).
_KEEP = re.compile(
    r"^(model\.onnx(_data)?|config\.json|generation_config\.json|tokenizer\.json|"
    r"tokenizer_config\.json|special_tokens_map\.json|vocab\.txt|vocab\.json|merges\.txt|"
    r"added_tokens\.json|sentencepiece\.bpe\.model|spiece\.model|tokenizer\.model)$"
)
_VERSION_DIR = re.compile(r"^v([0-9]+)$")


def artifact_dir(store: Path, name: str, version: int, target: str) -> Path:
    return store / name / f"v{version}" / target


def latest_version(store: Path, name: str) -> int:
    """Highest published version of ``name`` in the store (0 when none)."""
    root = store / name
    if not root.is_dir():
        return 0
    versions = [
        int(m.group(1))
        for child in root.iterdir()
        if (m := _VERSION_DIR.match(child.name))
        and any((t / MANIFEST_NAME).is_file() for t in child.iterdir() if t.is_dir())
    ]
    return max(versions, default=0)


def graph_specs(model_file: Path) -> tuple[list[TensorSpec], list[TensorSpec], int | None]:
    """Inputs, outputs and opset of an ONNX graph, read without loading its weights."""
    model = onnx.load(str(model_file), load_external_data=False)

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        dims: list[int | str] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tensor.shape.dim
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return TensorSpec(name=value.name, dtype=dtype, shape=dims)

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output], opset


def _quantization(target: TargetProfile) -> Quantization:
    int8 = target.scheme in ("dynamic-int8", "static-int8")
    reduce_range = (
        bool(quantization_config(target, is_static=target.scheme == "static-int8").reduce_range)
        if int8
        else False
    )
    return Quantization(scheme=target.scheme, per_channel=int8, reduce_range=reduce_range)


def publish(
    model_dir: Path,
    store: Path,
    *,
    name: str,
    version: int,
    task: Task,
    target: TargetProfile,
    signing_key: SigningKey,
    report: ValidationReport,
    parent_version: int | None = None,
    split: SplitInfo | None = None,
) -> tuple[Path, Manifest]:
    """Copy the model's files into the store and sign them as an artifact."""
    dest = artifact_dir(store, name, version, target.name)
    if (dest / MANIFEST_NAME).exists():
        raise CompressionError(
            f"{name} v{version} for {target.name} is already published at {dest}; "
            f"versions only go up: publish v{latest_version(store, name) + 1}"
        )
    if not (model_dir / "model.onnx").is_file():
        raise CompressionError(f"{model_dir} has no model.onnx to publish")
    if dest.exists():
        shutil.rmtree(dest)  # a half-written earlier attempt: no manifest, never verified
    dest.mkdir(parents=True)
    for item in sorted(model_dir.iterdir()):
        if item.is_file() and _KEEP.match(item.name):
            shutil.copy2(item, dest / item.name)
    inputs, outputs, opset = graph_specs(dest / "model.onnx")
    manifest = write_artifact(
        dest,
        name=name,
        version=version,
        task=task,
        target=target.name,
        signing_key=signing_key,
        inputs=inputs,
        outputs=outputs,
        quantization=_quantization(target),
        split=split,
        parent_version=parent_version,
        metrics=report.metrics(),
        opset=opset,
    )
    return dest, manifest
