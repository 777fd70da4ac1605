"""Prepare an exported fp32 ONNX model for one device target: int8 (dynamic or static), fp16, or
a plain copy.

Always quantize the plain export (:func:`edgefed.cloud.compress.export.export_onnx`): quantizing
an O2-optimised graph fails in ONNX Runtime's quantizer, and ORT optimises the graph itself when
the edge agent loads it.

What each scheme writes (all int8 schemes are per-channel: per-tensor int8 lost ~3 points of
cosine on MiniLM):

========================  ==================================================================
target (scheme, isa)      configuration
========================  ==================================================================
``fp32`` (none)           the fp32 graph copied unchanged
``x86-avx2``              Optimum ``AutoQuantizationConfig.avx2(is_static=False,
(dynamic-int8, avx2)      per_channel=True)`` with **unsigned** weights (``QUInt8``,
                          symmetric, zero point 128), ``reduce_range=False``, u8 activations.
                          AVX2 without VNNI multiplies u8 x s8 with ``VPMADDUBSW``, which
                          adds pairs into a *saturating* int16: signed weights at full range
                          saturate and destroy decoders. u8 x u8 goes through a widening
                          16-bit path without saturation, so full 8-bit range is kept
                          (``reduce_range`` would waste a bit). Both are set explicitly here.
``x86-avx512-vnni``       ``AutoQuantizationConfig.avx512_vnni(is_static=False,
(dynamic-int8)            per_channel=True)`` (s8 symmetric weights, u8 activations) with
                          ``reduce_range=True`` (7-bit weights, -64..63). ``VPDPBUSD`` does
                          not saturate, but the model is validated on the cloud host, and on
                          an AVX2 host without VNNI full-range s8 weights do saturate (tiny
                          GPT-2: top-1 agreement 0.73 instead of 0.95). 7-bit weights cannot
                          overflow the int16 pair sums anywhere and cost nothing measurable
                          (MiniLM cosine 0.991 either way); speed on the target is unchanged.
``arm64`` (dynamic-int8)  ``AutoQuantizationConfig.arm64(is_static=False, per_channel=True)``
                          (s8 symmetric weights, u8 activations: u8 x s8 is fastest on
                          ARM64) with ``reduce_range=True``, for the same reason.
``static-int8``           ``AutoQuantizationConfig.avx2(is_static=True, per_channel=True)``
(static-int8, avx2)       (QDQ format, u8 activations, u8 symmetric weights) restricted to
                          ``MatMul``/``Gemm``/``Gather`` (:data:`STATIC_OPERATORS`), with FFN
                          down-projections and activation x activation MatMuls left in fp32
                          (:func:`static_nodes_to_exclude`); activation ranges calibrated
                          with MinMax on the calibration texts (one text per batch, unpadded).
                          ORT's default QDQ op list (LayerNorm, Where, Reshape, ...) and the
                          post-GELU outliers took MiniLM to cosine 0.87; this keeps 0.99, at
                          ~1.5x the size of dynamic int8 (33.6 vs 23.0 MB for MiniLM).
``gpu-fp16`` (fp16)       ``onnxruntime.transformers.float16.convert_float_to_float16(
                          keep_io_types=True)``: float16 weights and compute, float32 inputs
                          and outputs (ORT's default op block list keeps a few numerically
                          fragile ops in fp32). For CUDA/TensorRT/Jetson: dynamic int8 does
                          not run on the CUDA provider. ORT's CPU provider also loads and runs
                          the graph, which is how it is checked here (not how it is served).
========================  ==================================================================
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefed.cloud.compress.config import TargetProfile, Task
from edgefed.cloud.compress.errors import ExportError, QuantizationError
from edgefed.cloud.compress.runtime import OnnxRunner, find_onnx_model

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_FILE",
    "STATIC_OPERATORS",
    "quantization_config",
    "quantize",
    "static_nodes_to_exclude",
]

MODEL_FILE = "model.onnx"
#: Above this many bytes a graph keeps its weights in a separate file (protobuf limit: 2 GiB).
_EXTERNAL_DATA_BYTES = 1_800_000_000
#: Files of an export folder that are not the graph; copied next to every prepared model.
_SKIP_SUFFIXES = (".onnx", ".onnx_data", ".onnx.data")


class _DropOrtQuantizationChatter(logging.Filter):
    """ORT's quantizer logs warnings straight on the root logger ("Expected bias ... to be an
    initializer"); drop those below ERROR while we quantize, leave every other record alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_ort = "onnxruntime" in record.pathname and "quantization" in record.pathname
        return not (from_ort and record.levelno < logging.ERROR)


