"""The agent's ONNX Runtime adapter: one verified artifact becomes an :class:`OnnxModel`.

This is the only edge module that imports ``onnxruntime`` and ``tokenizers`` (both light; no
torch or transformers on the device). An artifact directory holds ``model.onnx``, the
``tokenizer.json`` of the Hugging Face fast tokenizer, ``config.json`` and, for decoders,
``generation_config.json``; its :class:`~edgefed.common.artifact.Manifest` says the task, the
split role and the quantization scheme.

Texts are tokenised on the agent with the artifact's own tokenizer, padded to the longest text of
a batch, never truncated: a text longer than :attr:`OnnxModel.max_length` tokens is refused with
:class:`InputTooLongError`. The graph gets exactly the inputs it declares: ``input_ids``,
``attention_mask``, ``token_type_ids`` (zeros), ``position_ids`` (from the mask) and, for decoders
exported with a KV cache (Optimum's ``text-generation-with-past``), ``past_key_values.*`` --
empty, ``(batch, heads, 0, head_dim)`` on the first pass, then the previous pass's ``present.*``.

Outputs per text (JSON-serialisable):

- ``feature-extraction``: ``{"embedding": [...]}``, mean-pooled over the mask, L2-normalised
  unless ``parameters["normalize"] is False``;
- ``text-classification``: ``{"label": str, "scores": {label: probability}}`` (softmax);
- ``text-generation``: ``{"text": str, "tokens": int}`` by greedy decoding with the KV cache,
  ``parameters["max_new_tokens"]`` (default 32, at most 256), stopping at the end-of-sequence
  token.

Conversation sessions generate turn by turn with :meth:`OnnxModel.generate_turn`: the same
greedy decoding, but starting from the :class:`~edgefed.common.sessions.kvcache.KvCache` of the
previous turn (only the tokens past the longest common prefix are prefilled) and returning the
cache for the next one.

The model never writes into its artifact directory (a re-verification would find extra files);
TensorRT engine caches go to ``cache_dir``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgefed.common.artifact import Manifest
from edgefed.common.errors import ErrorCode, PayloadError
from edgefed.common.serving.errors import InputTooLongError, ModelLoadError, ServingError
from edgefed.common.sessions.kvcache import KvCache, KvWireFormat

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_MAX_NEW_TOKENS",
    "MAX_NEW_TOKENS_CAP",
    "InferenceFailed",
    "OnnxModel",
    "TurnResult",
    "provider_options",
]

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

DEFAULT_MAX_LENGTH = 512
"""Token limit when neither the tokenizer nor the model config declares one."""
DEFAULT_MAX_NEW_TOKENS = 32
MAX_NEW_TOKENS_CAP = 256
"""Most tokens one generation request may ask for (larger asks are refused, not clamped)."""

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

Array = npt.NDArray[Any]

_ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}
_TEXT_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids"})
_PAST_PREFIX = "past_key_values"
_PRESENT_PREFIX = "present"
_EMBEDDING_OUTPUTS = ("last_hidden_state", "token_embeddings", "sentence_embedding")


class InferenceFailed(ServingError):
    """ONNX Runtime failed on inputs that passed the agent's checks (see the agent's log)."""

    code = ErrorCode.INTERNAL


@dataclass(frozen=True, slots=True)
class _Input:
    """A graph input: name, numpy dtype, declared shape (int = fixed, str/None = symbolic)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = "x".join(str(d) if d is not None else "?" for d in self.shape)
        return f"{self.name} ({self.dtype.name} [{dims}])"


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One request's texts, tokenised and checked, ready to run."""

    rows: list[list[int]]
    parameters: Mapping[str, Any]
    max_new_tokens: int = 0


@dataclass(frozen=True, slots=True)
class TurnResult:
    """One turn of :meth:`OnnxModel.generate_turn`."""

    text: str
    token_ids: list[int]
    """The generated tokens (the end-of-sequence token excluded)."""
    cache: KvCache | None
    """The cache after the turn (``None`` when the graph has no cache): the prompt and every
    generated token the model has run, i.e. all of ``token_ids`` except the last one when the
    turn stopped at ``max_new_tokens`` (that one was never fed back; the next turn prefills it)."""
    prefill_tokens: int
    """Prompt tokens run in this turn: the prompt minus what the given cache already covered."""
    ttft_ms: float
    """From the call to the first generated token (tokenising and prefill included)."""
    total_ms: float


@dataclass(slots=True)
class _Decoded:
    generated: list[int]
    past: dict[str, Array] | None
    """The cache after the last pass, covering ``fed`` tokens."""
    fed: list[int]
    ttft_s: float


