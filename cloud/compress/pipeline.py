"""The compression pipeline: teacher -> student -> distil -> ONNX -> quantize per target ->
validate -> gate -> signed artifact.

Intermediate files go to ``<out>/.work/<name>-v<version>/`` (distillation checkpoints there
let an interrupted run resume); artifacts to ``<out>/<name>/v<version>/<target>/``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefed.cloud.compress.config import CompressConfig, target_profile
from edgefed.cloud.compress.data import Example, load_examples, split_holdout
from edgefed.cloud.compress.distill import DistillResult, ProgressCallback, distill
from edgefed.cloud.compress.errors import CompressionError, DataError, QualityGateError
from edgefed.cloud.compress.export import ParityReport, check_parity, export_onnx
from edgefed.cloud.compress.publish import latest_version, publish
from edgefed.cloud.compress.quantize import quantize
from edgefed.cloud.compress.runtime import OnnxRunner, TorchRunner
from edgefed.cloud.compress.student import build_student, parameter_count, select_layers
from edgefed.cloud.compress.teacher import Teacher, load_teacher
from edgefed.cloud.compress.validate import (
    ValidationReport,
    check_gate,
    latency_report,
    quality_report,
)
from edgefed.common.artifact import Manifest, SigningKey, generate_signing_key, load_signing_key

log = logging.getLogger(__name__)

StepCallback = Callable[[str], None]


@dataclass
class TargetResult:
    target: str
    report: ValidationReport
    artifact_dir: Path | None = None
    manifest: Manifest | None = None
    rejected: QualityGateError | None = None

    @property
    def published(self) -> bool:
        return self.manifest is not None


@dataclass
class CompressResult:
    name: str
    version: int
    task: str
    student_layers: list[int] | None
    parity: ParityReport
    distillation: DistillResult | None
    targets: list[TargetResult] = field(default_factory=list)
    signing_key_file: Path | None = None

    @property
    def all_published(self) -> bool:
        return all(t.published for t in self.targets)


def _labels(examples: Sequence[Example], teacher: Teacher) -> np.ndarray | None:
    """Held-out labels as class ids of the teacher, or None when the data has none."""
    if not examples or any(e.label is None for e in examples):
        return None
    label2id = {str(k): int(v) for k, v in (teacher.model.config.label2id or {}).items()}
    num_labels = int(teacher.model.config.num_labels)
    out = []
    for e in examples:
        if isinstance(e.label, int) and 0 <= e.label < num_labels:
            out.append(e.label)
        elif isinstance(e.label, str) and e.label in label2id:
            out.append(label2id[e.label])
        else:
            raise DataError(
                f"label {e.label!r} is not one of the teacher's labels: {sorted(label2id)}"
            )
    return np.asarray(out)


def _signing_key(config: CompressConfig) -> tuple[SigningKey, Path]:
    if config.signing_key is not None:
        return load_signing_key(config.signing_key), config.signing_key
    path = config.out_dir / "signing.key"
    if path.exists():
        return load_signing_key(path), path
    key = generate_signing_key()
    key.save(path)
    key.verify_key.save(path.with_suffix(".pub"))
    log.info("generated signing key %s (public key %s)", path, path.with_suffix(".pub"))
    return key, path


_OFFSET_POSITIONS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}
"""Models whose position ids start after the padding index: that many positions are unusable."""


def token_budget(config: Any, longest: int = 128) -> int:
    """Tokens per text the validation may use: ``longest``, or fewer when the model has fewer
    positions (a small student -- a federated one, say -- may have only 64)."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or limit <= 0:
        return longest
    limit -= _OFFSET_POSITIONS.get(str(getattr(config, "model_type", "")), 0)
    return max(8, min(longest, limit))


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix != ".json")