@contextlib.contextmanager
def _quiet_ort_quantization() -> Iterator[None]:
    root = logging.getLogger()
    quiet = _DropOrtQuantizationChatter()
    root.addFilter(quiet)
    optimum_logger = logging.getLogger("optimum")
    level = optimum_logger.level
    optimum_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        optimum_logger.setLevel(level)
        root.removeFilter(quiet)


def quantization_config(target: TargetProfile, *, is_static: bool) -> Any:
    """Optimum ``QuantizationConfig`` for an int8 target (see the module table for the values)."""
    from onnxruntime.quantization import QuantType
    from optimum.onnxruntime.configuration import (  # type: ignore[import-untyped]
        AutoQuantizationConfig,
    )

    if target.isa == "avx2":
        cfg = AutoQuantizationConfig.avx2(is_static=is_static, per_channel=True, reduce_range=False)
        # Unsigned weights: u8 x u8 has no VPMADDUBSW saturation on AVX2 (Optimum's default today,
        # pinned here so a library change cannot bring saturation back).
        cfg.weights_dtype = QuantType.QUInt8
        cfg.reduce_range = False
    elif target.isa == "avx512_vnni":
        cfg = AutoQuantizationConfig.avx512_vnni(is_static=is_static, per_channel=True)
        # 7-bit weights: no saturation on whatever host validates the model (module doc).
        cfg.reduce_range = True
    elif target.isa == "arm64":
        cfg = AutoQuantizationConfig.arm64(is_static=is_static, per_channel=True)
        cfg.reduce_range = True
    else:
        raise QuantizationError(
            f"target {target.name!r}: no int8 configuration for instruction set {target.isa!r}"
        )
    return cfg


def _source_bytes(model_file: Path) -> int:
    total = model_file.stat().st_size
    for data in model_file.parent.glob(model_file.name + "*"):
        if data != model_file and data.is_file():
            total += data.stat().st_size
    return total


def _copy_support_files(src_dir: Path, out_dir: Path) -> None:
    """Config, generation config and tokenizer files (everything that is not a graph)."""
    for item in src_dir.iterdir():
        wanted = item.is_file() and not item.name.endswith(_SKIP_SUFFIXES)
        if wanted and not (out_dir / item.name).exists():
            shutil.copy2(item, out_dir / item.name)


def _copy_fp32(model_file: Path, out_dir: Path) -> None:
    shutil.copy2(model_file, out_dir / MODEL_FILE)
    for data in model_file.parent.glob(model_file.name + "_data"):
        shutil.copy2(data, out_dir / data.name)


def _dynamic_int8(model_file: Path, out_dir: Path, target: TargetProfile) -> None:
    from optimum.onnxruntime import ORTQuantizer  # type: ignore[import-untyped]

    qconfig = quantization_config(target, is_static=False)
    quantizer = ORTQuantizer.from_pretrained(model_file.parent, file_name=model_file.name)
    use_external = _source_bytes(model_file) // 4 > _EXTERNAL_DATA_BYTES
    quantizer.quantize(qconfig, save_dir=out_dir, use_external_data_format=use_external)
    _rename_quantized(out_dir, model_file.stem)


