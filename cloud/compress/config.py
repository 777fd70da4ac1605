"""What a compression run is asked to do: teacher, task, student, distillation, targets, gate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefed.cloud.compress.errors import UnknownTargetError

Task = Literal["feature-extraction", "text-classification", "text-generation"]
TASKS: tuple[Task, ...] = ("feature-extraction", "text-classification", "text-generation")

Scheme = Literal["none", "dynamic-int8", "static-int8", "fp16"]


@dataclass(frozen=True, slots=True)
class TargetProfile:
    """How a model is prepared for one kind of device."""

    name: str
    scheme: Scheme
    providers: tuple[str, ...]
    description: str
    isa: Literal["avx2", "avx512_vnni", "arm64", "none"] = "none"
    """Instruction set Optimum's quantization config is built for (dynamic/static int8)."""


TARGETS: dict[str, TargetProfile] = {
    t.name: t
    for t in (
        TargetProfile("fp32", "none", ("CPUExecutionProvider",), "plain fp32 ONNX, any CPU"),
        TargetProfile(
            "x86-avx2",
            "dynamic-int8",
            ("CPUExecutionProvider",),
            "x86-64 with AVX2: dynamic int8, per-channel, unsigned weights (no saturation)",
            "avx2",
        ),
        TargetProfile(
            "x86-avx512-vnni",
            "dynamic-int8",
            ("CPUExecutionProvider",),
            "x86-64 with AVX-512 VNNI: dynamic int8, per-channel",
            "avx512_vnni",
        ),
        TargetProfile(
            "arm64",
            "dynamic-int8",
            ("CPUExecutionProvider",),
            "ARM64 (Raspberry Pi 5, Graviton, Jetson CPU): dynamic int8, per-channel",
            "arm64",
        ),
        TargetProfile(
            "static-int8",
            "static-int8",
            ("CPUExecutionProvider",),
            "x86-64: static int8 calibrated on held-out text (activations quantized too)",
            "avx2",
        ),
        TargetProfile(
            "gpu-fp16",
            "fp16",
            ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
            "CUDA / TensorRT / Jetson: fp16 weights and activations (dynamic int8 does not run "
            "on the CUDA provider)",
        ),
    )
}


def target_profile(name: str) -> TargetProfile:
    try:
        return TARGETS[name]
    except KeyError:
        known = ", ".join(TARGETS)
        raise UnknownTargetError(f"unknown target {name!r}; known targets: {known}") from None


class StudentSpec(BaseModel):
    """Which teacher layers the student keeps. Give ``layers`` or ``depth`` (or neither: half)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: tuple[int, ...] | None = None
    """Teacher layer indices to keep, in order (e.g. ``(0, 2, 5)``)."""
    depth: int | None = Field(default=None, ge=1)
    """Number of layers, spread evenly from the first to the last teacher layer."""

    @model_validator(mode="after")
    def _one_of(self) -> StudentSpec:
        if self.layers is not None and self.depth is not None:
            raise ValueError("give either layers or depth, not both")
        return self


class DistillSettings(BaseModel):
    """How the student learns from the teacher."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    """False: export and quantize the teacher as it is (no student, no training)."""
    max_steps: int = Field(default=1000, ge=0)
    """Optimizer steps at most."""
    time_budget_s: float | None = Field(default=None, gt=0)
    """Stop after this much training time (checked between steps)."""
    batch_size: int = Field(default=32, ge=1)
    max_length: int = Field(default=64, ge=8)
    """Tokens per training example (longer texts are truncated)."""
    learning_rate: float = Field(default=2e-4, gt=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)
    temperature: float = Field(default=2.0, gt=0)
    """Softening of teacher logits for KL losses (classification, decoders)."""
    label_weight: float = Field(default=0.5, ge=0, le=1)
    """Weight of the hard-label loss when the data has labels (classification)."""
    hidden_weight: float = Field(default=1.0, ge=0)
    """Weight of the hidden-state alignment loss (encoders)."""
    holdout_fraction: float = Field(default=0.1, gt=0, lt=1)
    eval_every: int = Field(default=50, ge=1)
    """Evaluate on held-out data every this many steps."""
    patience: int = Field(default=5, ge=1)
    """Stop after this many evaluations without improvement."""
    seed: int = 0
    checkpoint_dir: Path | None = None
    """Where checkpoints go; a run with the same directory resumes from the last one."""
    checkpoint_every: int = Field(default=200, ge=1)


class GateThresholds(BaseModel):
    """Quality a compressed model must reach, per task; metric names as in the report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    minimums: dict[str, float]
    maximums: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def default(cls, task: Task) -> GateThresholds:
        if task == "feature-extraction":
            return cls(minimums={"cosine_mean": 0.90})
        if task == "text-classification":
            return cls(minimums={"agreement": 0.90})
        return cls(minimums={"top1_agreement": 0.50}, maximums={"perplexity_ratio": 1.5})


class CompressConfig(BaseModel):
    """One compression run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    teacher_dir: Path
    task: Task
    targets: tuple[str, ...] = ("x86-avx2",)
    out_dir: Path
    name: str | None = None
    """Artifact name; the teacher directory's name when unset."""
    version: int | None = Field(default=None, ge=1)
    """Artifact version; one more than the newest in the store when unset."""
    data: Path | None = None
    """Text file, JSONL (``text``, optional ``label``) or a ``datasets`` directory; the
    built-in offline corpus when unset."""
    max_examples: int | None = Field(default=None, ge=1)
    student: StudentSpec = Field(default_factory=StudentSpec)
    distill: DistillSettings = Field(default_factory=DistillSettings)
    gate: GateThresholds | None = None
    """Quality gate; the task's default when unset."""
    signing_key: Path | None = None
    """Ed25519 key that signs the artifacts; a key is generated in ``out_dir`` when unset."""
    eval_examples: int = Field(default=256, ge=8)
    """Held-out examples used for the validation report."""
    latency_repeats: int = Field(default=20, ge=3)
    """Timed runs per model and batch size (interleaved teacher / student)."""

    @model_validator(mode="after")
    def _targets_known(self) -> CompressConfig:
        if not self.targets:
            raise ValueError("at least one target is needed")
        for t in self.targets:
            target_profile(t)
        return self

    def gate_for_task(self) -> GateThresholds:
        return self.gate if self.gate is not None else GateThresholds.default(self.task)