def provider_options(
    preference: Sequence[str],
    available: Sequence[str],
    *,
    cache_dir: Path | None = None,
    fp16: bool = False,
) -> list[tuple[str, dict[str, str]]]:
    """The execution providers to ask ONNX Runtime for, with their options.

    Keeps the providers of ``preference`` (in that order) that ``available`` offers and always
    ends with the CPU provider. TensorRT gets its engine cache (``trt_engine_cache_path`` and the
    timing cache under ``cache_dir``: building an engine takes minutes on a Jetson, a restart or a
    re-deploy of the same version should not pay it again) and ``trt_fp16_enable`` for fp16
    artifacts; CUDA keeps its defaults.
    """
    chosen: list[tuple[str, dict[str, str]]] = []
    for name in preference:
        if name not in available or name == CPU or any(name == c for c, _ in chosen):
            continue
        options: dict[str, str] = {}
        if name == TENSORRT:
            if cache_dir is not None:
                engines = cache_dir / "tensorrt"
                engines.mkdir(parents=True, exist_ok=True)
                options.update(
                    trt_engine_cache_enable="True",
                    trt_engine_cache_path=str(engines),
                    trt_timing_cache_enable="True",
                    trt_timing_cache_path=str(engines),
                )
            else:
                log.warning("TensorRT without a cache directory: engines are rebuilt every load")
            if fp16:
                options["trt_fp16_enable"] = "True"
        chosen.append((name, options))
    chosen.append((CPU, {}))
    return chosen