#: Operators static int8 quantizes: linear layers and embedding lookups. Not LayerNormalization,
#: Where, Reshape, ... (ORT's default QDQ list): quantizing those cost MiniLM 0.12 of cosine.
STATIC_OPERATORS: tuple[str, ...] = ("MatMul", "Gemm", "Gather")
#: Activation functions; a linear layer fed (through elementwise ops) by one of them is an FFN
#: down-projection. GELU exports as ``Erf`` (or ``Tanh``) inside Mul/Add, SwiGLU as ``Sigmoid``.
_ACTIVATION_OPS = frozenset(
    {"Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "FastGelu", "QuickGelu", "BiasGelu", "Softplus"}
)
#: Elementwise ops the search walks back through, and shape ops it follows on their data input
#: (GPT-2's Conv1D reshapes around its Gemm). It stops at anything else: a MatMul,
#: LayerNormalization, ReduceMean, ...
_ELEMENTWISE_OPS = frozenset({"Mul", "Add", "Sub", "Div", "Cast", "Pow", "Sqrt", "Neg", "Identity"})
_SHAPE_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"})


def static_nodes_to_exclude(model_file: Path) -> list[str]:
    """Nodes static int8 leaves in float: FFN down-projections and activation x activation
    MatMuls (attention scores and context, rotary tables).

    A down-projection is a MatMul/Gemm with a weight whose activation input comes, through a few
    elementwise ops, from an activation function: post-GELU/SwiGLU values are mostly near zero
    with a few large outliers, which one per-tensor activation scale cannot cover (on MiniLM,
    quantizing them drops the mean cosine to fp32 from 0.99 to 0.95). Found from the graph
    structure, so it works for BERT, GPT-2 and Llama-style graphs without knowing node names;
    an RMSNorm's ``x * rsqrt(...) * weight`` has no activation function and is not matched.
    """
    import onnx

    graph = onnx.load(model_file.as_posix(), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    weights |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    producer = {out: node for node in graph.node for out in node.output}

    def from_activation(tensor: str, depth: int) -> bool:
        node = producer.get(tensor)
        if node is None or depth == 0:
            return False
        if node.op_type in _ACTIVATION_OPS:
            return True
        if node.op_type in _SHAPE_OPS:
            return from_activation(node.input[0], depth - 1)
        if node.op_type not in _ELEMENTWISE_OPS:
            return False
        return any(from_activation(name, depth - 1) for name in node.input if name not in weights)

    excluded: list[str] = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        activations = [name for name in node.input[:2] if name not in weights]
        if len(activations) == 2 or (activations and from_activation(activations[0], 6)):
            excluded.append(node.name)
    return excluded


class _CalibrationReader:
    """ONNX Runtime calibration data reader (it duck-types ``get_next``): one text per batch,
    unpadded, with every input the graph declares (token type ids, position ids, empty past for
    decoders) built exactly as :class:`OnnxRunner` builds them."""

    def __init__(self, runner: OnnxRunner, encoded: Sequence[tuple[list[int], list[int]]]) -> None:
        self._runner = runner
        self._rows = iter(encoded)

    def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
        try:
            ids, mask = next(self._rows)
        except StopIteration:
            return None
        return self._runner.feeds(
            np.asarray([ids], dtype=np.int64), np.asarray([mask], dtype=np.int64)
        )


def _static_int8(
    model_file: Path,
    out_dir: Path,
    target: TargetProfile,
    task: Task,
    calibration: tuple[Any, Sequence[str]],
    max_length: int,
) -> None:
    """Calibrate activation ranges (MinMax) with ORT's calibrator fed by our own reader, then let
    Optimum's quantizer write the QDQ graph.

    Not ``ORTQuantizer.fit``: a ``datasets.Dataset`` cannot hold the empty
    ``(batch, heads, 0, head_dim)`` past tensors a decoder with KV cache takes, and Optimum's
    calibrator keeps every intermediate tensor of every example in memory (ORT's
    ``max_intermediate_outputs`` bounds that here).
    """
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator
    from optimum.onnxruntime import ORTQuantizer

    tokenizer, texts = calibration
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise QuantizationError(f"target {target.name!r}: the calibration set has no texts")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    encoded = list(zip(enc["input_ids"], enc["attention_mask"], strict=True))
    runner = OnnxRunner(model_file, task)
    qconfig = quantization_config(target, is_static=True)
    qconfig.operators_to_quantize = list(STATIC_OPERATORS)
    qconfig.nodes_to_exclude = static_nodes_to_exclude(model_file)
    quantizer = ORTQuantizer.from_pretrained(model_file.parent, file_name=model_file.name)
    use_external = _source_bytes(model_file) // 4 > _EXTERNAL_DATA_BYTES
    with tempfile.TemporaryDirectory(prefix="edgefed-calib-") as tmp:
        calibrator = create_calibrator(
            model_file.as_posix(),
            op_types_to_calibrate=list(STATIC_OPERATORS),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=use_external,
            extra_options={"symmetric": False, "max_intermediate_outputs": 16},
        )
        calibrator.collect_data(_CalibrationReader(runner, encoded))
        ranges = calibrator.compute_data()
        del calibrator  # releases its session before the temporary directory goes
    quantizer.quantize(
        qconfig,
        save_dir=out_dir,
        calibration_tensors_range=ranges,
        use_external_data_format=use_external,
    )
    _rename_quantized(out_dir, model_file.stem)


def _fp16(model_file: Path, out_dir: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(model_file.as_posix())
    model16 = convert_float_to_float16(model, keep_io_types=True)
    external = _source_bytes(model_file) // 2 > _EXTERNAL_DATA_BYTES
    onnx.save_model(
        model16,
        (out_dir / MODEL_FILE).as_posix(),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=MODEL_FILE + "_data",
    )


def _rename_quantized(out_dir: Path, stem: str) -> None:
    """``model_quantized.onnx`` → ``model.onnx``; external weights (ORT names them
    ``model_quantized.onnx.data``) are rewritten as ``model.onnx_data``, the name Optimum's
    exporter and the artifact format use."""
    import onnx

    produced = out_dir / f"{stem}_quantized.onnx"
    if not produced.is_file():
        raise QuantizationError(f"the quantizer wrote no {produced.name} in {out_dir}")
    external = [p for p in out_dir.glob(f"{stem}_quantized.onnx*") if p != produced]
    if not external:
        produced.replace(out_dir / MODEL_FILE)
        return
    model = onnx.load(produced.as_posix())  # reads the external weights too
    onnx.save_model(
        model,
        (out_dir / MODEL_FILE).as_posix(),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=MODEL_FILE + "_data",
    )
    for path in (produced, *external):
        path.unlink()


def _check_output(out_dir: Path, target: TargetProfile, task: Task, *, whole_model: bool) -> None:
    """The prepared model loads in ONNX Runtime on the CPU provider and has finite weights
    (and, for a ``whole_model``, has the text inputs and outputs its task needs)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load((out_dir / MODEL_FILE).as_posix())
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise QuantizationError(
                f"target {target.name!r}: quantized weight {init.name!r} is not finite"
            )
    try:
        if whole_model:
            OnnxRunner(out_dir, task)
        else:
            import onnxruntime as ort

            ort.InferenceSession(str(out_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ExportError from OnnxRunner, ORT's untyped errors
        raise QuantizationError(
            f"target {target.name!r} ({target.scheme}): the result does not load: {exc}"
        ) from exc


def quantize(
    onnx_dir: Path,
    out_dir: Path,
    target: TargetProfile,
    *,
    task: Task,
    calibration: tuple[Any, Sequence[str]] | None = None,
    max_length: int = 128,
    whole_model: bool = True,
) -> Path:
    """Prepare the fp32 export in ``onnx_dir`` for ``target``; returns ``out_dir``.

    ``out_dir`` receives ``model.onnx`` (Optimum's ``model_quantized.onnx`` renamed; weights in
    ``model.onnx_data`` next to it only for models near the 2 GiB protobuf limit) and the
    config, generation config and tokenizer files of ``onnx_dir``. ``calibration`` (tokenizer,
    texts) is required by ``static-int8`` and ignored otherwise; texts are truncated to
    ``max_length`` tokens. See the module documentation for the exact configuration of every
    scheme. ``whole_model=False`` is for graphs that are only part of a model (split heads and
    tails): the result is checked to load, not to have the task's text inputs and outputs.

    Raises :class:`QuantizationError` naming the target and the cause on any failure (no model,
    no calibration set for a static target, a quantizer error, a result that does not load).
    """
    onnx_dir = Path(onnx_dir)
    out_dir = Path(out_dir)
    try:
        model_file = find_onnx_model(onnx_dir)
    except ExportError as exc:
        raise QuantizationError(f"target {target.name!r}: {exc}") from exc
    if out_dir.resolve() == model_file.parent.resolve():
        raise QuantizationError(
            f"target {target.name!r}: output directory {out_dir} is the input directory"
        )
    if target.scheme == "static-int8" and calibration is None:
        raise QuantizationError(
            f"target {target.name!r} (static int8) needs a calibration set: pass "
            "calibration=(tokenizer, texts)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("model*.onnx*"):
        stale.unlink()

    log.debug("preparing %s for target %s (%s)", model_file, target.name, target.scheme)
    try:
        with _quiet_ort_quantization():
            if target.scheme == "none":
                _copy_fp32(model_file, out_dir)
            elif target.scheme == "dynamic-int8":
                _dynamic_int8(model_file, out_dir, target)
            elif target.scheme == "static-int8":
                assert calibration is not None  # checked above
                _static_int8(model_file, out_dir, target, task, calibration, max_length)
            elif target.scheme == "fp16":
                _fp16(model_file, out_dir)
            else:  # pragma: no cover - Scheme is a closed Literal
                raise QuantizationError(f"target {target.name!r}: unknown scheme {target.scheme!r}")
            _copy_support_files(model_file.parent, out_dir)
            _check_output(out_dir, target, task, whole_model=whole_model)
    except QuantizationError:
        raise
    except Exception as exc:  # quantizer, calibrator and converter raise anything
        raise QuantizationError(
            f"target {target.name!r} ({target.scheme}) failed: {type(exc).__name__}: {exc}"
        ) from exc
    log.debug(
        "target %s: %s (%.1f MB)",
        target.name,
        out_dir / MODEL_FILE,
        _source_bytes(out_dir / MODEL_FILE) / 1e6,
    )
    return out_dir
