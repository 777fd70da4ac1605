"""Knowledge distillation of a student from its teacher (torch, CPU-friendly).

Losses per task (teacher in eval mode under ``no_grad``, student trained in place):

- ``feature-extraction``: ``1 - cosine`` between the student's and the teacher's L2-normalised
  mean-pooled last hidden states, plus ``hidden_weight`` times the mean squared error between
  mapped hidden states (embedding output to embedding output, student layer ``i`` to teacher
  layer ``edgefed_teacher_layers[i]``, padding excluded).
- ``text-classification``: ``KL(teacher/T || student/T) * T**2``, plus ``label_weight`` times the
  cross-entropy on examples that carry a label.
- ``text-generation``: next-token ``KL(teacher/T || student/T) * T**2`` over every non-padding
  position.

The held-out metric (higher is better) is the mean cosine of pooled embeddings, the top-1
agreement with the teacher's class, or the top-1 agreement with the teacher's next token (over
non-padding positions; agreement rather than KL because it reads the same at every
temperature and is what the quality gate reports).

Determinism: the training batches are a pure function of ``(seed, step)`` and the global torch
RNG is re-seeded from ``(seed, step)`` before every step (dropout) inside a forked RNG state that
is restored on return, so the same seed and data give the same weights, and a run resumed from a
checkpoint continues exactly as if it had not stopped.

Checkpoints (``settings.checkpoint_dir``): ``student-STEP.safetensors`` (current weights),
``best-STEP.safetensors`` (best weights so far), ``optimizer-STEP.pt`` (optimizer and scheduler
state) and ``state.json`` (step, best, history, layers, fingerprint, file names), written last
and atomically so it always names complete files. The fingerprint covers the teacher path, the
layer mapping, the data and every setting that shapes the trajectory; the run length
(``max_steps``, ``time_budget_s``, ``patience``) and the evaluation/checkpoint cadence are left
out so a run can be extended (the learning-rate schedule then follows the new ``max_steps``). A
run resumed after a crash with the same settings ends exactly where an uninterrupted run would;
one stopped by its time budget was also evaluated at that step, which can only make its best
weights better or its early stop sooner. A checkpoint of another run (or a damaged one) is
ignored with a logged warning and overwritten by the new run's checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from safetensors import safe_open
from safetensors.torch import save_file
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgefed.cloud.compress.config import DistillSettings
from edgefed.cloud.compress.data import Example
from edgefed.cloud.compress.errors import DataError, StudentError
from edgefed.cloud.compress.student import layer_stack, teacher_layer_map
from edgefed.cloud.compress.teacher import Teacher

log = logging.getLogger(__name__)

StopReason = Literal["max_steps", "time_budget", "early_stopping"]
StateDict = dict[str, torch.Tensor]

_STATE_FILE = "state.json"
_CHECKPOINT_FORMAT = 1
_IGNORE_INDEX = -100
_MAX_GRAD_NORM = 1.0
_RUN_LENGTH_FIELDS = frozenset(
    {
        "enabled",
        "max_steps",
        "time_budget_s",
        "patience",
        "eval_every",
        "checkpoint_dir",
        "checkpoint_every",
    }
)
"""Settings that do not change the training trajectory; left out of the fingerprint."""


@dataclass
class DistillProgress:
    """Reported after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    holdout: float | None
    """The held-out metric when this step was evaluated, else None."""
    elapsed_s: float
    """Seconds since this call started."""


ProgressCallback = Callable[[DistillProgress], None]


@dataclass
class DistillResult:
    """How a distillation run went; the student holds the weights of ``best_step``."""

    steps: int
    best_step: int
    best_holdout: float
    history: list[dict[str, float]]
    """One entry per evaluation: step, holdout, loss (mean training loss since the previous
    evaluation; absent at step 0) and elapsed_s (training seconds, across resumed runs)."""
    stopped: StopReason
    resumed_from_step: int | None


# --------------------------------------------------------------------------- entry point


