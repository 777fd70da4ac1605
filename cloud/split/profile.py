"""Per-layer cost of a model, measured on this host with ONNX Runtime, and the bytes a split sends.

:func:`profile_model` exports small ONNX graphs of one Hugging Face model with torch's legacy
exporter — the embeddings, each transformer layer on its own, and the task head (mean pooling,
pooler + classifier, or final norm + LM head on the last position) — times each with ONNX
Runtime at the requested ``(batch, seq)`` after a warm-up, and records the median milliseconds
per component in a :class:`ModelProfile`. Decoders are timed twice: the prompt pass at
``(batch, seq)`` and one generation step at ``(batch, 1)``.

What the numbers leave out, so nobody reads more into them:

* a generation step is timed without a KV cache, i.e. without attention over earlier tokens; that
  attention costs ~``2·past·hidden`` multiply-adds per layer against ~``24·hidden²`` for the
  projections and MLP, a few percent while ``past`` stays well below ``12·hidden``;
* each component runs in its own session, so the sum carries a few session-call overheads
  (tens of microseconds each) that one fused graph would not;
* the graphs are plain fp32; a quantized artifact runs faster (1.15–1.3× for int8 on this host,
  STACK.md) on edge and cloud alike, which the planner's ratios absorb.

Activation bytes are exact wire sizes: the hidden state (and attention mask) encoded with the
tensor wire format (:mod:`edgefed.common.tensors`) plus :data:`MESSAGE_OVERHEAD_BYTES` for the
MQTT/JSON envelope. They are the *same for every split point*: a transformer's hidden state has
the shape ``(batch, seq, hidden)`` after every layer, unlike the shrinking feature maps of CNNs.

:func:`time_onnx_files` is the timing core on its own: any list of ONNX files, inputs made up
from each graph's declared input shapes; an agent can run the same measurement on its device and
report a :class:`~edgefed.common.devices.MeasuredDeviceReport`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from edgefed.cloud.compress.config import TASKS, Task
from edgefed.cloud.split.errors import SplitError, SplitPointError
from edgefed.cloud.split.partition_torch import load_model, quiet_export
from edgefed.common.devices import DeviceProfile
from edgefed.common.tensors import Compression, encode_tensors

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "MESSAGE_OVERHEAD_BYTES",
    "WIRE_DTYPES",
    "ComponentTimes",
    "GraphTiming",
    "ModelProfile",
    "ProfileError",
    "WireDtype",
    "component_graphs",
    "infer_task",
    "profile_model",
    "scale",
    "time_onnx_files",
]

WireDtype = Literal["fp32", "fp16", "int8"]
WIRE_DTYPES: tuple[WireDtype, ...] = ("fp32", "fp16", "int8")
_COMPRESSION: dict[WireDtype, Compression] = {
    "fp32": Compression.NONE,
    "fp16": Compression.FP16,
    "int8": Compression.INT8,
}

MESSAGE_OVERHEAD_BYTES = 512
"""Approximate bytes around a tensor payload on the wire: MQTT v5 fixed header, topic, response
topic and correlation data, and the JSON request/reply envelope. Small next to any activation."""

_OPSET = 17
_EXPORT_BATCH, _EXPORT_SEQ = 2, 8  # example shapes for export (axes are dynamic)
_TOKEN_ID_RANGE = 100  # made-up token ids stay below every vocabulary's size


class ProfileError(SplitError):
    """A model cannot be profiled (unsupported architecture, bad shapes, a graph that fails)."""


# --------------------------------------------------------------------------- the profile


class ComponentTimes(BaseModel):
    """Median milliseconds of each component for one pass at one shape."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    embed_ms: float = Field(ge=0)
    layer_ms: list[float] = Field(min_length=1)
    head_ms: float = Field(ge=0)

    @property
    def total_ms(self) -> float:
        return self.embed_ms + sum(self.layer_ms) + self.head_ms

    def edge_ms(self, k: int) -> float:
        """Embeddings plus layers ``[0:k]`` (what a head of split point ``k`` computes)."""
        return self.embed_ms + sum(self.layer_ms[:k])

    def cloud_ms(self, k: int) -> float:
        """Layers ``[k:]`` plus the task head (what a tail of split point ``k`` computes)."""
        return sum(self.layer_ms[k:]) + self.head_ms

    def scaled(self, factor: float) -> ComponentTimes:
        return ComponentTimes(
            embed_ms=self.embed_ms * factor,
            layer_ms=[ms * factor for ms in self.layer_ms],
            head_ms=self.head_ms * factor,
        )


