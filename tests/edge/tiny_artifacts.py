"""Tiny models exported to ONNX and signed as real artifacts, for the edge agent's tests.

Built from configs in seconds (no downloads) with the real MiniLM WordPiece tokenizer, exported
with the cloud's own exporter (Optimum; decoders with a KV cache), then signed with
:func:`edgefed.common.artifact.write_artifact`, so that :class:`OnnxModel.load` gets a real
manifest. The torch models stay in memory for parity checks. Tests may import torch; the agent
never does.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
)

from edgefed.cloud.compress.config import Task
from edgefed.cloud.compress.export import export_onnx
from edgefed.cloud.compress.publish import graph_specs
from edgefed.common.artifact import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Manifest,
    SigningKey,
    generate_signing_key,
    write_artifact,
)
from tests.compress.tiny_hf import SENTENCES, tokenizer

__all__ = [
    "LABELS",
    "SENTENCES",
    "TinyArtifact",
    "TinyArtifacts",
    "build_tiny_artifacts",
    "resign",
]

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
MAX_POSITIONS = 128


@dataclass
class TinyArtifact:
    """One tiny model: its torch module, the Hugging Face folder, the signed ONNX artifact."""

    name: str
    task: Task
    model: PreTrainedModel
    hf_dir: Path
    dir: Path
    manifest: Manifest


@dataclass
class TinyArtifacts:
    key: SigningKey
    tokenizer: Any
    embed: TinyArtifact
    classify: TinyArtifact
    generate: TinyArtifact


def _bert_config(vocab: int, **extra: Any) -> BertConfig:
    return BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        **extra,
    )


def _build(kind: str, tok: Any) -> PreTrainedModel:
    torch.manual_seed(0)
    vocab = tok.vocab_size
    model: PreTrainedModel
    if kind == "embed":
        model = BertModel(_bert_config(vocab))
    elif kind == "classify":
        model = BertForSequenceClassification(
            _bert_config(
                vocab,
                num_labels=len(LABELS),
                id2label=LABELS,
                label2id={v: k for k, v in LABELS.items()},
            )
        )
    else:
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=MAX_POSITIONS,
                bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id,
                initializer_range=0.1,
            )
        )
    return model.eval()


def _sign(directory: Path, name: str, version: int, task: Task, key: SigningKey) -> Manifest:
    inputs, outputs, opset = graph_specs(directory / "model.onnx")
    return write_artifact(
        directory,
        name=name,
        version=version,
        task=task,
        target="x86-avx2",
        signing_key=key,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
    )


def build_tiny_artifacts(root: Path) -> TinyArtifacts:
    """Build, export and sign the three tiny models under ``root`` (~10 s)."""
    key = generate_signing_key()
    tok = tokenizer()
    built: dict[str, TinyArtifact] = {}
    tasks: dict[str, Task] = {
        "embed": "feature-extraction",
        "classify": "text-classification",
        "generate": "text-generation",
    }
    for kind, task in tasks.items():
        model = _build(kind, tok)
        hf_dir = root / f"{kind}-hf"
        model.save_pretrained(hf_dir)
        tok.save_pretrained(hf_dir)
        art = root / f"{kind}-v1"
        export_onnx(hf_dir, art, task)
        name = f"tiny-{kind}"
        built[kind] = TinyArtifact(name, task, model, hf_dir, art, _sign(art, name, 1, task, key))
    return TinyArtifacts(key, tok, built["embed"], built["classify"], built["generate"])


def resign(
    src: Path,
    dest: Path,
    *,
    key: SigningKey,
    version: int,
    name: str | None = None,
    edit_json: dict[str, dict[str, Any]] | None = None,
    drop: tuple[str, ...] = (),
) -> Manifest:
    """Copy an artifact to ``dest`` as another version (optionally renamed, with JSON files
    edited or files dropped) and sign it again."""
    manifest = Manifest.model_validate_json((src / MANIFEST_NAME).read_bytes())
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(MANIFEST_NAME, SIGNATURE_NAME))
    for file_name, updates in (edit_json or {}).items():
        path = dest / file_name
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update(updates)
        path.write_text(json.dumps(data))
    for file_name in drop:
        (dest / file_name).unlink()
    return _sign(dest, name or manifest.name, version, manifest.task, key)
