"""Distillation on tiny teachers: every task's loss moves the held-out metric the right way, the
run stops for the right reason, is deterministic, resumes from checkpoints exactly, and refuses
bad labels."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from edgefed.cloud.compress.config import DistillSettings, Task
from edgefed.cloud.compress.data import Example
from edgefed.cloud.compress.distill import (
    DistillProgress,
    DistillResult,
    ProgressCallback,
    distill,
)
from edgefed.cloud.compress.errors import DataError
from edgefed.cloud.compress.student import build_student, layer_stack
from edgefed.cloud.compress.teacher import Teacher, load_teacher

from .tiny_teachers import LABELS, LAYERS, save_model, sentences

TASKS: dict[str, Task] = {
    "bert": "feature-extraction",
    "cls": "text-classification",
    "gpt2": "text-generation",
    "distilbert": "feature-extraction",
    "llama": "text-generation",
}
TRAIN = [Example(s) for s in sentences(120)]
HOLDOUT = [Example(s) for s in sentences(24, offset=120)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and on a busy machine two spinning OpenMP
    threads can make a step 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Teacher]:
    root = tmp_path_factory.mktemp("distill")
    return {kind: load_teacher(save_model(kind, root / kind), task) for kind, task in TASKS.items()}


def _settings(**changes: object) -> DistillSettings:
    base: dict[str, object] = {
        "max_steps": 20,
        "batch_size": 8,
        "max_length": 32,
        "learning_rate": 1e-3,
        "eval_every": 5,
        "patience": 10,
        "seed": 0,
    }
    base.update(changes)
    return DistillSettings.model_validate(base)


def _student(teacher: Teacher, layers: list[int] | None = None) -> PreTrainedModel:
    return build_student(teacher.model, layers if layers is not None else [0, LAYERS - 1])


def _metrics(result: DistillResult) -> list[tuple[float, ...]]:
    """History without wall-clock times."""
    return [tuple(v for k, v in sorted(h.items()) if k != "elapsed_s") for h in result.history]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# --------------------------------------------------------------------------- every task learns


@pytest.mark.parametrize(("kind", "gain"), [("bert", 0.3), ("cls", 0.3), ("gpt2", 0.05)])
def test_distillation_improves_the_holdout_metric(
    teachers: dict[str, Teacher], kind: str, gain: float
) -> None:
    teacher = teachers[kind]
    student = _student(teacher)
    result = distill(teacher, student, TRAIN, HOLDOUT, _settings(max_steps=30, eval_every=10))
    holdouts = [h["holdout"] for h in result.history]
    assert [int(h["step"]) for h in result.history] == [0, 10, 20, 30]
    assert result.stopped == "max_steps"
    assert result.steps == 30
    assert result.resumed_from_step is None
    assert holdouts[-1] > holdouts[0] + gain, holdouts
    assert result.best_holdout == max(holdouts)
    assert result.best_step == 10 * holdouts.index(max(holdouts))
    assert "loss" not in result.history[0]
    assert all(h["loss"] > 0 for h in result.history[1:])
    assert not student.training


@pytest.mark.parametrize("kind", ["distilbert", "llama"])
def test_other_families_distill(teachers: dict[str, Teacher], kind: str) -> None:
    teacher = teachers[kind]
    result = distill(teacher, _student(teacher), TRAIN, HOLDOUT, _settings(max_steps=4))
    assert result.steps == 4
    assert result.history[-1]["holdout"] > result.history[0]["holdout"]


def test_the_best_weights_are_restored(teachers: dict[str, Teacher]) -> None:
    """A student with every teacher layer starts perfect (cosine 1); a learning rate far too high
    only makes it worse, so the run ends with the weights of step 0."""
    teacher = teachers["bert"]
    student = _student(teacher, list(range(LAYERS)))
    start = {k: v.clone() for k, v in student.state_dict().items()}
    settings = _settings(max_steps=10, learning_rate=0.05, warmup_ratio=0)
    result = distill(teacher, student, TRAIN, HOLDOUT, settings)
    assert result.best_step == 0
    assert result.history[-1]["holdout"] < result.best_holdout
    for name, value in student.state_dict().items():
        assert torch.equal(value, start[name]), name


# --------------------------------------------------------------------------- labels


def _labelled(examples: list[Example], labels: list[str | int]) -> list[Example]:
    return [Example(e.text, labels[i % len(labels)]) for i, e in enumerate(examples)]


def test_classification_uses_string_and_integer_labels(teachers: dict[str, Teacher]) -> None:
    teacher = teachers["cls"]
    settings = _settings(max_steps=4, eval_every=4)
    train = _labelled(TRAIN, [LABELS[0], 1])
    with_labels = distill(teacher, _student(teacher), train, HOLDOUT, settings)
    without = distill(teacher, _student(teacher), TRAIN, HOLDOUT, settings)
    # The cross-entropy on the labels adds to the KL loss.
    assert with_labels.history[-1]["loss"] > without.history[-1]["loss"]


def test_unknown_or_out_of_range_labels_are_refused(teachers: dict[str, Teacher]) -> None:
    teacher = teachers["cls"]
    settings = _settings(max_steps=1)
    with pytest.raises(
        DataError, match=r"training example 1 .* label 'neutral', which the teacher"
    ):
        distill(
            teacher, _student(teacher), _labelled(TRAIN, ["positive", "neutral"]), HOLDOUT, settings
        )
    with pytest.raises(DataError, match=r"label 2, outside the teacher's 2 classes 0\.\.1"):
        distill(teacher, _student(teacher), _labelled(TRAIN, [2]), HOLDOUT, settings)
    with pytest.raises(DataError, match=r"held-out example 0 .* label -1"):
        distill(teacher, _student(teacher), TRAIN, _labelled(HOLDOUT, [-1]), settings)


def test_empty_data_is_refused(teachers: dict[str, Teacher]) -> None:
    teacher = teachers["bert"]
    with pytest.raises(DataError, match="no training examples"):
        distill(teacher, _student(teacher), [], HOLDOUT, _settings())
    with pytest.raises(DataError, match="no held-out examples"):
        distill(teacher, _student(teacher), TRAIN, [], _settings())


# --------------------------------------------------------------------------- stopping


def test_early_stopping_after_patience_evaluations(teachers: dict[str, Teacher]) -> None:
    """A student with every teacher layer already agrees fully; it cannot improve."""
    teacher = teachers["cls"]
    student = _student(teacher, list(range(LAYERS)))
    result = distill(
        teacher, student, TRAIN, HOLDOUT, _settings(max_steps=50, eval_every=1, patience=2)
    )
    assert result.stopped == "early_stopping"
    assert result.steps == 2
    assert result.best_step == 0
    assert result.best_holdout == 1.0


def test_time_budget_stops_the_run(teachers: dict[str, Teacher]) -> None:
    teacher = teachers["bert"]
    settings = _settings(max_steps=1_000_000, eval_every=1_000_000, time_budget_s=0.5)
    result = distill(teacher, _student(teacher), TRAIN, HOLDOUT, settings)
    assert result.stopped == "time_budget"
    assert 0 < result.steps < 1_000_000
    assert [int(h["step"]) for h in result.history] == [0, result.steps]  # evaluated at the end


def test_zero_steps_only_evaluates(teachers: dict[str, Teacher]) -> None:
    teacher = teachers["bert"]
    result = distill(teacher, _student(teacher), TRAIN, HOLDOUT, _settings(max_steps=0))
    assert (result.steps, result.best_step, result.stopped) == (0, 0, "max_steps")
    assert len(result.history) == 1


def test_progress_is_reported_after_every_step(teachers: dict[str, Teacher]) -> None:
    teacher = teachers["gpt2"]
    reports: list[DistillProgress] = []
    distill(
        teacher,
        _student(teacher),
        TRAIN,
        HOLDOUT,
        _settings(max_steps=6, eval_every=3),
        progress=reports.append,
    )
    assert [r.step for r in reports] == [1, 2, 3, 4, 5, 6]
    assert all(r.total_steps == 6 for r in reports)
    assert [r.holdout is not None for r in reports] == [False, False, True, False, False, True]
    assert all(r.loss > 0 for r in reports)
    elapsed = [r.elapsed_s for r in reports]
    assert elapsed == sorted(elapsed)


# --------------------------------------------------------------------------- determinism, resume


def test_same_seed_same_weights(teachers: dict[str, Teacher]) -> None:
    teacher = teachers["bert"]
    settings = _settings(max_steps=8, eval_every=4)
    torch.use_deterministic_algorithms(True)
    try:
        a, b = _student(teacher), _student(teacher)
        result_a = distill(teacher, a, TRAIN, HOLDOUT, settings)
        result_b = distill(teacher, b, TRAIN, HOLDOUT, settings)
    finally:
        torch.use_deterministic_algorithms(False)
    _assert_same_weights(a, b)
    assert _metrics(result_a) == _metrics(result_b)
    other = _student(teacher)
    distill(teacher, other, TRAIN, HOLDOUT, _settings(max_steps=8, eval_every=4, seed=1))
    query = [layer_stack(m)[0].attention.self.query.weight for m in (other, a)]
    assert not torch.equal(*query)


def test_global_rng_and_threads_are_left_as_they_were(teachers: dict[str, Teacher]) -> None:
    teacher = teachers["bert"]
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    seen: list[int] = []
    torch.set_num_threads(2)
    try:
        distill(
            teacher,
            _student(teacher),
            TRAIN,
            HOLDOUT,
            _settings(max_steps=2),
            threads=1,
            progress=lambda _: seen.append(torch.get_num_threads()),
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert torch.equal(torch.rand(3), expected)
    assert seen == [1, 1]


class _Interrupted(Exception):
    pass


def _interrupt_at(step: int) -> ProgressCallback:
    def callback(report: DistillProgress) -> None:
        if report.step == step:
            raise _Interrupted

    return callback


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_resumed_run_equals_an_uninterrupted_run(
    teachers: dict[str, Teacher], kind: str, tmp_path: Path
) -> None:
    teacher = teachers[kind]
    straight_student = _student(teacher)
    straight = distill(teacher, straight_student, TRAIN, HOLDOUT, _settings(max_steps=20))

    settings = _settings(max_steps=20, checkpoint_dir=tmp_path, checkpoint_every=5)
    with pytest.raises(_Interrupted):  # a crash right after the checkpoint of step 10
        distill(teacher, _student(teacher), TRAIN, HOLDOUT, settings, progress=_interrupt_at(10))
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["state"]["step"] == 10
    assert state["layers"] == [0, LAYERS - 1]

    resumed_student = _student(teacher)
    resumed = distill(teacher, resumed_student, TRAIN, HOLDOUT, settings)
    assert resumed.resumed_from_step == 10
    assert resumed.steps == 20
    assert _metrics(resumed) == _metrics(straight)
    assert (resumed.best_step, resumed.best_holdout) == (straight.best_step, straight.best_holdout)
    for name, value in resumed_student.state_dict().items():
        torch.testing.assert_close(value, straight_student.state_dict()[name], rtol=0, atol=0)

    names = sorted(p.name for p in tmp_path.iterdir())
    best = f"best-{resumed.best_step:08d}.safetensors"
    assert names == sorted(
        ["state.json", "student-00000020.safetensors", "optimizer-00000020.pt", best]
    )
    # A finished run resumes to its end without training more.
    again = distill(teacher, _student(teacher), TRAIN, HOLDOUT, settings)
    assert (again.resumed_from_step, again.steps) == (20, 20)
    assert _metrics(again) == _metrics(straight)


def test_other_runs_checkpoint_starts_fresh_with_a_warning(
    teachers: dict[str, Teacher], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    teacher = teachers["bert"]
    distill(
        teacher, _student(teacher), TRAIN, HOLDOUT, _settings(max_steps=5, checkpoint_dir=tmp_path)
    )
    with caplog.at_level(logging.WARNING, logger="edgefed.cloud.compress.distill"):
        result = distill(
            teacher,
            _student(teacher),
            TRAIN,
            HOLDOUT,
            _settings(max_steps=5, checkpoint_dir=tmp_path, learning_rate=5e-4),
        )
    assert result.resumed_from_step is None
    assert result.steps == 5
    assert "belongs to a different run" in caplog.text

    # Other layers: a different run too.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgefed.cloud.compress.distill"):
        result = distill(
            teacher,
            _student(teacher, [0, 1]),
            TRAIN,
            HOLDOUT,
            _settings(max_steps=5, checkpoint_dir=tmp_path, learning_rate=5e-4),
        )
    assert result.resumed_from_step is None
    assert "belongs to a different run" in caplog.text


def test_damaged_checkpoint_starts_fresh_with_a_warning(
    teachers: dict[str, Teacher], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    teacher = teachers["bert"]
    settings = _settings(max_steps=5, checkpoint_dir=tmp_path)
    distill(teacher, _student(teacher), TRAIN, HOLDOUT, settings)
    (tmp_path / "student-00000005.safetensors").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="edgefed.cloud.compress.distill"):
        result = distill(teacher, _student(teacher), TRAIN, HOLDOUT, settings)
    assert result.resumed_from_step is None
    assert result.steps == 5
    assert "cannot resume" in caplog.text
