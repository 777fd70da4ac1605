"""The compression pipeline end to end on tiny models: distil -> export -> quantize -> validate
-> gate -> signed artifact that verifies; and the errors a user meets with bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefed.cloud.compress.config import (
    CompressConfig,
    DistillSettings,
    GateThresholds,
    StudentSpec,
)
from edgefed.cloud.compress.errors import (
    CompressionError,
    DataError,
    StudentError,
    TeacherError,
    UnknownTargetError,
)
from edgefed.cloud.compress.pipeline import compress
from edgefed.common.artifact import load_verify_key, verify

from .tiny_teachers import LABELS, save_model, sentences

FAST = DistillSettings(max_steps=6, batch_size=8, max_length=32, eval_every=3, patience=3)
#: Tiny random models are not meant to reach production quality; these gates only say that
#: the pipeline measured something sensible. The broken-student test uses a strict one.
LOOSE = {
    "feature-extraction": GateThresholds(minimums={"cosine_mean": -1.0}),
    "text-classification": GateThresholds(minimums={"agreement": 0.0}),
    "text-generation": GateThresholds(minimums={"top1_agreement": 0.0}),
}


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, teacher: Path, task: str, **kw: object) -> CompressConfig:
    base: dict[str, object] = {
        "teacher_dir": teacher,
        "task": task,
        "out_dir": tmp_path / "store",
        "student": StudentSpec(depth=2),
        "distill": FAST,
        "gate": LOOSE[task],
        "max_examples": 80,
        "eval_examples": 16,
        "latency_repeats": 3,
    }
    base.update(kw)
    return CompressConfig(**base)  # type: ignore[arg-type]


def assert_published_and_verifies(result: object, store: Path, targets: list[str]) -> None:
    key = load_verify_key(store / "signing.pub")
    for t in result.targets:  # type: ignore[attr-defined]
        assert t.published, t.rejected
        assert t.target in targets
        manifest = verify(t.artifact_dir, key, min_version=1)
        assert manifest.target == t.target
        assert (t.artifact_dir / "model.onnx").is_file()
        assert any(k.startswith("quality.") for k in manifest.metrics)
        assert manifest.metrics["latency.speedup_b1"] > 0


def test_a_tiny_sentence_encoder_is_distilled_exported_quantized_and_published(
    tmp_path: Path,
) -> None:
    teacher = save_model("bert", tmp_path / "encoder")
    cfg = config(tmp_path, teacher, "feature-extraction", targets=("x86-avx2", "fp32"))

    result = compress(cfg)

    assert result.student_layers == [0, 3]
    assert result.parity.passed
    assert result.distillation is not None
    assert result.distillation.steps > 0
    assert_published_and_verifies(result, cfg.out_dir, ["x86-avx2", "fp32"])
    fp32 = next(t for t in result.targets if t.target == "fp32").report
    assert -1.0 <= fp32.quality["cosine_mean"] <= 1.0
    assert fp32.parameters < fp32.teacher_parameters


def test_a_tiny_classifier_with_string_labels_goes_through_and_reports_accuracy(
    tmp_path: Path,
) -> None:
    teacher = save_model("cls", tmp_path / "classifier")
    rows = [{"text": s, "label": LABELS[i % 2]} for i, s in enumerate(sentences(60))]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = config(tmp_path, teacher, "text-classification", data=data, targets=("arm64",))

    result = compress(cfg)

    assert_published_and_verifies(result, cfg.out_dir, ["arm64"])
    quality = result.targets[0].report.quality
    assert 0.0 <= quality["agreement"] <= 1.0
    assert 0.0 <= quality["accuracy"] <= 1.0
    assert "teacher_accuracy" in quality


def test_a_tiny_gpt2_is_exported_with_its_kv_cache_and_quantized_without_saturating(
    tmp_path: Path,
) -> None:
    teacher = save_model("gpt2", tmp_path / "gpt2")
    cfg = config(
        tmp_path,
        teacher,
        "text-generation",
        targets=("x86-avx2",),
        distill=DistillSettings(enabled=False),
        gate=GateThresholds(minimums={"top1_agreement": 0.8}, maximums={"perplexity_ratio": 1.2}),
    )

    result = compress(cfg)

    assert_published_and_verifies(result, cfg.out_dir, ["x86-avx2"])
    manifest = result.targets[0].manifest
    assert manifest is not None
    assert any(i.name.startswith("past_key_values") for i in manifest.inputs)
    quality = result.targets[0].report.quality
    assert quality["top1_agreement"] >= 0.8
    assert quality["perplexity_ratio"] <= 1.2


def test_the_gate_refuses_a_deliberately_broken_student_and_publishes_nothing(
    tmp_path: Path,
) -> None:
    teacher = save_model("bert", tmp_path / "encoder")
    # One layer kept out of four and no training at all: far from the teacher.
    cfg = config(
        tmp_path,
        teacher,
        "feature-extraction",
        student=StudentSpec(layers=(3,)),
        distill=FAST.model_copy(update={"max_steps": 0}),
        gate=GateThresholds(minimums={"cosine_mean": 0.999}),
    )

    result = compress(cfg)

    refused = result.targets[0]
    assert not refused.published
    assert refused.rejected is not None
    assert "cosine_mean" in refused.rejected.message
    assert "missed by" in refused.rejected.message
    measured, threshold = refused.rejected.shortfalls["cosine_mean"]
    assert measured < threshold == 0.999
    assert not (cfg.out_dir / cfg.teacher_dir.name).exists()


def test_versions_only_go_up_in_the_store(tmp_path: Path) -> None:
    teacher = save_model("bert", tmp_path / "encoder")
    cfg = config(tmp_path, teacher, "feature-extraction", distill=DistillSettings(enabled=False))

    first = compress(cfg)
    second = compress(cfg)

    assert (first.version, second.version) == (1, 2)
    with pytest.raises(CompressionError, match="versions only go up"):
        compress(cfg.model_copy(update={"version": 2}))


# --------------------------------------------------------------------------- bad input


def test_a_teacher_directory_that_does_not_exist_is_a_teacher_error(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="does not exist"):
        compress(config(tmp_path, tmp_path / "nope", "feature-extraction"))


def test_a_directory_that_is_not_a_model_is_a_teacher_error(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(TeacherError, match=r"config\.json"):
        compress(config(tmp_path, tmp_path / "notes", "feature-extraction"))


def test_an_unsupported_task_is_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task"):
        CompressConfig(teacher_dir=tmp_path, task="image-segmentation", out_dir=tmp_path)  # type: ignore[arg-type]


def test_an_unknown_target_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownTargetError, match="x86-avx2"):
        config(tmp_path, tmp_path, "feature-extraction", targets=("tpu-v9",))


def test_an_empty_data_file_is_a_data_error(tmp_path: Path) -> None:
    teacher = save_model("bert", tmp_path / "encoder")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError):
        compress(config(tmp_path, teacher, "feature-extraction", data=empty))


def test_a_malformed_jsonl_line_is_reported_with_its_line_number(tmp_path: Path) -> None:
    teacher = save_model("bert", tmp_path / "encoder")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="2"):
        compress(config(tmp_path, teacher, "feature-extraction", data=bad))


def test_a_student_with_more_layers_than_the_teacher_is_refused(tmp_path: Path) -> None:
    teacher = save_model("bert", tmp_path / "encoder")
    with pytest.raises(StudentError, match="more layers than the teacher"):
        compress(config(tmp_path, teacher, "feature-extraction", student=StudentSpec(depth=9)))