class ModelProfile(BaseModel):
    """Where a model spends its time and what crossing the link at each point costs in bytes.

    Times are for ``device`` (``reference`` = measured on this host; :func:`scale` makes the
    profile of another device). Byte counts are wire sizes including
    :data:`MESSAGE_OVERHEAD_BYTES`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    model: str
    architecture: str
    task: Task
    kind: Literal["encoder", "decoder"]
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    batch: int = Field(ge=1)
    seq: int = Field(ge=1)
    """Sequence length measured at (the prompt length for decoders)."""
    device: str = "reference"
    providers: list[str]
    measured_at: datetime

    forward: ComponentTimes
    """One pass at ``(batch, seq)``: the whole request for an encoder, the prompt for a decoder."""
    decode_step: ComponentTimes | None = None
    """Decoders: one generated token at ``(batch, 1)`` (no KV-cache attention, see module doc)."""

    embed_params: int = Field(ge=0)
    layer_params: list[int]
    head_params: int = Field(ge=0)
    """Parameters of the task head not shared with the embeddings (tied LM heads count once)."""

    input_bytes: int = Field(gt=0)
    """The raw request on the wire (token ids and attention mask): what all-cloud sends up."""
    output_bytes: int = Field(gt=0)
    """The result on the wire (embedding, logits; for decoders the generated token ids of one
    step): what comes back down."""
    activation_bytes: dict[WireDtype, int]
    """One hidden state ``(batch, seq, hidden)`` plus attention mask on the wire, per transfer
    dtype. The same at every split point."""
    step_activation_bytes: dict[WireDtype, int] | None = None
    """Decoders: one hidden vector ``(batch, 1, hidden)`` per generated token, per dtype."""
    step_input_bytes: int | None = None
    """Decoders: the next token id sent back to the device after each step."""

    graphs_sha256: dict[str, str] = Field(default_factory=dict)
    """SHA-256 of each timed graph (``embed``, ``layer0``…, ``head``), so a device can time the
    very same graphs and report a measured speed factor."""

    def check_split_point(self, k: int) -> int:
        """``k`` when ``1 <= k < num_layers``; :class:`SplitPointError` otherwise."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < self.num_layers:
            raise SplitPointError(
                f"split point {k!r} is out of range for {self.model} with {self.num_layers} "
                f"layers: a split keeps 1 to {self.num_layers - 1} layers on the edge"
            )
        return k

    def activation_bytes_at(self, k: int, dtype: WireDtype) -> int:
        """Bytes sent up for split point ``k`` in ``dtype`` (identical for every valid ``k``)."""
        self.check_split_point(k)
        return self.activation_bytes[_check_dtype(dtype)]

    def edge_weight_bytes(self, k: int, bytes_per_param: float) -> int:
        """Weights a device holds for a head of split point ``k`` (``num_layers``: the whole
        model with its task head)."""
        if not 0 <= k <= self.num_layers:
            raise SplitPointError(f"split point {k} is outside 0..{self.num_layers}")
        if k == 0:
            return 0
        params = self.embed_params + sum(self.layer_params[:k])
        if k == self.num_layers:
            params += self.head_params
        return math.ceil(params * bytes_per_param)

    def reference_ms(self) -> dict[str, float]:
        """Median ms per timed graph (names as in :attr:`graphs_sha256`) of the forward pass."""
        times = {"embed": self.forward.embed_ms, "head": self.forward.head_ms}
        times.update({f"layer{i}": ms for i, ms in enumerate(self.forward.layer_ms)})
        return times