def distill(
    teacher: Teacher,
    student: PreTrainedModel,
    train: Sequence[Example],
    holdout: Sequence[Example],
    settings: DistillSettings,
    *,
    progress: ProgressCallback | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> DistillResult:
    """Train ``student`` in place to imitate ``teacher`` on ``train``; keep the weights that
    scored best on ``holdout`` (evaluated before training, every ``eval_every`` steps and at the
    end). Stops at ``max_steps``, after ``time_budget_s`` seconds of this call, or after
    ``patience`` evaluations without improvement. Resumes from ``settings.checkpoint_dir`` when
    it holds a checkpoint of the same run. ``settings.enabled`` is the caller's business.
    The student is left in eval mode, moved to ``device`` like the teacher. ``threads`` sets
    torch's intra-op thread count for this call only (one thread is often faster for small
    models on a busy machine)."""
    if not train:
        raise DataError("no training examples to distill on")
    if not holdout:
        raise DataError("no held-out examples to evaluate the student on")
    dev = torch.device(device)
    run = _Run(teacher, student, train, holdout, settings, progress, dev)
    with (
        torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []),
        _intra_op_threads(threads),
    ):
        return run.execute()


@contextlib.contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` torch threads inside the block (no change when None)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- batches


@dataclass
class _Batch:
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    """Class indices, ``-100`` where an example has no label (classification only)."""


class _Encoder:
    """Tokenizes texts into padded model inputs (dynamic padding, truncation to max_length)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        keep_token_types: bool,
        device: torch.device,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.keep_token_types = keep_token_types
        self.device = device

    def __call__(self, examples: Sequence[Example], labels: list[int] | None) -> _Batch:
        encoded = self.tokenizer(
            [e.text for e in examples],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        names = ["input_ids", "attention_mask"]
        if self.keep_token_types and "token_type_ids" in encoded:
            names.append("token_type_ids")
        inputs = {name: encoded[name].to(self.device) for name in names}
        label_tensor = None if labels is None else torch.tensor(labels, device=self.device)
        return _Batch(inputs, label_tensor)


class _Schedule:
    """Which training examples form the batch of each step: per epoch a permutation seeded by
    ``(seed, epoch)``, consumed in order (a batch may span two epochs). A pure function of the
    step, so a resumed run sees exactly the batches an uninterrupted run would.

    With ``lengths``, each window of ``_BUCKET_BATCHES`` batches of the shuffled order is sorted
    by length, cut into batches and those batches shuffled again: batches hold texts of similar
    length, so dynamic padding wastes little compute (about half the tokens of a random batch
    of 5-40-word sentences), while the data each window covers stays random."""

    def __init__(
        self, n: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None
    ) -> None:
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.lengths = lengths
        self._epochs: dict[int, list[int]] = {}

    def indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [
            self._permutation(p // self.n)[p % self.n]
            for p in range(start, start + self.batch_size)
        ]

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            order = list(range(self.n))
            rng = random.Random(_mix(self.seed, epoch))  # noqa: S311 - not a secret
            rng.shuffle(order)
            if self.lengths is not None:
                order = self._bucketed(order, rng)
            self._epochs = {epoch: order}  # only the current epoch (and the next) are needed
        return self._epochs[epoch]

    def _bucketed(self, order: list[int], rng: random.Random) -> list[int]:
        assert self.lengths is not None
        window = self.batch_size * _BUCKET_BATCHES
        out: list[int] = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: self.lengths[i])  # type: ignore[index]
            batches = [
                chunk[b : b + self.batch_size] for b in range(0, len(chunk), self.batch_size)
            ]
            rng.shuffle(batches)
            out.extend(i for batch in batches for i in batch)
        return out


_BUCKET_BATCHES = 50


def _mix(seed: int, value: int) -> int:
    """A 63-bit seed derived from two integers (stable across processes and platforms)."""
    digest = hashlib.sha256(f"{seed}:{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# --------------------------------------------------------------------------- objectives


class _Objective(Protocol):
    def loss(
        self, student: PreTrainedModel, teacher: PreTrainedModel, batch: _Batch
    ) -> torch.Tensor:
        """Training loss of one batch (graph attached to the student)."""

    def reference(self, teacher: PreTrainedModel, batch: _Batch) -> torch.Tensor:
        """What the student is scored against on a held-out batch (computed once)."""

    def score(
        self, student: PreTrainedModel, batch: _Batch, reference: torch.Tensor
    ) -> tuple[float, int]:
        """Sum of the per-item metric and the number of items of one held-out batch."""


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(student.dtype)
    squared = (student - teacher).pow(2) * weights
    return squared.sum() / (weights.sum() * student.shape[-1]).clamp(min=1.0)


def _soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened distributions over the last dimension,
    averaged over the rows and scaled by ``t**2`` (Hinton et al.)."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )


class _EmbeddingObjective:
    """Sentence embeddings: pooled cosine plus hidden-state alignment along the layer map."""

    def __init__(self, layer_map: list[int], hidden_weight: float) -> None:
        # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of layer i.
        self.pairs = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(layer_map)]
        self.hidden_weight = hidden_weight

    def loss(
        self, student: PreTrainedModel, teacher: PreTrainedModel, batch: _Batch
    ) -> torch.Tensor:
        want_hidden = self.hidden_weight > 0
        mask = batch.inputs["attention_mask"]
        with torch.no_grad():
            t_out = teacher(**batch.inputs, output_hidden_states=want_hidden)
        s_out = student(**batch.inputs, output_hidden_states=want_hidden)
        s_pool = F.normalize(_mean_pool(s_out.last_hidden_state, mask), dim=-1)
        t_pool = F.normalize(_mean_pool(t_out.last_hidden_state, mask), dim=-1)
        loss = 1 - (s_pool * t_pool).sum(-1).mean()
        if want_hidden:
            mse = torch.stack(
                [
                    _masked_mse(s_out.hidden_states[s], t_out.hidden_states[t], mask)
                    for s, t in self.pairs
                ]
            ).mean()
            loss = loss + self.hidden_weight * mse
        return loss

    def reference(self, teacher: PreTrainedModel, batch: _Batch) -> torch.Tensor:
        out = teacher(**batch.inputs)
        return _mean_pool(out.last_hidden_state, batch.inputs["attention_mask"])

    def score(
        self, student: PreTrainedModel, batch: _Batch, reference: torch.Tensor
    ) -> tuple[float, int]:
        pooled = _mean_pool(
            student(**batch.inputs).last_hidden_state, batch.inputs["attention_mask"]
        )
        return float(F.cosine_similarity(pooled, reference, dim=-1).sum()), len(pooled)


class _ClassifierObjective:
    """Classification: soft-label KL with temperature, plus hard labels where present."""

    def __init__(self, temperature: float, label_weight: float) -> None:
        self.temperature = temperature
        self.label_weight = label_weight

    def loss(
        self, student: PreTrainedModel, teacher: PreTrainedModel, batch: _Batch
    ) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(**batch.inputs).logits
        s_logits = student(**batch.inputs).logits
        loss = _soft_kl(s_logits, t_logits, self.temperature)
        labels = batch.labels
        if labels is not None and self.label_weight > 0 and bool((labels != _IGNORE_INDEX).any()):
            hard = F.cross_entropy(s_logits, labels, ignore_index=_IGNORE_INDEX)
            loss = loss + self.label_weight * hard
        return loss

    def reference(self, teacher: PreTrainedModel, batch: _Batch) -> torch.Tensor:
        logits: torch.Tensor = teacher(**batch.inputs).logits
        return logits.argmax(-1)

    def score(
        self, student: PreTrainedModel, batch: _Batch, reference: torch.Tensor
    ) -> tuple[float, int]:
        predicted = student(**batch.inputs).logits.argmax(-1)
        return float((predicted == reference).sum()), len(predicted)


class _CausalLMObjective:
    """Decoders: next-token KL with temperature on the non-padding positions."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def loss(
        self, student: PreTrainedModel, teacher: PreTrainedModel, batch: _Batch
    ) -> torch.Tensor:
        keep = batch.inputs["attention_mask"].bool()
        with torch.no_grad():
            t_logits = teacher(**batch.inputs).logits[keep]
        s_logits = student(**batch.inputs).logits[keep]
        return _soft_kl(s_logits, t_logits, self.temperature)

    def reference(self, teacher: PreTrainedModel, batch: _Batch) -> torch.Tensor:
        keep = batch.inputs["attention_mask"].bool()
        logits: torch.Tensor = teacher(**batch.inputs).logits
        return logits[keep].argmax(-1)

    def score(
        self, student: PreTrainedModel, batch: _Batch, reference: torch.Tensor
    ) -> tuple[float, int]:
        keep = batch.inputs["attention_mask"].bool()
        predicted = student(**batch.inputs).logits[keep].argmax(-1)
        return float((predicted == reference).sum()), len(predicted)


def _objective(
    teacher: Teacher, student: PreTrainedModel, layer_map: list[int], settings: DistillSettings
) -> _Objective:
    if teacher.task == "text-classification":
        return _ClassifierObjective(settings.temperature, settings.label_weight)
    if teacher.task == "text-generation":
        return _CausalLMObjective(settings.temperature)
    if settings.hidden_weight > 0:
        _check_hidden_sizes(teacher.model, student)
    return _EmbeddingObjective(layer_map, settings.hidden_weight)


def _check_hidden_sizes(teacher: PreTrainedModel, student: PreTrainedModel) -> None:
    t_size = getattr(teacher.config, "hidden_size", None)
    s_size = getattr(student.config, "hidden_size", None)
    if t_size != s_size:
        raise StudentError(
            f"hidden-state alignment needs equal hidden sizes (teacher {t_size}, student "
            f"{s_size}); set hidden_weight to 0 for a narrower student"
        )


def _move(model: torch.nn.Module, device: torch.device) -> None:
    model.to(device)  # in place for modules


def _set_training(model: torch.nn.Module, training: bool) -> None:
    model.train(training)


def _linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LambdaLR:
    """Learning rate rising linearly over ``warmup`` steps, then falling linearly to zero at
    ``total`` (the schedule of transformers' ``get_linear_schedule_with_warmup``)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- labels


def _label_ids(examples: Sequence[Example], model: PreTrainedModel, part: str) -> list[int]:
    """Class index per example (``-100`` without a label), checked against the teacher's
    ``label2id`` (names) and ``num_labels`` (indices)."""
    label2id: dict[str, int] = dict(getattr(model.config, "label2id", None) or {})
    num_labels = int(model.config.num_labels)
    ids = []
    for number, example in enumerate(examples):
        label = example.label
        if label is None:
            ids.append(_IGNORE_INDEX)
        elif isinstance(label, str):
            if label not in label2id:
                known = ", ".join(repr(k) for k in label2id)
                raise DataError(
                    f"{part} example {number} ({example.text[:40]!r}) has label {label!r}, which "
                    f"the teacher does not know; its labels: {known}"
                )
            ids.append(label2id[label])
        elif 0 <= label < num_labels:
            ids.append(label)
        else:
            raise DataError(
                f"{part} example {number} ({example.text[:40]!r}) has label {label}, outside the "
                f"teacher's {num_labels} classes 0..{num_labels - 1}"
            )
    return ids


# --------------------------------------------------------------------------- weights on disk


def _snapshot(model: torch.nn.Module) -> StateDict:
    """A detached copy of the model's state; tensors that share memory in the model (tied
    embeddings) stay one shared tensor in the copy."""
    copies: dict[tuple[Any, ...], torch.Tensor] = {}
    state: StateDict = {}
    for name, tensor in model.state_dict().items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if key not in copies:
            copies[key] = tensor.detach().clone()
        state[name] = copies[key]
    return state


def _save_weights(state: StateDict, path: Path) -> None:
    """Write a state dict with safetensors; shared tensors are written once and the other names
    recorded as aliases in the file's metadata."""
    tensors: StateDict = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, tensor in state.items():
        if id(tensor) in first_name:
            aliases[name] = first_name[id(tensor)]
        else:
            first_name[id(tensor)] = name
            tensors[name] = tensor.contiguous()
    tmp = _tmp_path(path)
    save_file(tensors, str(tmp), metadata={"aliases": json.dumps(aliases)})
    os.replace(tmp, path)


def _load_weights(path: Path) -> StateDict:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors: StateDict = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    for name, target in json.loads(metadata.get("aliases", "{}")).items():
        tensors[name] = tensors[target]
    return tensors


def _check_fits(state: StateDict, model: torch.nn.Module, path: Path) -> None:
    """Raise ValueError unless ``state`` has exactly the model's tensor names and shapes."""
    expected = {name: (t.shape, t.dtype) for name, t in model.state_dict().items()}
    found = {name: (t.shape, t.dtype) for name, t in state.items()}
    if expected != found:
        raise ValueError(f"{path.name} does not match the student's parameters")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = _tmp_path(path)
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- run state


@dataclass
class _State:
    """Everything beyond weights and optimizer that a resumed run needs (JSON-serialisable)."""

    step: int = 0
    best_step: int = 0
    best_holdout: float = -math.inf
    bad_evals: int = 0
    """Evaluations since the last improvement."""
    last_eval_step: int = -1
    loss_sum: float = 0.0
    loss_count: int = 0
    """Training losses since the last evaluation (for the history's mean loss)."""
    elapsed_s: float = 0.0
    """Training seconds of earlier (resumed-from) calls."""
    stopped: StopReason | None = None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Checkpoint:
    state: _State
    weights: StateDict
    best: StateDict
    best_file: str
    optimizer: dict[str, Any]


# --------------------------------------------------------------------------- the run


class _Run:
    """One call of :func:`distill`: optimizer, schedule, evaluation, checkpoints."""

    def __init__(
        self,
        teacher: Teacher,
        student: PreTrainedModel,
        train: Sequence[Example],
        holdout: Sequence[Example],
        settings: DistillSettings,
        progress: ProgressCallback | None,
        device: torch.device,
    ) -> None:
        _move(teacher.model, device)
        _move(student, device)
        _set_training(teacher.model, False)  # frozen: eval mode, forward under no_grad
        self.teacher = teacher.model
        self.student = student
        self.train_examples = list(train)
        self.settings = settings
        self.progress = progress
        self.layer_map = teacher_layer_map(student, len(layer_stack(teacher.model)))
        self.objective = _objective(teacher, student, self.layer_map, settings)
        classify = teacher.task == "text-classification"
        self.train_labels = _label_ids(train, teacher.model, "training") if classify else None
        if classify:
            _label_ids(holdout, teacher.model, "held-out")
        # Token types only for models with a token type embedding (BERT family): GPT-2 would
        # add them through its word embeddings, DistilBERT's forward does not take them.
        token_types = getattr(teacher.model.config, "type_vocab_size", 0) or 0
        self.encode = _Encoder(teacher.tokenizer, settings.max_length, token_types > 0, device)
        self.schedule = _Schedule(
            len(self.train_examples),
            settings.batch_size,
            settings.seed,
            [len(e.text) for e in self.train_examples],
        )
        self.holdout_batches = [
            self.encode(holdout[i : i + settings.batch_size], None)
            for i in range(0, len(holdout), settings.batch_size)
        ]
        self.optimizer = self._make_optimizer()
        self.scheduler = _linear_schedule(
            self.optimizer, round(settings.warmup_ratio * settings.max_steps), settings.max_steps
        )
        self.fingerprint = _fingerprint(teacher, self.layer_map, settings, train, holdout)
        self.state = _State()
        self.best_weights: StateDict = {}
        self.references: list[torch.Tensor] = []
        self.started = 0.0
        self.best_file: str | None = None
        """Name of the best-weights file this run wrote or resumed from."""

    # ---- set-up

    def _make_optimizer(self) -> torch.optim.AdamW:
        """AdamW; biases and norm weights (1-D parameters) get no weight decay."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.settings.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.settings.learning_rate,
        )

    # ---- main loop

    def execute(self) -> DistillResult:
        self.started = time.monotonic()
        resumed = self._resume()
        with torch.no_grad():
            self.references = [
                self.objective.reference(self.teacher, b) for b in self.holdout_batches
            ]
        if resumed is None:
            self.best_weights = _snapshot(self.student)
            self._evaluate()
        log.info(
            "distilling %s: step %d of at most %d, held-out %.4f",
            type(self.student).__name__,
            self.state.step,
            self.settings.max_steps,
            self.state.history[-1]["holdout"],
        )
        patience_left = self.state.bad_evals < self.settings.patience
        stopped: StopReason = self._train() if patience_left else "early_stopping"
        if self.state.last_eval_step != self.state.step:
            self._evaluate()
        self.state.stopped = stopped
        if self.settings.checkpoint_dir is not None:
            self._save_checkpoint(self.settings.checkpoint_dir)
        self.student.load_state_dict(self.best_weights)
        _set_training(self.student, False)
        log.info(
            "distillation stopped (%s) after %d steps; best held-out %.4f at step %d",
            stopped,
            self.state.step,
            self.state.best_holdout,
            self.state.best_step,
        )
        return DistillResult(
            steps=self.state.step,
            best_step=self.state.best_step,
            best_holdout=self.state.best_holdout,
            history=[dict(h) for h in self.state.history],
            stopped=stopped,
            resumed_from_step=resumed,
        )

    def _train(self) -> StopReason:
        settings = self.settings
        _set_training(self.student, True)
        while True:
            if self.state.step >= settings.max_steps:
                return "max_steps"
            if settings.time_budget_s is not None and self._elapsed() >= settings.time_budget_s:
                return "time_budget"
            loss = self._step()
            holdout = self._evaluate() if self.state.step % settings.eval_every == 0 else None
            if (
                settings.checkpoint_dir is not None
                and self.state.step % settings.checkpoint_every == 0
            ):
                self._save_checkpoint(settings.checkpoint_dir)
            if self.progress is not None:
                self.progress(
                    DistillProgress(
                        self.state.step,
                        self._expected_total_steps(),
                        loss,
                        holdout,
                        self._elapsed(),
                    )
                )
            if self.state.bad_evals >= settings.patience:
                return "early_stopping"

    def _step(self) -> float:
        """One optimizer step on the batch of the current step; returns its loss."""
        step = self.state.step
        torch.manual_seed(_mix(self.settings.seed, step))  # dropout masks of this step
        indices = self.schedule.indices(step)
        labels = None if self.train_labels is None else [self.train_labels[i] for i in indices]
        batch = self.encode([self.train_examples[i] for i in indices], labels)
        loss = self.objective.loss(self.student, self.teacher, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            self.student.load_state_dict(self.best_weights)
            raise StudentError(
                f"distillation diverged at step {step + 1} (loss {value}); the student keeps its "
                "best weights so far; try a lower learning rate"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), _MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        if self.settings.time_budget_s is not None:
            self._follow_time_budget()
        self.state.loss_sum += value
        self.state.loss_count += 1
        return value

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _progress_fraction(self) -> float:
        """How far the run is: by steps, or by time when a budget is set (whichever is further)."""
        settings = self.settings
        fraction = self.state.step / max(1, settings.max_steps)
        if settings.time_budget_s is not None:
            fraction = max(fraction, self._elapsed() / settings.time_budget_s)
        return min(1.0, fraction)

    def _follow_time_budget(self) -> None:
        """With a time budget, warm-up and decay follow the budget, not ``max_steps`` (which is
        then only a cap): a run stopped by its budget ends with a decayed learning rate. Such a
        schedule depends on the machine's speed, so time-budgeted runs are not bit-reproducible.
        """
        fraction = self._progress_fraction()
        warm = self.settings.warmup_ratio
        factor = fraction / warm if fraction < warm else max(0.0, (1 - fraction) / (1 - warm))
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.learning_rate * factor

    def _expected_total_steps(self) -> int:
        """``max_steps``, or with a time budget the steps the budget will allow at this pace."""
        settings = self.settings
        if settings.time_budget_s is None or self.state.step == 0:
            return settings.max_steps
        pace = self._elapsed() / self.state.step
        return max(self.state.step, min(settings.max_steps, round(settings.time_budget_s / pace)))

    # ---- evaluation

    def _evaluate(self) -> float:
        """Score the student on the held-out batches, record it, keep the best weights."""
        was_training = self.student.training
        _set_training(self.student, False)
        total, count = 0.0, 0
        with torch.no_grad():
            for batch, reference in zip(self.holdout_batches, self.references, strict=True):
                batch_total, batch_count = self.objective.score(self.student, batch, reference)
                total += batch_total
                count += batch_count
        _set_training(self.student, was_training)
        value = total / max(1, count)
        self._record(value)
        return value

    def _record(self, value: float) -> None:
        state = self.state
        entry = {"step": float(state.step), "holdout": value}
        if state.loss_count:
            entry["loss"] = state.loss_sum / state.loss_count
        entry["elapsed_s"] = state.elapsed_s + self._elapsed()
        state.history.append(entry)
        state.loss_sum, state.loss_count, state.last_eval_step = 0.0, 0, state.step
        if value > state.best_holdout:
            state.best_holdout, state.best_step, state.bad_evals = value, state.step, 0
            self.best_weights = _snapshot(self.student)
        else:
            state.bad_evals += 1
        log.debug("step %d: held-out %.4f (best %.4f)", state.step, value, state.best_holdout)

    # ---- checkpoints

    def _save_checkpoint(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state
        files = {
            "student": f"student-{state.step:08d}.safetensors",
            "best": f"best-{state.best_step:08d}.safetensors",
            "optimizer": f"optimizer-{state.step:08d}.pt",
        }
        _save_weights(_snapshot(self.student), directory / files["student"])
        if files["best"] != self.best_file:  # best weights changed since the last checkpoint
            _save_weights(self.best_weights, directory / files["best"])
            self.best_file = files["best"]
        tmp = _tmp_path(directory / files["optimizer"])
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            tmp,
        )
        os.replace(tmp, directory / files["optimizer"])
        saved = asdict(state)
        saved["elapsed_s"] = state.elapsed_s + self._elapsed()
        _write_json(
            directory / _STATE_FILE,
            {
                "format": _CHECKPOINT_FORMAT,
                "fingerprint": self.fingerprint,
                "layers": self.layer_map,
                "files": files,
                "state": saved,
            },
        )
        _remove_stale(directory, set(files.values()))

    def _resume(self) -> int | None:
        """Load the checkpoint of this run from ``checkpoint_dir``; the step it was saved at, or
        None when there is none (or it belongs to another run, with a warning)."""
        directory = self.settings.checkpoint_dir
        if directory is None or not (directory / _STATE_FILE).is_file():
            return None
        try:
            checkpoint = self._read_checkpoint(directory)
        except _Mismatch as exc:
            log.warning("not resuming from %s: %s; starting fresh", directory, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint must not stop the run
            log.warning("cannot resume from %s (%s); starting fresh", directory, exc)
            return None
        self.student.load_state_dict(checkpoint.weights)
        self.optimizer.load_state_dict(checkpoint.optimizer["optimizer"])
        self.scheduler.load_state_dict(checkpoint.optimizer["scheduler"])
        self.state = checkpoint.state
        self.best_weights = checkpoint.best
        self.best_file = checkpoint.best_file
        log.info("resuming distillation from step %d in %s", self.state.step, directory)
        return self.state.step

    def _read_checkpoint(self, directory: Path) -> _Checkpoint:
        """Read and check everything before anything is applied to the student."""
        saved = json.loads((directory / _STATE_FILE).read_text(encoding="utf-8"))
        if saved.get("format") != _CHECKPOINT_FORMAT:
            raise _Mismatch(
                f"checkpoint format {saved.get('format')!r} is not {_CHECKPOINT_FORMAT}"
            )
        if saved.get("fingerprint") != self.fingerprint:
            raise _Mismatch(
                "the checkpoint belongs to a different run (teacher, layers, data or settings "
                "differ)"
            )
        files = saved["files"]
        weights = _load_weights(directory / files["student"])
        best = _load_weights(directory / files["best"])
        _check_fits(weights, self.student, directory / files["student"])
        _check_fits(best, self.student, directory / files["best"])
        optimizer = torch.load(directory / files["optimizer"], weights_only=True)
        state = _State(**saved["state"])
        return _Checkpoint(
            state=state, weights=weights, best=best, best_file=files["best"], optimizer=optimizer
        )


class _Mismatch(Exception):
    """The checkpoint directory holds another run's checkpoint."""


def _remove_stale(directory: Path, keep: set[str]) -> None:
    """Delete checkpoint files of earlier steps (only names this module writes)."""
    for path in directory.iterdir():
        name = path.name
        ours = name.startswith(("student-", "best-", "optimizer-")) and name.endswith(
            (".safetensors", ".pt")
        )
        if ours and name not in keep:
            path.unlink(missing_ok=True)


def _fingerprint(
    teacher: Teacher,
    layer_map: list[int],
    settings: DistillSettings,
    train: Sequence[Example],
    holdout: Sequence[Example],
) -> str:
    """Identity of a run: what must be equal for a checkpoint to continue it."""
    data = hashlib.sha256()
    for part in (train, holdout):
        for example in part:
            data.update(json.dumps([example.text, example.label]).encode())
        data.update(b"\x00")
    identity = {
        "teacher": str(teacher.path.resolve()),
        "task": teacher.task,
        "layers": layer_map,
        "settings": settings.model_dump(mode="json", exclude=set(_RUN_LENGTH_FIELDS)),
        "data": data.hexdigest(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