class OnnxModel:
    """An ONNX Runtime session over one artifact, with its tokenizer (see the module doc).

    Build with :meth:`load`. Thread-safe for concurrent runs (ORT sessions and tokenizers are);
    the agent runs one batch at a time from its batcher's worker thread.
    """

    def __init__(
        self,
        *,
        manifest: Manifest,
        session: Any,
        tokenizer: Any | None,
        config: Mapping[str, Any],
        generation_config: Mapping[str, Any],
        tokenizer_max_length: int | None,
        artifact_dir: Path,
    ) -> None:
        self.manifest = manifest
        self.name: str = manifest.name
        self.version: int = manifest.version
        self.task = manifest.task
        self.role: Literal["full", "head", "tail"] = (
            manifest.split.role if manifest.split is not None else "full"
        )
        self.artifact_dir = artifact_dir
        self.session = session
        """The ``onnxruntime.InferenceSession``."""
        self.providers: list[str] = list(session.get_providers())
        """The execution providers the session really uses (ORT falls back to CPU silently)."""
        self._tokenizer = tokenizer
        what = f"cannot load {self.name} v{self.version}"
        self._inputs: dict[str, _Input] = {
            arg.name: _input_of(arg, what) for arg in session.get_inputs()
        }
        self._outputs: list[str] = [o.name for o in session.get_outputs()]
        self.max_length: int = _max_length(tokenizer_max_length, config)
        """Most tokens per text (special tokens included); longer texts are refused."""
        self.labels: dict[int, str] = _labels(config)
        """Class names by index (``id2label`` of ``config.json``); ``LABEL_i`` where missing."""
        self._eos: frozenset[int] = _eos_ids(config, generation_config)
        self._pad_id = _pad_id(tokenizer, config)
        self._past: dict[str, tuple[str, tuple[int, int]]] = {}
        """past input name -> (present output name, (heads, head_dim))."""
        self._task_output = ""
        self._check_declared()
        self._check_graph(config)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        artifact_dir: Path,
        manifest: Manifest,
        *,
        providers: Sequence[str],
        cache_dir: Path | None = None,
        intra_op_threads: int | None = None,
    ) -> OnnxModel:
        """Open the (already verified) artifact in ``artifact_dir`` described by ``manifest``.

        ``providers`` are execution providers in order of preference; those this ONNX Runtime
        build does not offer are skipped and the CPU provider is always the last resort.
        Raises :class:`ModelLoadError` naming the reason: no ``model.onnx``, no
        ``tokenizer.json`` for a model that takes text, a tokenizer or config that does not
        parse, a graph ONNX Runtime refuses, or a graph this agent cannot feed.
        """
        import onnxruntime as ort

        artifact_dir = Path(artifact_dir)
        what = f"{manifest.name} v{manifest.version}"
        model_file = artifact_dir / MODEL_FILE
        if not model_file.is_file():
            raise ModelLoadError(f"cannot load {what}: no {MODEL_FILE} in {artifact_dir}")
        config = _read_json(artifact_dir / CONFIG_FILE, what)
        generation_config = _read_json(artifact_dir / GENERATION_CONFIG_FILE, what)
        tokenizer, tokenizer_max_length = _load_tokenizer(
            artifact_dir / TOKENIZER_FILE,
            what,
            required=manifest.split is None or manifest.split.role == "head",
        )

        fp16 = manifest.quantization is not None and manifest.quantization.scheme == "fp16"
        chosen = provider_options(
            providers, ort.get_available_providers(), cache_dir=cache_dir, fp16=fp16
        )
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        started = time.perf_counter()
        try:
            session = ort.InferenceSession(
                str(model_file),
                sess_options=options,
                providers=[name for name, _ in chosen],
                provider_options=[opts for _, opts in chosen],
            )
        except Exception as exc:  # ORT raises its own untyped exception classes
            raise ModelLoadError(
                f"cannot load {what}: ONNX Runtime refused {MODEL_FILE}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        model = cls(
            manifest=manifest,
            session=session,
            tokenizer=tokenizer,
            config=config,
            generation_config=generation_config,
            tokenizer_max_length=tokenizer_max_length,
            artifact_dir=artifact_dir,
        )
        wanted = [name for name, _ in chosen]
        unavailable = [p for p in providers if p not in wanted]
        if unavailable:
            log.info("%s: %s not available here", what, ", ".join(unavailable))
        if model.providers[:1] != wanted[:1]:
            log.warning(
                "%s: asked for %s, ONNX Runtime uses %s",
                what,
                ", ".join(wanted),
                ", ".join(model.providers),
            )
        log.info(
            "loaded %s (%s, %s) on %s in %.0f ms",
            what,
            model.task,
            model.role,
            ", ".join(model.providers),
            (time.perf_counter() - started) * 1000,
        )
        return model

    def _check_declared(self) -> None:
        """The graph must be what the signed manifest declares (when it declares anything):
        the same inputs and outputs, element types and shapes. Routers, split partners and the
        controller plan with the declared shapes; a graph that differs is not this artifact."""
        what = f"cannot load {self.name} v{self.version}"
        for kind, declared, args in (
            ("input", self.manifest.inputs, self.session.get_inputs()),
            ("output", self.manifest.outputs, self.session.get_outputs()),
        ):
            if not declared:
                continue
            graph = {arg.name: _graph_spec(arg) for arg in args}
            wanted = {spec.name: (spec.dtype, tuple(spec.shape)) for spec in declared}
            for name in sorted(wanted.keys() | graph.keys()):
                if name not in graph:
                    problem = "the graph has no such " + kind
                elif name not in wanted:
                    problem = "the manifest does not declare it"
                elif not _same_spec(graph[name], wanted[name]):
                    problem = (
                        f"the graph has {_describe_spec(graph[name])}, "
                        f"the manifest declares {_describe_spec(wanted[name])}"
                    )
                else:
                    continue
                raise ModelLoadError(f"{what}: {kind} {name!r}: {problem}")

    def _check_graph(self, config: Mapping[str, Any]) -> None:
        """Check at load time that this agent can feed the graph and read what it needs."""
        what = f"cannot load {self.name} v{self.version}"
        for spec in self._inputs.values():
            if spec.name.startswith(_PAST_PREFIX):
                present = _PRESENT_PREFIX + spec.name[len(_PAST_PREFIX) :]
                if present not in self._outputs:
                    raise ModelLoadError(
                        f"{what}: input {spec.name!r} has no matching output {present!r}"
                    )
                self._past[spec.name] = (present, _past_dims(spec, config, what))
        if not self.takes_text:
            if self.role == "full":
                unfed = [
                    s.describe()
                    for s in self._inputs.values()
                    if s.name not in _TEXT_INPUTS and s.name not in self._past
                ]
                if "input_ids" not in self._inputs:
                    unfed.insert(0, "no input_ids")
                raise ModelLoadError(
                    f"{what}: cannot feed this graph from text ({', '.join(unfed)})"
                )
            return
        if self._tokenizer is None:
            raise ModelLoadError(f"{what}: the graph takes text but there is no {TOKENIZER_FILE}")
        if self.role != "full":
            return
        if self.task == "feature-extraction":
            wanted: tuple[str, ...] = _EMBEDDING_OUTPUTS
        else:
            wanted = ("logits",)
        found = next((name for name in wanted if name in self._outputs), None)
        if found is None:
            raise ModelLoadError(
                f"{what}: a {self.task} graph needs one of the outputs {', '.join(wanted)} "
                f"(outputs: {', '.join(self._outputs)})"
            )
        self._task_output = found

    @property
    def takes_text(self) -> bool:
        """Whether texts can be fed: the graph takes ``input_ids`` and nothing this agent
        cannot make from token ids (the attention mask, zeros, positions, an empty cache)."""
        return "input_ids" in self._inputs and all(
            name in _TEXT_INPUTS or name in self._past for name in self._inputs
        )

    @property
    def input_specs(self) -> dict[str, tuple[str, tuple[int | str | None, ...]]]:
        """Graph inputs: name -> (numpy dtype name, declared shape)."""
        return {s.name: (s.dtype.name, s.shape) for s in self._inputs.values()}

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def __repr__(self) -> str:
        return (
            f"OnnxModel({self.name!r} v{self.version}, {self.task}, {self.role}, "
            f"{'/'.join(self.providers)})"
        )

    # ------------------------------------------------------------------ texts

    def run_texts(
        self, texts: Sequence[str], parameters: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """One output dict per text (see the module doc); raises :class:`InputTooLongError` for
        a text over :attr:`max_length` tokens and :class:`PayloadError` for bad parameters."""
        return self.run_text_batch([(texts, parameters)])[0]

    def run_text_batch(
        self, batch: Sequence[tuple[Sequence[str], Mapping[str, Any]]]
    ) -> list[list[dict[str, Any]]]:
        """Run several requests ``(texts, parameters)`` together; one output list per request.

        Every request is tokenised and checked first, so a bad request fails before anything
        runs. Encoders and classifiers then run all texts of all requests in one ONNX Runtime
        call (padded to the longest) and the outputs are split back per request. Decoders run
        one prompt at a time: greedy decoding of a padded batch would need per-row stopping,
        left padding and a cache that grows for rows that are already done, and the tiny
        decoders of edge devices gain little from it, so the cost is not worth it here.
        """
        self._require_text()
        prepared = [self._prepare(texts, parameters) for texts, parameters in batch]
        if self.task == "text-generation":
            return [[self._generate(row, p.max_new_tokens) for row in p.rows] for p in prepared]
        rows = [row for p in prepared for row in p.rows]
        ids, mask = self._pad(rows)
        (out,) = self._run([self._task_output], self._text_feeds(ids, mask))
        result = np.asarray(out)
        results: list[list[dict[str, Any]]] = []
        start = 0
        for p in prepared:
            stop = start + len(p.rows)
            if self.task == "feature-extraction":
                results.append(self._embeddings(result[start:stop], mask[start:stop], p))
            else:
                results.append(self._classes(result[start:stop]))
            start = stop
        return results

    def tokenize(self, texts: Sequence[str], parameters: Mapping[str, Any]) -> tuple[Array, Array]:
        """Token ids and attention mask ``(texts, longest)``, checked as :meth:`run_texts` checks
        them; for the head of a split model (:mod:`edgefed.common.serving.split`), whose graph
        takes text but whose output is not the task's."""
        if not self.takes_text:
            raise PayloadError(f"model {self.name} v{self.version} does not take texts")
        return self._pad(self._prepare(texts, parameters).rows)

    def task_results(
        self, output: Array, mask: Array, parameters: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """One result per row of a task output (``last_hidden_state`` or pooled embeddings for
        feature extraction, ``logits`` for classification), as :meth:`run_texts` makes them."""
        if self.task == "feature-extraction":
            return self._embeddings(np.asarray(output), mask, _Prepared([], parameters))
        if self.task == "text-classification":
            return self._classes(np.asarray(output))
        raise PayloadError(f"model {self.name} v{self.version} ({self.task}) has no task results")

    def _require_text(self) -> None:
        if self.role != "full":
            raise PayloadError(
                f"model {self.name} v{self.version} is the {self.role} of a split model: "
                "it takes tensors, not texts"
            )
        if not self.takes_text:  # pragma: no cover - refused at load for full models
            raise PayloadError(f"model {self.name} v{self.version} does not take texts")

    @property
    def _text_tokenizer(self) -> Any:
        if self._tokenizer is None:  # pragma: no cover - refused at load for text models
            raise PayloadError(f"model {self.name} v{self.version} has no tokenizer")
        return self._tokenizer

    def _prepare(
        self, texts: Sequence[str], parameters: Mapping[str, Any], *, special_tokens: bool = True
    ) -> _Prepared:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise PayloadError("texts must be a list of strings")
        if not texts:
            raise PayloadError("texts is empty")
        if not isinstance(parameters, Mapping):
            raise PayloadError("parameters must be an object")
        generating = self.task == "text-generation"
        rows = self._encode(texts, special_tokens=special_tokens)
        if not generating:
            normalize = parameters.get("normalize", True)
            if not isinstance(normalize, bool):
                raise PayloadError(f"parameter normalize must be true or false, not {normalize!r}")
            return _Prepared(rows, parameters)
        max_new = parameters.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise PayloadError(
                f"parameter max_new_tokens must be a positive integer, not {max_new!r}"
            )
        if max_new > MAX_NEW_TOKENS_CAP:
            raise InputTooLongError(
                f"max_new_tokens {max_new} is more than this agent generates ({MAX_NEW_TOKENS_CAP})"
            )
        for i, row in enumerate(rows):
            if len(row) + max_new > self.max_length:
                raise InputTooLongError(
                    f"text {i} is {len(row)} tokens long; with max_new_tokens {max_new} it "
                    f"exceeds the {self.max_length} tokens model {self.name} v{self.version} "
                    "takes"
                )
        return _Prepared(rows, parameters, max_new)

    def _encode(self, texts: Sequence[str], *, special_tokens: bool = True) -> list[list[int]]:
        """Token ids per text, no longer than :attr:`max_length` (a decoder's prompt without a
        trailing end-of-sequence token). ``special_tokens=False``: the text carries its own
        (a prompt rendered by a chat template, which starts with the model's start token)."""
        generating = self.task == "text-generation"
        encodings = self._text_tokenizer.encode_batch(
            list(texts), add_special_tokens=special_tokens
        )
        rows: list[list[int]] = []
        for i, enc in enumerate(encodings):
            row = list(enc.ids)
            if generating:
                # A prompt that ends with the end-of-sequence token (BERT-style post-processors
                # append one) would tell the model the text is over before it starts.
                while len(row) > 1 and row[-1] in self._eos:
                    row.pop()
            if not row:
                raise PayloadError(f"text {i} has no tokens")
            if len(row) > self.max_length:
                raise InputTooLongError(
                    f"text {i} is {len(row)} tokens long; model {self.name} v{self.version} "
                    f"takes at most {self.max_length}"
                )
            rows.append(row)
        return rows

    def _pad(self, rows: Sequence[Sequence[int]]) -> tuple[Array, Array]:
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    def _text_feeds(
        self, ids: Array, mask: Array, past: Mapping[str, Array] | None = None
    ) -> dict[str, Array]:
        """Every input the graph declares, from token ids and the full attention mask (which
        also covers the cached positions when ``past`` is given)."""
        feeds: dict[str, Array] = {}
        for spec in self._inputs.values():
            name = spec.name
            if name == "input_ids":
                value = ids
            elif name == "attention_mask":
                value = mask
            elif name == "token_type_ids":
                value = np.zeros_like(ids)
            elif name == "position_ids":
                value = _position_ids(mask)[:, -ids.shape[1] :]
            elif past is not None and name in past:
                value = past[name]
            else:  # an empty cache
                heads, head_dim = self._past[name][1]
                value = np.zeros((ids.shape[0], heads, 0, head_dim), dtype=spec.dtype)
            feeds[name] = value.astype(spec.dtype, copy=False)
        return feeds

    def _run(self, outputs: list[str], feeds: Mapping[str, Array]) -> list[Array]:
        try:
            return list(self.session.run(outputs, dict(feeds)))
        except Exception as exc:  # ORT's exception classes are untyped
            log.exception("%s v%s: ONNX Runtime failed", self.name, self.version)
            raise InferenceFailed(
                f"model {self.name} v{self.version} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _embeddings(self, out: Array, mask: Array, prepared: _Prepared) -> list[dict[str, Any]]:
        if out.ndim == 3:
            hidden = out.astype(np.float64)
            weights = mask.astype(np.float64)[:, :, None]
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        else:
            pooled = out.astype(np.float64)
        if prepared.parameters.get("normalize", True) is not False:
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            pooled = pooled / np.clip(norms, 1e-12, None)
        vectors = pooled.astype(np.float32)
        return [{"embedding": v.tolist()} for v in vectors]

    def _classes(self, logits: Array) -> list[dict[str, Any]]:
        z = logits.astype(np.float64)
        z = z - z.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        names = [self.labels.get(i, f"LABEL_{i}") for i in range(probs.shape[1])]
        results = []
        for row in probs:
            scores = {name: float(p) for name, p in zip(names, row, strict=True)}
            results.append({"label": names[int(row.argmax())], "scores": scores})
        return results

    def _generate(self, prompt: Sequence[int], max_new_tokens: int) -> dict[str, Any]:
        """Greedy decoding of one prompt; with a KV cache when the graph has one (each step
        then feeds one token), otherwise the whole sequence every step."""
        decoded = self._decode([], None, list(prompt), max_new_tokens, time.perf_counter())
        text = self._text_tokenizer.decode(decoded.generated, skip_special_tokens=True)
        return {"text": text, "tokens": len(decoded.generated)}

    def _decode(
        self,
        cached: list[int],
        past: dict[str, Array] | None,
        suffix: list[int],
        max_new_tokens: int,
        started: float,
    ) -> _Decoded:
        """Greedy decoding after ``cached`` tokens (whose cache is ``past``, ``None``: empty),
        prefilling ``suffix`` (at least one token) first; at most ``max_new_tokens`` tokens
        (0: prefill only)."""
        tokens = [*cached, *suffix]
        covered = len(cached)
        generated: list[int] = []
        ids = np.asarray([suffix if self._past else tokens], dtype=np.int64)
        presents = [present for present, _ in self._past.values()]
        ttft = 0.0
        while True:
            mask = np.ones((1, len(tokens)), dtype=np.int64)
            logits, *cache = self._run(["logits", *presents], self._text_feeds(ids, mask, past))
            covered = len(tokens)
            if self._past:
                past = dict(zip(self._past, cache, strict=True))
            if len(generated) >= max_new_tokens:
                break
            next_id = int(np.asarray(logits[0, -1], dtype=np.float32).argmax())
            if not generated:
                ttft = time.perf_counter() - started
            if next_id in self._eos:
                break
            generated.append(next_id)
            tokens.append(next_id)
            if len(generated) >= max_new_tokens:
                break
            if self._past:
                ids = np.asarray([[next_id]], dtype=np.int64)
            else:
                ids = np.asarray([tokens], dtype=np.int64)
        return _Decoded(generated, past if self._past else None, tokens[:covered], ttft)

    # ------------------------------------------------------------------ turns

    def tokenize_prompt(self, prompt: str, *, special_tokens: bool = True) -> list[int]:
        """The token ids :meth:`generate_turn` (and :meth:`run_texts`) runs for ``prompt``;
        raises :class:`InputTooLongError` past :attr:`max_length` and :class:`PayloadError` for
        an empty prompt or a model that does not generate text. ``special_tokens=False`` for a
        prompt a chat template rendered (it has its own start token; transformers' tokenizers
        do the same after ``apply_chat_template``)."""
        self._require_generator()
        if not isinstance(prompt, str):
            raise PayloadError("the prompt must be a string")
        return self._encode([prompt], special_tokens=special_tokens)[0]

    @property
    def has_cache(self) -> bool:
        """Whether the graph takes a KV cache (``past_key_values.*``)."""
        return bool(self._past)

    @property
    def kv_dtype(self) -> np.dtype[Any]:
        """The dtype of the graph's cache tensors (float32 when it has none)."""
        for name in self._past:
            return self._inputs[name].dtype
        return np.dtype(np.float32)

    def kv_bytes_per_token(self, fmt: KvWireFormat) -> int:
        """Bytes one cached token takes on the wire in ``fmt`` (as
        :meth:`KvCache.nbytes <edgefed.common.sessions.kvcache.KvCache.nbytes>` counts them):
        per cache tensor ``heads * head_dim`` values of 2 bytes (``fp16``) or 1 byte plus a
        2-byte scale per head (``int8``); 0 when the graph has no cache."""
        if fmt not in ("fp16", "int8"):
            raise ValueError(f"kv format must be fp16 or int8, not {fmt!r}")
        total = 0
        for _, (heads, head_dim) in self._past.values():
            total += heads * head_dim * 2 if fmt == "fp16" else heads * (head_dim + 2)
        return total

    def check_cache(self, cache: KvCache) -> None:
        """Raise :class:`PayloadError` unless ``cache`` fits this graph: the same cache tensor
        names, ``(1, heads, tokens, head_dim)`` each, no longer than :attr:`max_length`."""
        what = f"model {self.name} v{self.version}"
        if set(cache.tensors) != set(self._past):
            raise PayloadError(
                f"the kv cache does not fit {what}: it has tensors "
                f"{', '.join(sorted(cache.tensors)) or 'none'}, the graph takes "
                f"{', '.join(sorted(self._past)) or 'none'}"
            )
        if cache.length > self.max_length:
            raise InputTooLongError(
                f"the kv cache covers {cache.length} tokens; {what} takes at most {self.max_length}"
            )
        for name, (_, (heads, head_dim)) in self._past.items():
            shape = cache.tensors[name].shape
            if shape != (1, heads, cache.length, head_dim):
                raise PayloadError(
                    f"the kv cache does not fit {what}: {name} has shape {list(shape)}, "
                    f"expected {[1, heads, cache.length, head_dim]}"
                )

    def generate_turn(
        self,
        prompt: str,
        parameters: Mapping[str, Any],
        cache: KvCache | None,
        *,
        special_tokens: bool = True,
    ) -> TurnResult:
        """Greedy decoding of ``prompt`` as :meth:`run_texts` does it (same tokens, limits,
        errors and text), reusing ``cache`` for the longest common prefix of its tokens and
        the prompt's: only the rest is prefilled. Returns the text and the cache for the next
        turn (see :class:`TurnResult`). ``cache`` is never modified. Raises
        :class:`PayloadError` for a cache that does not fit this graph."""
        started = time.perf_counter()
        self._require_generator()
        if not isinstance(prompt, str):
            raise PayloadError("the prompt must be a string")
        prepared = self._prepare([prompt], parameters, special_tokens=special_tokens)
        row = prepared.rows[0]
        cached, past = self._reusable(row, cache)
        decoded = self._decode(cached, past, row[len(cached) :], prepared.max_new_tokens, started)
        text = self._text_tokenizer.decode(decoded.generated, skip_special_tokens=True)
        out = None if decoded.past is None else KvCache(decoded.fed, decoded.past)
        return TurnResult(
            text=text,
            token_ids=decoded.generated,
            cache=out,
            prefill_tokens=len(row) - len(cached),
            ttft_ms=decoded.ttft_s * 1000.0,
            total_ms=(time.perf_counter() - started) * 1000.0,
        )

    def prefill(self, token_ids: Sequence[int], cache: KvCache | None = None) -> KvCache | None:
        """The cache of ``token_ids`` (reusing ``cache`` for their common prefix), as a handoff
        by re-run builds it; ``None`` when the graph has no cache. Raises
        :class:`PayloadError` for no tokens, ids outside the vocabulary or a cache that does
        not fit, :class:`InputTooLongError` past :attr:`max_length`."""
        self._require_generator()
        row = [int(i) for i in token_ids]
        if not row:
            raise PayloadError("nothing to prefill: no token ids")
        vocab = self._text_tokenizer.get_vocab_size(with_added_tokens=True)
        bad = next((i for i in row if not 0 <= i < vocab), None)
        if bad is not None:
            raise PayloadError(f"token id {bad} is outside the vocabulary of {vocab} tokens")
        if len(row) > self.max_length:
            raise InputTooLongError(
                f"{len(row)} tokens to prefill; model {self.name} v{self.version} takes at "
                f"most {self.max_length}"
            )
        if not self._past:
            return None
        cached, past = self._reusable(row, cache)
        decoded = self._decode(cached, past, row[len(cached) :], 0, time.perf_counter())
        assert decoded.past is not None
        return KvCache(decoded.fed, decoded.past)

    def _reusable(
        self, row: list[int], cache: KvCache | None
    ) -> tuple[list[int], dict[str, Array] | None]:
        """The tokens of ``row`` that ``cache`` already covers and their cache (at least one
        token of ``row`` is left to run: its logits give the next token)."""
        if cache is None or not self._past:
            return [], None
        self.check_cache(cache)
        n = min(cache.common_prefix(row), len(row) - 1)
        if n <= 0:
            return [], None
        kept = cache.truncated(n)
        return kept.token_ids, kept.tensors

    def _require_generator(self) -> None:
        self._require_text()
        if self.task != "text-generation":
            raise PayloadError(
                f"model {self.name} v{self.version} ({self.task}) does not generate text"
            )

    # ------------------------------------------------------------------ tensors

    def run_tensors(self, tensors: Mapping[str, Array]) -> dict[str, Array]:
        """Run the graph on caller-made tensors; every output by name.

        Inputs the agent can make are filled in when missing: ``token_type_ids`` (zeros),
        ``position_ids`` (from ``attention_mask``) and an empty ``past_key_values.*`` cache.
        Raises :class:`PayloadError` for an unknown or missing input, a dtype that does not
        convert safely (``same_kind``) or a shape that does not fit the declared one, and
        :class:`InputTooLongError` for a sequence longer than :attr:`max_length`.
        """
        unknown = sorted(set(tensors) - set(self._inputs))
        if unknown:
            raise PayloadError(
                f"model {self.name} v{self.version} has no input {', '.join(map(repr, unknown))} "
                f"(inputs: {self._describe_inputs()})"
            )
        feeds: dict[str, Array] = {}
        for spec in self._inputs.values():
            if spec.name in tensors:
                feeds[spec.name] = self._checked(spec, tensors[spec.name])
        # The cache first, then the mask (it covers the cache), then what derives from them.
        missing = sorted(
            (s for s in self._inputs.values() if s.name not in feeds),
            key=lambda s: 0 if s.name in self._past else 1 if s.name == "attention_mask" else 2,
        )
        for spec in missing:
            feeds[spec.name] = self._default_input(spec, feeds)
        try:
            outputs = self.session.run(self._outputs, feeds)
        except Exception as exc:  # ORT's exception classes are untyped
            if type(exc).__name__ in ("InvalidArgument", "InvalidProtobuf"):
                raise PayloadError(
                    f"model {self.name} v{self.version} refused the tensors: {exc}"
                ) from exc
            log.exception("%s v%s: ONNX Runtime failed", self.name, self.version)
            raise InferenceFailed(
                f"model {self.name} v{self.version} failed: {type(exc).__name__}: {exc}"
            ) from exc
        return {name: np.asarray(value) for name, value in zip(self._outputs, outputs, strict=True)}

    def _describe_inputs(self) -> str:
        return ", ".join(s.describe() for s in self._inputs.values())

    def _checked(self, spec: _Input, value: object) -> Array:
        if not isinstance(value, np.ndarray):
            raise PayloadError(f"input {spec.name!r} must be an array, not {type(value).__name__}")
        if value.ndim != len(spec.shape):
            raise PayloadError(
                f"input {spec.describe()} must have {len(spec.shape)} dimensions, "
                f"got shape {list(value.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, value.shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise PayloadError(
                    f"input {spec.describe()} must have size {want} at axis {axis}, "
                    f"got shape {list(value.shape)}"
                )
            if (
                isinstance(want, str)
                and "sequence" in want
                and "+" not in want
                and got > self.max_length
            ):
                raise InputTooLongError(
                    f"input {spec.name!r} is {got} tokens long; model {self.name} "
                    f"v{self.version} takes at most {self.max_length}"
                )
        if value.dtype != spec.dtype:
            if (value.dtype.kind == "b" and spec.dtype.kind != "b") or not np.can_cast(
                value.dtype, spec.dtype, casting="same_kind"
            ):
                raise PayloadError(
                    f"input {spec.describe()} cannot be fed from {value.dtype.name} values"
                )
            value = value.astype(spec.dtype)
        return value

    def _default_input(self, spec: _Input, feeds: Mapping[str, Array]) -> Array:
        ids = feeds.get("input_ids")
        mask = feeds.get("attention_mask")
        if spec.name == "token_type_ids" and ids is not None:
            return np.zeros(ids.shape, dtype=spec.dtype)
        if spec.name == "attention_mask" and ids is not None:
            cached = next((feeds[name].shape[2] for name in self._past if name in feeds), 0)
            return np.ones((ids.shape[0], cached + ids.shape[1]), dtype=spec.dtype)
        if spec.name == "position_ids" and mask is not None and ids is not None:
            return _position_ids(mask)[:, -ids.shape[1] :].astype(spec.dtype)
        if spec.name in self._past:
            batch = next((t.shape[0] for t in feeds.values() if t.ndim >= 1), None)
            if batch is not None:
                heads, head_dim = self._past[spec.name][1]
                return np.zeros((batch, heads, 0, head_dim), dtype=spec.dtype)
        raise PayloadError(
            f"missing input {spec.describe()} for model {self.name} v{self.version} "
            f"(inputs: {self._describe_inputs()})"
        )

    # ------------------------------------------------------------------ warm-up

    def warm_up(self) -> None:
        """Run one short dummy input, so that the first real request does not pay for ONNX
        Runtime's lazy initialisation (or a TensorRT engine build). Raises
        :class:`ModelLoadError` when the model cannot run it."""
        started = time.perf_counter()
        try:
            if self.role == "full" and self.takes_text:
                self.run_text_batch([(["warm up"], {"max_new_tokens": 1})])
            else:
                self.run_tensors(
                    {
                        spec.name: self._dummy(spec)
                        for spec in self._inputs.values()
                        if spec.name not in self._past
                    }
                )
        except Exception as exc:
            raise ModelLoadError(
                f"{self.name} v{self.version} failed its warm-up: {type(exc).__name__}: {exc}"
            ) from exc
        log.debug(
            "%s v%s warmed up in %.1f ms",
            self.name,
            self.version,
            (time.perf_counter() - started) * 1000,
        )

    def _dummy(self, spec: _Input) -> Array:
        shape = tuple(
            d if isinstance(d, int) else (1 if axis == 0 else 8)
            for axis, d in enumerate(spec.shape)
        )
        if spec.name == "attention_mask":
            return np.ones(shape, dtype=spec.dtype)
        return np.zeros(shape, dtype=spec.dtype)


# --------------------------------------------------------------------------- helpers


def _input_of(arg: Any, what: str) -> _Input:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise ModelLoadError(f"{what}: graph input {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int | str) else None for d in arg.shape)
    return _Input(arg.name, dtype, shape)


def _position_ids(mask: Array) -> Array:
    """The running count of real tokens minus one, 1 at padding (Hugging Face's convention)."""
    m = np.asarray(mask, dtype=np.int64)
    pos = np.cumsum(m, axis=-1) - 1
    return np.where(m == 0, 1, pos).astype(np.int64)


def _past_dims(spec: _Input, config: Mapping[str, Any], what: str) -> tuple[int, int]:
    """``(heads, head_dim)`` of a cache input: from the graph, or from ``config.json``."""
    if len(spec.shape) != 4:
        raise ModelLoadError(f"{what}: cache input {spec.describe()} is not 4-D")
    heads, head_dim = spec.shape[1], spec.shape[3]
    if not isinstance(heads, int):
        heads = _first_int(config, "num_key_value_heads", "num_attention_heads", "n_head")
    if not isinstance(head_dim, int):
        head_dim = _first_int(config, "head_dim")
        hidden = _first_int(config, "hidden_size", "n_embd")
        attention_heads = _first_int(config, "num_attention_heads", "n_head")
        if head_dim is None and hidden is not None and attention_heads:
            head_dim = hidden // attention_heads
    if heads is None or head_dim is None:
        raise ModelLoadError(
            f"{what}: cannot tell the head count and size of cache input {spec.describe()}"
        )
    return heads, head_dim


def _first_int(config: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {what}: {path.name} does not parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"cannot load {what}: {path.name} is not a JSON object")
    return data


def _load_tokenizer(path: Path, what: str, *, required: bool) -> tuple[Any | None, int | None]:
    """The fast tokenizer with truncation and padding switched off (the agent refuses long
    texts and pads itself), and the truncation length it declared."""
    if not path.is_file():
        if required:
            raise ModelLoadError(f"cannot load {what}: no {TOKENIZER_FILE} in {path.parent}")
        return None, None
    from tokenizers import Tokenizer  # type: ignore[import-untyped]

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception
        raise ModelLoadError(f"cannot load {what}: {TOKENIZER_FILE} does not parse: {exc}") from exc
    truncation = tokenizer.truncation
    declared = truncation.get("max_length") if isinstance(truncation, dict) else None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer, declared if isinstance(declared, int) and declared > 0 else None


def _max_length(tokenizer_max: int | None, config: Mapping[str, Any]) -> int:
    limits = [
        v
        for v in (
            tokenizer_max,
            _first_int(config, "max_position_embeddings", "n_positions", "n_ctx"),
        )
        if v is not None
    ]
    return min(limits) if limits else DEFAULT_MAX_LENGTH


_Spec = tuple[str, tuple[int | str | None, ...]]
"""(numpy dtype name, "" when not one of ``_ORT_DTYPES``; shape) of a graph input or output."""


def _graph_spec(arg: Any) -> _Spec:
    dtype = _ORT_DTYPES.get(arg.type)
    shape = tuple(d if isinstance(d, int | str) else None for d in (arg.shape or ()))
    return (dtype.name if dtype is not None else "", shape)


def _same_spec(graph: _Spec, declared: _Spec) -> bool:
    """Same element type (when this runtime knows the graph's), rank and fixed dimensions; a
    symbolic dimension (any name, or unknown) matches a symbolic one only."""
    (graph_dtype, graph_shape), (declared_dtype, declared_shape) = graph, declared
    if graph_dtype and graph_dtype != declared_dtype:
        return False
    if len(graph_shape) != len(declared_shape):
        return False
    return all(
        (isinstance(g, int) and g == d) if isinstance(d, int) else not isinstance(g, int)
        for g, d in zip(graph_shape, declared_shape, strict=True)
    )


def _describe_spec(spec: _Spec) -> str:
    dtype, shape = spec
    return f"{dtype} [{', '.join('?' if d is None else str(d) for d in shape)}]"


def _labels(config: Mapping[str, Any]) -> dict[int, str]:
    raw = config.get("id2label")
    if not isinstance(raw, dict):
        return {}
    labels: dict[int, str] = {}
    for key, value in raw.items():
        try:
            labels[int(key)] = str(value)
        except (TypeError, ValueError):
            log.warning("config.json id2label has a non-integer key %r; ignored", key)
    return labels


def _eos_ids(*configs: Mapping[str, Any]) -> frozenset[int]:
    ids: set[int] = set()
    for config in configs:
        value = config.get("eos_token_id")
        values = value if isinstance(value, list) else [value]
        ids.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return frozenset(ids)


def _pad_id(tokenizer: Any | None, config: Mapping[str, Any]) -> int:
    """Any id works for padding (the mask hides it); prefer the model's own."""
    value = config.get("pad_token_id")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if tokenizer is not None:
        for token in ("[PAD]", "<pad>", "<|endoftext|>", "</s>"):
            found = tokenizer.token_to_id(token)
            if isinstance(found, int):
                return found
    return 0