def _check_dtype(dtype: str) -> WireDtype:
    for known in WIRE_DTYPES:
        if dtype == known:
            return known
    raise ProfileError(f"unknown transfer dtype {dtype!r} (known: {', '.join(WIRE_DTYPES)})")


def scale(profile: ModelProfile, device: DeviceProfile) -> ModelProfile:
    """``profile`` as ``device`` would measure it: every time multiplied by its speed factor.

    Only a reference-host profile can be scaled (factors are relative to that host)."""
    if profile.device != "reference":
        raise ProfileError(
            f"profile of {profile.model} is already scaled to {profile.device!r}; "
            "scale the reference-host profile instead"
        )
    factor = device.speed_factor
    return profile.model_copy(
        update={
            "device": device.name,
            "providers": list(device.providers),
            "forward": profile.forward.scaled(factor),
            "decode_step": None
            if profile.decode_step is None
            else profile.decode_step.scaled(factor),
        }
    )


# --------------------------------------------------------------------------- timing core


@dataclass(frozen=True, slots=True)
class GraphTiming:
    """Median milliseconds of one ONNX graph at one shape."""

    path: Path
    sha256: str
    median_ms: float
    runs: int
    providers: tuple[str, ...]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_NP_OF_ONNX: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def _made_up_input(
    name: str, onnx_type: str, shape: Sequence[Any], dims: Mapping[str, int], graph: Path
) -> npt.NDArray[Any]:
    concrete: list[int] = []
    for d in shape:
        if isinstance(d, int) and d >= 0:
            concrete.append(d)
        elif isinstance(d, str) and d in dims:
            concrete.append(dims[d])
        else:
            raise ProfileError(
                f"{graph.name}: input {name!r} has dimension {d!r}; give its size in dims "
                f"(given: {', '.join(f'{k}={v}' for k, v in dims.items()) or 'none'})"
            )
    np_type = _NP_OF_ONNX.get(onnx_type)
    if np_type is None:
        raise ProfileError(f"{graph.name}: input {name!r} has unsupported type {onnx_type}")
    rng = np.random.default_rng(0)
    if np_type is np.bool_ or "mask" in name:
        return np.ones(concrete, dtype=np_type)
    if np.issubdtype(np_type, np.integer):
        if "input_ids" in name:
            return rng.integers(0, _TOKEN_ID_RANGE, size=concrete).astype(np_type)
        if "position" in name and concrete:
            return np.broadcast_to(np.arange(concrete[-1]), concrete).astype(np_type)
        return np.zeros(concrete, dtype=np_type)  # token types, segment ids, cache positions
    return rng.standard_normal(concrete).astype(np_type)