def compress(
    config: CompressConfig,
    *,
    on_step: StepCallback | None = None,
    on_distill: ProgressCallback | None = None,
) -> CompressResult:
    """Run the whole pipeline for every target of ``config``.

    Targets below the quality gate are reported (``TargetResult.rejected``) and not published;
    the others are signed and written to the store.
    """
    step = on_step or (lambda _msg: None)
    name = config.name or config.teacher_dir.resolve().name
    published_before = latest_version(config.out_dir, name)
    version = config.version if config.version is not None else published_before + 1
    if version <= published_before:
        raise CompressionError(
            f"{name} v{version} is not newer than the published v{published_before}; "
            f"versions only go up (use v{published_before + 1})"
        )
    profiles = [target_profile(t) for t in config.targets]
    work = config.out_dir / ".work" / f"{name}-v{version}"
    work.mkdir(parents=True, exist_ok=True)

    step(f"loading teacher {config.teacher_dir} ({config.task})")
    teacher = load_teacher(config.teacher_dir, config.task)
    examples = load_examples(config.data, task=config.task, max_examples=config.max_examples)
    train, holdout = split_holdout(examples, config.distill.holdout_fraction, config.distill.seed)
    step(f"{len(train)} training and {len(holdout)} held-out examples")

    distilled: DistillResult | None = None
    layers: list[int] | None = None
    if config.distill.enabled:
        n_teacher = int(teacher.model.config.num_hidden_layers)
        layers = select_layers(n_teacher, config.student)
        step(f"student keeps teacher layers {layers} of {n_teacher}")
        model = build_student(teacher.model, layers)
        settings = config.distill
        if settings.checkpoint_dir is None:
            settings = settings.model_copy(update={"checkpoint_dir": work / "checkpoints"})
        distilled = distill(teacher, model, train, holdout, settings, progress=on_distill)
        step(
            f"distilled {distilled.steps} steps ({distilled.stopped}); best held-out "
            f"{distilled.best_holdout:.4f} at step {distilled.best_step}"
        )
    else:
        model = teacher.model
        step("distillation off: exporting the teacher as it is")

    student_dir = work / "student"
    if student_dir.exists():
        shutil.rmtree(student_dir)
    model.save_pretrained(student_dir)
    teacher.tokenizer.save_pretrained(student_dir)

    step("exporting to ONNX with Optimum (opset 18)")
    fp32_dir = export_onnx(student_dir, work / "onnx-fp32", config.task)
    parity_texts = [e.text for e in holdout[:16]] or ["edgefed"]
    parity = check_parity(model, teacher.tokenizer, fp32_dir, config.task, parity_texts)
    if not parity.passed:
        raise CompressionError(f"ONNX export does not match torch: {parity.detail}")
    step(f"ONNX parity with torch: max |diff| {parity.max_abs_diff:.2e}")

    eval_examples = holdout[: config.eval_examples]
    eval_texts = [e.text for e in eval_examples]
    labels = _labels(eval_examples, teacher) if config.task == "text-classification" else None
    teacher_runner = TorchRunner(teacher.model, config.task)
    calibration = (teacher.tokenizer, [e.text for e in train[:128]])
    tokens = token_budget(teacher.model.config)
    signing_key, key_file = _signing_key(config)
    result = CompressResult(
        name=name,
        version=version,
        task=config.task,
        student_layers=layers,
        parity=parity,
        distillation=distilled,
        signing_key_file=key_file,
    )
    teacher_params = parameter_count(teacher.model)
    for profile in profiles:
        step(f"{profile.name}: quantizing ({profile.scheme})")
        qdir = quantize(
            fp32_dir,
            work / profile.name,
            profile,
            task=config.task,
            calibration=calibration,
            max_length=tokens,
        )
        runner = OnnxRunner(qdir, config.task)
        quality = quality_report(
            config.task,
            teacher_runner,
            runner,
            teacher.tokenizer,
            eval_texts,
            labels=labels,
            max_length=tokens,
        )
        step(f"{profile.name}: timing against the teacher (b1, b32, {tokens} tokens)")
        latency = latency_report(
            teacher_runner,
            runner,
            teacher.tokenizer,
            eval_texts,
            seq_len=tokens,
            repeats=config.latency_repeats,
        )
        report = ValidationReport(
            target=profile.name,
            task=config.task,
            quality=quality,
            latency=latency,
            size_bytes=_dir_size(qdir),
            parameters=parameter_count(model),
            teacher_parameters=teacher_params,
            providers=list(runner.providers),
            examples=len(eval_texts),
        )
        target_result = TargetResult(profile.name, report)
        result.targets.append(target_result)
        try:
            check_gate(report, config.gate_for_task())
        except QualityGateError as exc:
            target_result.rejected = exc
            step(f"refused by the quality gate: {exc.message}")
            continue
        target_result.artifact_dir, target_result.manifest = publish(
            qdir,
            config.out_dir,
            name=name,
            version=version,
            task=config.task,
            target=profile,
            signing_key=signing_key,
            report=report,
            parent_version=published_before or None,
        )
        step(f"{profile.name}: published {target_result.artifact_dir}")
    return result
