"""Running a model for evaluation — torch or ONNX Runtime — behind one interface.

The validation report, the parity check and the latency benchmark feed token ids and an
attention mask to a :class:`Runner` and get one float32 array back, whatever executes the model:

- ``feature-extraction``: the mean-pooled last hidden state, ``(batch, hidden)``, padding masked
  out, *not* normalised;
- ``text-classification``: logits, ``(batch, num_labels)``;
- ``text-generation``: logits, ``(batch, seq, vocab)`` (one forward pass, no cache reuse).

ONNX Runtime is imported here only (on the cloud side); the edge agent has its own sessions.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from edgefed.cloud.compress.config import Task
from edgefed.cloud.compress.errors import ExportError

log = logging.getLogger(__name__)

__all__ = [
    "OnnxRunner",
    "Runner",
    "TorchRunner",
    "decoder_position_ids",
    "find_onnx_model",
    "mean_pool",
    "tokenize",
]

_ONNX_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    pad_to_max: bool = False,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Token ids and attention mask (both int64, ``(batch, seq)``) for ``texts``.

    Texts are truncated to ``max_length`` tokens and padded to the longest text of the batch, or
    to ``max_length`` when ``pad_to_max`` (fixed shapes for latency measurements). A tokenizer
    without a padding token (GPT-2 style) gets its end-of-sequence token as padding token; this
    changes the tokenizer object that is passed in.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    if not texts:
        raise ValueError("no texts to tokenize")
    if getattr(tokenizer, "pad_token", None) is None:
        eos = getattr(tokenizer, "eos_token", None)
        if eos is None:
            raise ValueError("the tokenizer has neither a padding nor an end-of-sequence token")
        log.debug("tokenizer has no padding token; using its end-of-sequence token %r", eos)
        tokenizer.pad_token = eos
    enc = tokenizer(
        list(texts),
        padding="max_length" if pad_to_max else "longest",
        truncation=True,
        max_length=max_length,
        return_tensors="np",
    )
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    mask = np.asarray(enc["attention_mask"], dtype=np.int64)
    return ids, mask


def mean_pool(
    hidden: npt.NDArray[Any], attention_mask: npt.NDArray[Any]
) -> npt.NDArray[np.float32]:
    """Masked mean over the sequence axis: ``(batch, seq, hidden)`` → ``(batch, hidden)`` float32.

    Computed in float64 so that torch and ONNX outputs are pooled identically.
    """
    h = np.asarray(hidden, dtype=np.float64)
    m = np.asarray(attention_mask, dtype=np.float64)[:, :, None]
    summed = (h * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    pooled: npt.NDArray[np.float32] = (summed / counts).astype(np.float32)
    return pooled


def decoder_position_ids(attention_mask: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """Position ids a decoder expects for a (possibly padded) batch: the running count of real
    tokens minus one, and 1 at padding (Hugging Face's ``generate`` convention)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


@runtime_checkable
class Runner(Protocol):
    """Something that runs a model for one task and returns float32 outputs (see module doc)."""

    task: Task

    def outputs(
        self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        """Model outputs for one batch: pooled embeddings or logits, float32."""
        ...


class TorchRunner(Runner):
    """A transformers ``PreTrainedModel``, switched to eval mode, run without gradients.

    ``AutoModel`` encoders give their ``last_hidden_state`` (mean-pooled here), classifiers and
    causal LMs their ``logits`` (causal LMs with ``use_cache=False`` and the same position ids as
    :class:`OnnxRunner` feeds, so padded batches compare position by position).
    """

    def __init__(self, model: Any, task: Task) -> None:
        self.model = model
        self.task: Task = task
        model.eval()
        try:
            self._takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
            self._takes_position_ids = False

    def outputs(
        self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        import torch

        device = next(self.model.parameters()).device
        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64), device=device)
        mask = torch.as_tensor(np.asarray(attention_mask, dtype=np.int64), device=device)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        with torch.no_grad():
            if self.task == "text-generation":
                kwargs["use_cache"] = False
                if self._takes_position_ids:
                    kwargs["position_ids"] = torch.as_tensor(
                        decoder_position_ids(attention_mask), device=device
                    )
                out = self.model(**kwargs)
                return np.asarray(out.logits.float().cpu().numpy(), dtype=np.float32)
            out = self.model(**kwargs)
            if self.task == "text-classification":
                return np.asarray(out.logits.float().cpu().numpy(), dtype=np.float32)
            last = getattr(out, "last_hidden_state", None)
            if last is None:  # a model with a head: take its encoder's last layer
                last = self.model(**kwargs, output_hidden_states=True).hidden_states[-1]
            hidden = last.float().cpu().numpy()
        return mean_pool(hidden, attention_mask)


def find_onnx_model(model_dir_or_file: Path) -> Path:
    """The ONNX file itself, or ``model.onnx`` inside a directory; :class:`ExportError` when
    there is none."""
    path = Path(model_dir_or_file)
    if path.is_dir():
        candidate = path / "model.onnx"
        if not candidate.is_file():
            found = sorted(p.name for p in path.glob("*.onnx"))
            hint = f" (found: {', '.join(found)})" if found else ""
            raise ExportError(f"no model.onnx in {path}{hint}")
        return candidate
    if not path.is_file():
        raise ExportError(f"ONNX model {path} does not exist")
    return path


class OnnxRunner(Runner):
    """An ONNX Runtime session over an exported model (``model.onnx`` in a directory, or a file).

    Only the inputs the graph declares are fed: ``token_type_ids`` as zeros, ``position_ids``
    computed from the attention mask (decoders), and for decoders exported with past
    (``text-generation-with-past``) empty ``past_key_values.*`` of sequence length 0, shaped
    ``(batch, heads, 0, head_dim)`` with the dtype the graph declares (fp16 graphs that take fp16
    past values get fp16 arrays). Outputs are always returned as float32.
    """

    def __init__(
        self,
        model_dir_or_file: Path,
        task: Task,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.task: Task = task
        self.model_path = find_onnx_model(Path(model_dir_or_file))
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no "unused initializer" chatter
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=list(providers)
            )
        except Exception as exc:  # ORT raises its own untyped exception classes
            raise ExportError(
                f"ONNX Runtime cannot load {self.model_path}: {type(exc).__name__}: {exc}"
            ) from exc
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._output_names = [o.name for o in self.session.get_outputs()]
        for required in ("input_ids", "attention_mask"):
            if required not in self._inputs:
                raise ExportError(
                    f"{self.model_path} has no {required!r} input "
                    f"(inputs: {', '.join(self._inputs)}); not a text model export"
                )
        self._output = self._choose_output()

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses (ORT silently falls back to CPU)."""
        return list(self.session.get_providers())

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    def _choose_output(self) -> str:
        names = self._output_names
        if self.task == "feature-extraction":
            preferred: tuple[str, ...] = (
                "last_hidden_state",
                "token_embeddings",
                "sentence_embedding",
            )
        else:
            preferred = ("logits",)
        for name in preferred:
            if name in names:
                return name
        raise ExportError(
            f"{self.model_path} has none of the outputs {', '.join(preferred)} a {self.task} "
            f"model needs (outputs: {', '.join(names)})"
        )

    def feeds(
        self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
    ) -> dict[str, npt.NDArray[Any]]:
        """The session inputs for one batch: every input the graph declares (see class doc)."""
        batch = input_ids.shape[0]
        fed: dict[str, npt.NDArray[Any]] = {}
        for name, arg in self._inputs.items():
            dtype = _ONNX_DTYPES.get(arg.type)
            if dtype is None:
                raise ExportError(
                    f"{self.model_path}: input {name!r} has unsupported type {arg.type}"
                )
            if name == "input_ids":
                fed[name] = input_ids.astype(dtype, copy=False)
            elif name == "attention_mask":
                fed[name] = attention_mask.astype(dtype, copy=False)
            elif name == "token_type_ids":
                fed[name] = np.zeros_like(input_ids, dtype=dtype)
            elif name == "position_ids":
                fed[name] = decoder_position_ids(attention_mask).astype(dtype, copy=False)
            elif name.startswith("past_key_values"):
                fed[name] = np.zeros(self._empty_past_shape(name, arg.shape, batch), dtype=dtype)
            else:
                raise ExportError(
                    f"{self.model_path}: cannot feed input {name!r} ({arg.type} {arg.shape})"
                )
        return fed

    def _empty_past_shape(self, name: str, shape: Sequence[Any], batch: int) -> tuple[int, ...]:
        """``(batch, heads, 0, head_dim)`` from the declared shape: symbolic batch → ``batch``,
        symbolic sequence → 0, fixed sizes kept."""
        if len(shape) != 4:
            raise ExportError(f"{self.model_path}: past input {name!r} has shape {shape}, want 4-D")
        dims: list[int] = []
        for axis, dim in enumerate(shape):
            if axis == 0:
                dims.append(batch)
            elif axis == 2:
                dims.append(0)
            elif isinstance(dim, int):
                dims.append(dim)
            else:
                raise ExportError(
                    f"{self.model_path}: past input {name!r} has a symbolic size {dim!r} at "
                    f"axis {axis}; cannot build an empty cache"
                )
        return tuple(dims)

    def outputs(
        self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        (out,) = self.session.run([self._output], self.feeds(ids, mask))
        result = np.asarray(out)
        if self.task == "feature-extraction" and result.ndim == 3:
            return mean_pool(result, mask)
        return result.astype(np.float32, copy=False)