def time_onnx_files(
    files: Sequence[Path],
    dims: Mapping[str, int],
    *,
    warmup: int = 3,
    repeats: int = 15,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    intra_op_threads: int | None = None,
) -> list[GraphTiming]:
    """Median milliseconds of each ONNX file in ``files``, run with made-up inputs.

    Every input is shaped from the graph's declared shape, symbolic dimensions taken from
    ``dims`` (e.g. ``{"batch": 1, "seq": 128}``); masks are ones, ``input_ids`` small token ids,
    position ids ``0..n-1``, other integer inputs zeros, floating inputs standard normal. Each
    graph runs ``warmup`` times untimed, then ``repeats`` timed runs; the median is kept. Needs
    only ONNX Runtime and numpy, so the same measurement can run on a device.
    """
    import onnxruntime as ort

    if warmup < 0 or repeats < 1:
        raise ProfileError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    bad = {k: v for k, v in dims.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ProfileError(f"dimension sizes must be positive integers, got {bad}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    timings: list[GraphTiming] = []
    for raw_path in files:
        path = Path(raw_path)
        if not path.is_file():
            raise ProfileError(f"ONNX graph {path} does not exist")
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=list(providers)
            )
        except Exception as exc:  # ORT raises its own untyped exception classes
            raise ProfileError(
                f"ONNX Runtime cannot load {path}: {type(exc).__name__}: {exc}"
            ) from exc
        feeds = {
            i.name: _made_up_input(i.name, i.type, i.shape, dims, path)
            for i in session.get_inputs()
        }
        runs: list[float] = []
        try:
            for _ in range(warmup):
                session.run(None, feeds)
            for _ in range(repeats):
                start = time.perf_counter()
                session.run(None, feeds)
                runs.append((time.perf_counter() - start) * 1000.0)
        except Exception as exc:  # ORT's untyped runtime errors (shape mismatches, ...)
            raise ProfileError(f"{path} does not run at {dict(dims)}: {exc}") from exc
        timings.append(
            GraphTiming(
                path=path,
                sha256=sha256_of(path),
                median_ms=statistics.median(runs),
                runs=repeats,
                providers=tuple(session.get_providers()),
            )
        )
    return timings


# --------------------------------------------------------------------------- component graphs


@dataclass(frozen=True, slots=True)
class ComponentGraphs:
    """The exported component graphs of one model and what the profile needs to know about it."""

    kind: Literal["encoder", "decoder"]
    architecture: str
    task: Task
    hidden_size: int
    embed: Path
    layers: list[Path]
    head: Path
    embed_params: int
    layer_params: list[int]
    head_params: int
    output_width: int
    """Width of one result row: hidden size (embeddings) or number of labels (classification)."""

    @property
    def named(self) -> dict[str, Path]:
        graphs = {"embed": self.embed}
        graphs.update({f"layer{i}": p for i, p in enumerate(self.layers)})
        graphs["head"] = self.head
        return graphs


def infer_task(model_dir: Path) -> Task:
    """The task a model directory is for, from its config's architectures: sequence classifiers
    are ``text-classification``, causal LMs ``text-generation``, anything else
    ``feature-extraction``."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise ProfileError(f"{model_dir} is not a Hugging Face model directory: no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProfileError(f"cannot read {config_path}: {exc}") from exc
    architectures = [str(a) for a in (config.get("architectures") or [])]
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "text-classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "text-generation"
    return "feature-extraction"


def _params(*modules: Any, exclude: set[int] | None = None) -> int:
    seen = set(exclude or ())
    total = 0
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += int(p.numel())
    return total


def _param_ids(*modules: Any) -> set[int]:
    return {id(p) for m in modules if m is not None for p in m.parameters()}


def _export(
    module: Any,
    args: tuple[Any, ...],
    path: Path,
    names: Sequence[str],
    axes: Mapping[str, Mapping[int, str]],
) -> Path:
    import torch

    try:
        with quiet_export(), torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=list(names),
                output_names=["output"],
                dynamic_axes={n: dict(a) for n, a in axes.items()},
                opset_version=_OPSET,
                do_constant_folding=True,
            )
    except Exception as exc:  # the tracer raises anything from RuntimeError to TypeError
        raise ProfileError(f"exporting {path.stem} failed: {type(exc).__name__}: {exc}") from exc
    return path


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple | list) else out


def component_graphs(
    model_dir: Path, out_dir: Path, *, task: Task | None = None
) -> ComponentGraphs:
    """Export the embeddings, every transformer layer and the task head of the model in
    ``model_dir`` as separate ONNX graphs under ``out_dir`` (dynamic ``batch`` and ``seq``).

    Supported: BERT-like encoders (BERT, MiniLM, RoBERTa, ELECTRA) for ``feature-extraction`` and
    ``text-classification``, GPT-2 and Llama-family decoders (Llama, SmolLM, Qwen2, Mistral) for
    ``text-generation``.
    """
    import torch

    model_dir = Path(model_dir)
    chosen: Task = task if task is not None else infer_task(model_dir)
    if chosen not in TASKS:
        raise ProfileError(f"unsupported task {chosen!r} (supported: {', '.join(TASKS)})")
    if not (model_dir / "config.json").is_file():
        raise ProfileError(f"{model_dir} is not a Hugging Face model directory: no config.json")
    try:
        model = load_model(model_dir, chosen)
    except SplitError as exc:
        raise ProfileError(exc.message) from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    builder = _builder_for(model, chosen)
    with torch.no_grad():
        return builder(model, chosen, out_dir)


_Builder = Callable[[Any, Task, Path], ComponentGraphs]


def _builder_for(model: Any, task: Task) -> _Builder:
    base = getattr(model, "base_model", model)
    arch = type(model).__name__
    if task != "text-generation":
        if hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer"):
            return _encoder_graphs
    elif hasattr(base, "wte") and hasattr(base, "h"):
        return _gpt2_graphs
    elif hasattr(base, "embed_tokens") and hasattr(base, "layers") and hasattr(base, "rotary_emb"):
        return _llama_graphs
    raise ProfileError(
        f"cannot profile {arch} for {task}: supported are BERT-like encoders (BERT, MiniLM, "
        "RoBERTa, ELECTRA) and GPT-2 / Llama-family decoders"
    )


def _encoder_graphs(model: Any, task: Task, out: Path) -> ComponentGraphs:
    import torch
    from torch import nn

    base = model.base_model
    layers = list(base.encoder.layer)
    hidden_size = int(model.config.hidden_size)
    ids = torch.randint(0, _TOKEN_ID_RANGE, (_EXPORT_BATCH, _EXPORT_SEQ))
    mask = torch.ones(_EXPORT_BATCH, _EXPORT_SEQ, dtype=torch.int64)
    hidden = torch.randn(_EXPORT_BATCH, _EXPORT_SEQ, hidden_size)
    token_types = getattr(base.embeddings, "token_type_embeddings", None) is not None

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = base.embeddings

        def forward(self, input_ids: torch.Tensor) -> Any:
            positions = torch.cumsum(torch.ones_like(input_ids), dim=1) - 1
            extra = {"token_type_ids": torch.zeros_like(input_ids)} if token_types else {}
            return self.embeddings(input_ids=input_ids, position_ids=positions, **extra)

    class Layer(nn.Module):
        def __init__(self, layer: Any) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            bias = (1.0 - attention_mask[:, None, None, :].to(hidden_states.dtype)) * -1e9
            return _first(self.layer(hidden_states, attention_mask=bias))

    classifier = getattr(model, "classifier", None)
    pooler = getattr(base, "pooler", None)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = classifier
            self.pooler = pooler

        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            if task == "text-classification" and self.classifier is not None:
                if self.pooler is not None:
                    return self.classifier(self.pooler(hidden_states))
                return self.classifier(hidden_states)
            m = attention_mask[:, :, None].to(hidden_states.dtype)
            return (hidden_states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    if task == "text-classification" and classifier is None:
        raise ProfileError(f"{type(model).__name__} has no classifier to profile")
    seq_axes = {0: "batch", 1: "seq"}
    embed = _export(Embed(), (ids,), out / "embed.onnx", ["input_ids"], {"input_ids": seq_axes})
    layer_paths = [
        _export(
            Layer(layer),
            (hidden, mask),
            out / f"layer{i}.onnx",
            ["hidden_states", "attention_mask"],
            {"hidden_states": seq_axes, "attention_mask": seq_axes},
        )
        for i, layer in enumerate(layers)
    ]
    head = Head()
    head_path = _export(
        head,
        (hidden, mask),
        out / "head.onnx",
        ["hidden_states", "attention_mask"],
        {"hidden_states": seq_axes, "attention_mask": seq_axes},
    )
    with torch.no_grad():
        width = int(head(hidden, mask).shape[-1])
    head_modules = (pooler, classifier) if task == "text-classification" else ()
    return ComponentGraphs(
        kind="encoder",
        architecture=type(model).__name__,
        task=task,
        hidden_size=hidden_size,
        embed=embed,
        layers=layer_paths,
        head=head_path,
        embed_params=_params(base.embeddings),
        layer_params=[_params(layer) for layer in layers],
        head_params=_params(*head_modules),
        output_width=width,
    )


def _causal_bias(seq: int) -> torch.Tensor:
    import torch

    return torch.triu(torch.full((seq, seq), -1e9), diagonal=1)[None, None].expand(
        _EXPORT_BATCH, 1, seq, seq
    )


def _decoder_graphs(
    model: Any,
    out: Path,
    *,
    embed_module: Any,
    embed_modules: Sequence[Any],
    layers: Sequence[Any],
    layer_call: Callable[[Any, torch.Tensor, torch.Tensor], Any],
    norm: Any,
    hidden_size: int,
) -> ComponentGraphs:
    import torch
    from torch import nn

    ids = torch.randint(0, _TOKEN_ID_RANGE, (_EXPORT_BATCH, _EXPORT_SEQ))
    hidden = torch.randn(_EXPORT_BATCH, _EXPORT_SEQ, hidden_size)
    bias = _causal_bias(_EXPORT_SEQ).contiguous()
    lm_head = model.get_output_embeddings()

    class Layer(nn.Module):
        def __init__(self, layer: Any) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor) -> Any:
            return _first(layer_call(self.layer, hidden_states, attention_bias))

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = norm
            self.lm_head = lm_head

        def forward(self, hidden_states: torch.Tensor) -> Any:
            return self.lm_head(self.norm(hidden_states[:, -1:, :]))

    seq_axes = {0: "batch", 1: "seq"}
    embed = _export(
        embed_module, (ids,), out / "embed.onnx", ["input_ids"], {"input_ids": seq_axes}
    )
    layer_paths = [
        _export(
            Layer(layer),
            (hidden, bias),
            out / f"layer{i}.onnx",
            ["hidden_states", "attention_bias"],
            {"hidden_states": seq_axes, "attention_bias": {0: "batch", 2: "seq", 3: "seq"}},
        )
        for i, layer in enumerate(layers)
    ]
    head_path = _export(
        Head(), (hidden,), out / "head.onnx", ["hidden_states"], {"hidden_states": seq_axes}
    )
    shared = _param_ids(*embed_modules)
    return ComponentGraphs(
        kind="decoder",
        architecture=type(model).__name__,
        task="text-generation",
        hidden_size=hidden_size,
        embed=embed,
        layers=layer_paths,
        head=head_path,
        embed_params=_params(*embed_modules),
        layer_params=[_params(layer) for layer in layers],
        head_params=_params(norm, lm_head, exclude=shared),
        output_width=1,
    )


def _gpt2_graphs(model: Any, task: Task, out: Path) -> ComponentGraphs:
    import torch
    from torch import nn

    base = model.base_model

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = base.wte, base.wpe

        def forward(self, input_ids: torch.Tensor) -> Any:
            positions = torch.cumsum(torch.ones_like(input_ids), dim=1) - 1
            return self.wte(input_ids) + self.wpe(positions)

    return _decoder_graphs(
        model,
        out,
        embed_module=Embed(),
        embed_modules=(base.wte, base.wpe),
        layers=list(base.h),
        layer_call=lambda layer, h, b: layer(h, attention_mask=b),
        norm=base.ln_f,
        hidden_size=int(model.config.hidden_size),
    )


def _llama_graphs(model: Any, task: Task, out: Path) -> ComponentGraphs:
    import torch
    from torch import nn

    base = model.base_model
    rotary = base.rotary_emb

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = base.embed_tokens

        def forward(self, input_ids: torch.Tensor) -> Any:
            return self.embed_tokens(input_ids)

    def call(layer: Any, hidden: torch.Tensor, bias: torch.Tensor) -> Any:
        positions = torch.cumsum(torch.ones_like(hidden[:, :, 0], dtype=torch.int64), dim=1) - 1
        cos_sin = rotary(hidden, positions)
        return layer(
            hidden, attention_mask=bias, position_ids=positions, position_embeddings=cos_sin
        )

    return _decoder_graphs(
        model,
        out,
        embed_module=Embed(),
        embed_modules=(base.embed_tokens,),
        layers=list(base.layers),
        layer_call=call,
        norm=base.norm,
        hidden_size=int(model.config.hidden_size),
    )


# --------------------------------------------------------------------------- profiling


def _wire_bytes(arrays: Mapping[str, npt.NDArray[Any]], dtype: WireDtype) -> int:
    return len(encode_tensors(arrays, compression=_COMPRESSION[dtype])) + MESSAGE_OVERHEAD_BYTES


def _times(graphs: ComponentGraphs, timings: Mapping[Path, GraphTiming]) -> ComponentTimes:
    return ComponentTimes(
        embed_ms=timings[graphs.embed].median_ms,
        layer_ms=[timings[p].median_ms for p in graphs.layers],
        head_ms=timings[graphs.head].median_ms,
    )


def profile_model(
    model_dir: Path,
    *,
    task: Task | None = None,
    batch: int = 1,
    seq: int = 128,
    warmup: int = 3,
    repeats: int = 15,
    graphs_dir: Path | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ModelProfile:
    """Measure the per-component cost of the model in ``model_dir`` on this host.

    ``task`` defaults to :func:`infer_task`. ``seq`` is the request length for encoders and the
    prompt length for decoders. The component graphs are written to ``graphs_dir`` when given
    (a device can time the same files later), else to a temporary directory.
    """
    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProfileError(f"{name} must be a positive integer, got {value!r}")
    with contextlib.ExitStack() as stack:
        out = graphs_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="profile-"))
        )
        graphs = component_graphs(Path(model_dir), Path(out), task=task)
        files = list(graphs.named.values())
        forward = {
            t.path: t
            for t in time_onnx_files(
                files,
                {"batch": batch, "seq": seq},
                warmup=warmup,
                repeats=repeats,
                providers=providers,
            )
        }
        step = None
        if graphs.kind == "decoder":
            step = {
                t.path: t
                for t in time_onnx_files(
                    files,
                    {"batch": batch, "seq": 1},
                    warmup=warmup,
                    repeats=repeats,
                    providers=providers,
                )
            }
        used_providers = list(next(iter(forward.values())).providers)
        sha = {name: forward[p].sha256 for name, p in graphs.named.items()}
    return _assemble(
        graphs,
        Path(model_dir),
        batch,
        seq,
        _times(graphs, forward),
        None if step is None else _times(graphs, step),
        used_providers,
        sha,
    )


def _assemble(
    graphs: ComponentGraphs,
    model_dir: Path,
    batch: int,
    seq: int,
    forward: ComponentTimes,
    step: ComponentTimes | None,
    providers: list[str],
    sha: dict[str, str],
) -> ModelProfile:
    tokens = np.zeros((batch, seq), dtype=np.int64)
    raw = {"input_ids": tokens, "attention_mask": tokens}
    hidden = np.zeros((batch, seq, graphs.hidden_size), dtype=np.float32)
    activation = {
        d: _wire_bytes({"hidden_states": hidden, "attention_mask": tokens}, d) for d in WIRE_DTYPES
    }
    decoder = graphs.kind == "decoder"
    if decoder:
        one_token = np.zeros((batch, 1), dtype=np.int64)
        output = _wire_bytes({"token_ids": one_token}, "fp32")
        step_hidden = np.zeros((batch, 1, graphs.hidden_size), dtype=np.float32)
        step_activation: dict[WireDtype, int] | None = {
            d: _wire_bytes({"hidden_states": step_hidden}, d) for d in WIRE_DTYPES
        }
        step_input: int | None = output
    else:
        result = np.zeros((batch, graphs.output_width), dtype=np.float32)
        output = _wire_bytes({"output": result}, "fp32")
        step_activation, step_input = None, None
    return ModelProfile(
        model=model_dir.name or str(model_dir),
        architecture=graphs.architecture,
        task=graphs.task,
        kind=graphs.kind,
        num_layers=len(graphs.layers),
        hidden_size=graphs.hidden_size,
        batch=batch,
        seq=seq,
        providers=providers,
        measured_at=datetime.now(UTC),
        forward=forward,
        decode_step=step,
        embed_params=graphs.embed_params,
        layer_params=graphs.layer_params,
        head_params=graphs.head_params,
        input_bytes=_wire_bytes(raw, "fp32"),
        output_bytes=output,
        activation_bytes=activation,
        step_activation_bytes=step_activation,
        step_input_bytes=step_input,
        graphs_sha256=sha,
    )
