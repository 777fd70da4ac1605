"""The validation report of a compressed model and the quality gate in front of publishing.

Quality is measured against the teacher on held-out text the student never trained on:

* feature-extraction: cosine between the teacher's and the model's mean-pooled embeddings
  (``cosine_mean``, ``cosine_min``) and ``neighbour_agreement``, the share of sentences whose
  nearest other sentence is the same under both models;
* text-classification: ``agreement`` (same top-1 class as the teacher), and ``accuracy`` /
  ``teacher_accuracy`` when the held-out data has labels;
* text-generation: ``perplexity`` of the held-out text under the model and the teacher,
  ``perplexity_ratio`` (model / teacher) and ``top1_agreement`` of next-token predictions.

Latency is measured on this host at batch 1 and 32, 128 tokens, the teacher (fp32 torch) and
the model timed alternately in the same loop so machine noise hits both alike; medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefed.cloud.compress.config import GateThresholds, Task
from edgefed.cloud.compress.errors import QualityGateError
from edgefed.cloud.compress.runtime import Runner, tokenize


@dataclass
class ValidationReport:
    """Everything measured about one compressed model; ``metrics()`` goes into its manifest."""

    target: str
    task: Task
    quality: dict[str, float]
    latency: dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0
    teacher_size_bytes: int = 0
    parameters: int = 0
    teacher_parameters: int = 0
    providers: list[str] = field(default_factory=list)
    examples: int = 0

    def metrics(self) -> dict[str, float]:
        out = {f"quality.{k}": float(v) for k, v in self.quality.items()}
        out.update({f"latency.{k}": float(v) for k, v in self.latency.items()})
        out["size_bytes"] = float(self.size_bytes)
        out["parameters"] = float(self.parameters)
        out["teacher_parameters"] = float(self.teacher_parameters)
        out["eval_examples"] = float(self.examples)
        return out


# --------------------------------------------------------------------------- quality


def _batched(
    runner: Runner, input_ids: np.ndarray, attention_mask: np.ndarray, batch_size: int
) -> list[np.ndarray]:
    return [
        runner.outputs(input_ids[i : i + batch_size], attention_mask[i : i + batch_size])
        for i in range(0, len(input_ids), batch_size)
    ]


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = np.sum(a64 * b64, axis=-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return np.asarray(num / np.maximum(den, 1e-12))


def _nearest_other(emb: np.ndarray) -> np.ndarray:
    norm = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    sim = norm @ norm.T
    np.fill_diagonal(sim, -np.inf)
    return np.asarray(np.argmax(sim, axis=-1))


def embedding_quality(teacher: np.ndarray, model: np.ndarray) -> dict[str, float]:
    cos = _row_cosine(teacher, model)
    out = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    if len(teacher) >= 3:
        out["neighbour_agreement"] = float(
            np.mean(_nearest_other(teacher) == _nearest_other(model))
        )
    return out


def classification_quality(
    teacher: np.ndarray, model: np.ndarray, labels: np.ndarray | None
) -> dict[str, float]:
    t_pred, m_pred = teacher.argmax(-1), model.argmax(-1)
    out = {"agreement": float(np.mean(t_pred == m_pred))}
    if labels is not None:
        out["accuracy"] = float(np.mean(m_pred == labels))
        out["teacher_accuracy"] = float(np.mean(t_pred == labels))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    shifted = x64 - x64.max(axis=-1, keepdims=True)
    return np.asarray(shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True)))


def generation_quality(
    teacher: Sequence[np.ndarray],
    model: Sequence[np.ndarray],
    input_ids: Sequence[np.ndarray],
    attention_mask: Sequence[np.ndarray],
) -> dict[str, float]:
    """Per batch: logits (b, s, v), the ids and mask they were computed from."""
    t_nll = m_nll = 0.0
    agree = tokens = 0
    for t_logits, m_logits, ids, mask in zip(
        teacher, model, input_ids, attention_mask, strict=True
    ):
        target = ids[:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
        if not valid.any():
            continue
        t_lp = _log_softmax(t_logits[:, :-1])
        m_lp = _log_softmax(m_logits[:, :-1])
        t_tok = np.take_along_axis(t_lp, target[..., None], axis=-1)[..., 0]
        m_tok = np.take_along_axis(m_lp, target[..., None], axis=-1)[..., 0]
        t_nll -= float(t_tok[valid].sum())
        m_nll -= float(m_tok[valid].sum())
        agree += int((t_lp.argmax(-1) == m_lp.argmax(-1))[valid].sum())
        tokens += int(valid.sum())
    if tokens == 0:
        return {}
    t_ppl, m_ppl = float(np.exp(t_nll / tokens)), float(np.exp(m_nll / tokens))
    return {
        "perplexity": m_ppl,
        "teacher_perplexity": t_ppl,
        "perplexity_ratio": m_ppl / t_ppl,
        "top1_agreement": agree / tokens,
    }


def quality_report(
    task: Task,
    teacher: Runner,
    model: Runner,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    labels: np.ndarray | None = None,
    max_length: int = 128,
    batch_size: int = 16,
) -> dict[str, float]:
    """Quality of ``model`` against ``teacher`` on ``texts`` (see the module docstring)."""
    ids, mask = tokenize(tokenizer, texts, max_length=max_length)
    if task == "text-generation":
        batches = [
            tokenize(tokenizer, texts[i : i + batch_size], max_length=max_length)
            for i in range(0, len(texts), batch_size)
        ]
        return generation_quality(
            [teacher.outputs(i, m) for i, m in batches],
            [model.outputs(i, m) for i, m in batches],
            [i for i, _ in batches],
            [m for _, m in batches],
        )
    t_out = np.concatenate(_batched(teacher, ids, mask, batch_size))
    m_out = np.concatenate(_batched(model, ids, mask, batch_size))
    if task == "feature-extraction":
        return embedding_quality(t_out, m_out)
    return classification_quality(t_out, m_out, labels)


# --------------------------------------------------------------------------- latency


def interleaved_medians(
    runs: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each callable, timed in turns (a, b, a, b, ...) after a warm-up."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def _call(runner: Runner, ids: np.ndarray, mask: np.ndarray) -> Callable[[], object]:
    return lambda: runner.outputs(ids, mask)


def latency_report(
    teacher: Runner,
    model: Runner,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_sizes: Sequence[int] = (1, 32),
    seq_len: int = 128,
    repeats: int = 20,
) -> dict[str, float]:
    """Teacher vs model latency at each batch size, ``seq_len`` tokens (padded), interleaved."""
    out: dict[str, float] = {}
    pool = list(texts) or ["edgefed"]
    for b in batch_sizes:
        batch = [pool[i % len(pool)] for i in range(b)]
        ids, mask = tokenize(tokenizer, batch, max_length=seq_len, pad_to_max=True)
        medians = interleaved_medians(
            {"teacher": _call(teacher, ids, mask), "model": _call(model, ids, mask)},
            repeats=repeats,
        )
        out[f"b{b}_ms"] = medians["model"] * 1000
        out[f"teacher_b{b}_ms"] = medians["teacher"] * 1000
        out[f"speedup_b{b}"] = medians["teacher"] / medians["model"]
    return out


# --------------------------------------------------------------------------- gate


def check_gate(report: ValidationReport, gate: GateThresholds) -> None:
    """Raise :class:`QualityGateError` saying by how much each missed metric missed."""
    shortfalls: dict[str, tuple[float, float]] = {}
    lines: list[str] = []
    for metric, minimum in gate.minimums.items():
        value = report.quality.get(metric)
        if value is None or not value >= minimum:
            shortfalls[metric] = (float("nan") if value is None else value, minimum)
            lines.append(
                f"{metric} not measured (needs >= {minimum:g})"
                if value is None
                else f"{metric} {value:.4f} < {minimum:.4f} (missed by {minimum - value:.4f})"
            )
    for metric, maximum in gate.maximums.items():
        value = report.quality.get(metric)
        if value is None or not value <= maximum:
            shortfalls[metric] = (float("nan") if value is None else value, maximum)
            lines.append(
                f"{metric} not measured (needs <= {maximum:g})"
                if value is None
                else f"{metric} {value:.4f} > {maximum:.4f} (over by {value - maximum:.4f})"
            )
    if shortfalls:
        raise QualityGateError(
            f"{report.target}: below the quality gate: " + "; ".join(lines),
            shortfalls=shortfalls,
        )
