"""Local training and evaluation of a :class:`FederatedModel` on a device's examples.

Classification minimises cross-entropy. Feature extraction mean-pools the last hidden states and
minimises an in-batch contrastive loss (each text must find its own pair among the batch's pairs,
temperature 0.05), the usual recipe for sentence embeddings. Runs are deterministic given the
seed: batches come from a seeded generator and dropout runs under a forked, seeded RNG, so the
caller's global RNG state is left as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional

from edgefed.common.learning.data import LocalExample
from edgefed.common.training.errors import TrainingError
from edgefed.common.training.model import FederatedModel
from edgefed.common.training.modes import add_lora, make_all_trainable, merge_lora, select_trainable
from edgefed.common.training.settings import TrainSettings

log = logging.getLogger(__name__)

TEMPERATURE = 0.05


@dataclass(frozen=True)
class TrainOutcome:
    """The full model state after training, how many distinct examples it used and the mean
    training loss of its steps."""

    arrays: dict[str, np.ndarray]
    num_examples: int
    loss: float


@dataclass(frozen=True)
class EvalOutcome:
    loss: float
    accuracy: float
    num_examples: int


def train_local(
    fm: FederatedModel, examples: Sequence[LocalExample], settings: TrainSettings
) -> TrainOutcome:
    """Train ``fm`` from its current (global) weights for ``settings.local_steps`` optimizer
    steps and return the full state; ``fm`` keeps the trained weights."""
    chosen = _choose(examples, settings)
    _check_examples(fm, chosen)
    generator = torch.Generator().manual_seed(settings.seed)
    batches = _batches(len(chosen), settings.batch_size, generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        losses = _run_steps(fm, chosen, settings, batches)
    mean_loss = float(np.mean(losses))
    log.info(
        "trained %s (%s) on %d examples: %d steps of %d, lr %g, mu %g, mean loss %.4f",
        fm.task, settings.mode, len(chosen), settings.local_steps, settings.batch_size,
        settings.lr, settings.proximal_mu, mean_loss,
    )  # fmt: skip
    return TrainOutcome(arrays=fm.arrays(), num_examples=len(chosen), loss=mean_loss)


def evaluate(
    fm: FederatedModel, examples: Sequence[LocalExample], settings: TrainSettings
) -> EvalOutcome:
    """Loss and accuracy of ``fm`` on ``examples`` (the first ``max_examples`` when capped), in
    order, ``batch_size`` at a time. Feature extraction counts a pair as right when the text's
    nearest pair within its batch is its own."""
    chosen = list(examples[: settings.max_examples] if settings.max_examples else examples)
    _check_examples(fm, chosen)
    fm.model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(chosen), settings.batch_size):
            batch = chosen[start : start + settings.batch_size]
            logits, targets = _logits(fm, batch, settings.max_seq_len)
            total_loss += float(functional.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == targets).sum())
    outcome = EvalOutcome(
        loss=total_loss / len(chosen), accuracy=correct / len(chosen), num_examples=len(chosen)
    )
    log.info(
        "evaluated %s on %d examples: loss %.4f, accuracy %.4f",
        fm.task, outcome.num_examples, outcome.loss, outcome.accuracy,
    )  # fmt: skip
    return outcome


# ---------------------------------------------------------------------------- training steps


def _run_steps(
    fm: FederatedModel,
    examples: list[LocalExample],
    settings: TrainSettings,
    batches: Iterator[list[int]],
) -> list[float]:
    trained: torch.nn.Module = fm.model
    if settings.mode == "lora":
        trained = add_lora(fm, settings)
    else:
        select_trainable(fm, settings)
    params = [p for p in trained.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    losses: list[float] = []
    trained.train()
    try:
        for _ in range(settings.local_steps):
            batch = [examples[i] for i in next(batches)]
            logits, targets = _logits(fm, batch, settings.max_seq_len)
            loss = functional.cross_entropy(logits, targets)
            objective = loss
            if anchors:
                distance = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
                objective = loss + settings.proximal_mu / 2 * distance
            optimizer.zero_grad(set_to_none=True)
            objective.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            losses.append(float(loss.detach()))
            if not np.isfinite(losses[-1]):
                raise TrainingError(
                    f"training diverged at step {len(losses)} (loss {losses[-1]}); lower lr"
                )
    finally:
        if settings.mode == "lora":
            fm.model = merge_lora(trained)
        make_all_trainable(fm.model)
        fm.model.eval()
    return losses


def _logits(
    fm: FederatedModel, batch: Sequence[LocalExample], max_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and targets of one batch: class logits, or text-to-pair similarities whose
    target is the diagonal."""
    if fm.task == "text-classification":
        pairs = [e.text_pair or "" for e in batch] if any(e.text_pair for e in batch) else None
        inputs = fm.encode([e.text for e in batch], pairs, max_seq_len)
        logits: torch.Tensor = fm.model(**inputs).logits
        targets = torch.tensor([e.label for e in batch], dtype=torch.long)
        return logits, targets
    left = _embed(fm, [e.text for e in batch], max_seq_len)
    right = _embed(fm, [e.text_pair or "" for e in batch], max_seq_len)
    similarities = left @ right.T / TEMPERATURE
    return similarities, torch.arange(len(batch))


def _embed(fm: FederatedModel, texts: list[str], max_seq_len: int) -> torch.Tensor:
    inputs = fm.encode(texts, None, max_seq_len)
    hidden: torch.Tensor = fm.model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return functional.normalize(pooled, dim=-1)


# ---------------------------------------------------------------------------- data


def _choose(examples: Sequence[LocalExample], settings: TrainSettings) -> list[LocalExample]:
    """All examples, or a seeded random subset of ``max_examples``."""
    if not settings.max_examples or settings.max_examples >= len(examples):
        return list(examples)
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(examples), generator=generator)[: settings.max_examples]
    return [examples[int(i)] for i in sorted(order.tolist())]


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of indices: each pass over the data is a fresh shuffle cut into batches
    (the last one of a pass may be smaller), so no batch holds an example twice."""
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def _check_examples(fm: FederatedModel, examples: Sequence[LocalExample]) -> None:
    if not examples:
        raise TrainingError("no examples to train or evaluate on")
    if fm.task == "text-classification":
        for i, example in enumerate(examples):
            if example.label is None or not 0 <= example.label < fm.num_labels:
                raise TrainingError(
                    f"example {i} has label {example.label!r} but the model has "
                    f"{fm.num_labels} labels (ids 0..{fm.num_labels - 1})"
                )
    else:
        for i, example in enumerate(examples):
            if not example.text_pair:
                raise TrainingError(
                    f"example {i} has no text_pair (feature extraction trains on text pairs)"
                )
