"""Local training settings as they travel in Flower configs (flat, hyphenated keys)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal, cast

from edgefed.common.training.errors import TrainingError

TrainMode = Literal["full", "top-layers", "head", "lora"]
TRAIN_MODES: tuple[TrainMode, ...] = ("full", "top-layers", "head", "lora")

# dataclass field -> config key (the message contract's names)
_KEYS = {
    "lr": "lr",
    "local_steps": "local-steps",
    "batch_size": "batch-size",
    "max_seq_len": "max-seq-len",
    "mode": "train-mode",
    "top_layers": "top-layers",
    "lora_rank": "lora-rank",
    "proximal_mu": "proximal-mu",
    "seed": "seed",
    "max_examples": "max-examples",
}


@dataclass(frozen=True)
class TrainSettings:
    """How a client trains one round. ``mode`` picks what is trainable: everything, the last
    ``top_layers`` encoder layers and the head, the head only, or LoRA adapters of rank
    ``lora_rank`` (merged back afterwards). ``proximal_mu`` > 0 adds FedProx's proximal term.
    ``max_examples`` > 0 caps the local examples used (0 = all)."""

    lr: float = 5e-4
    local_steps: int = 10
    batch_size: int = 16
    max_seq_len: int = 64
    mode: TrainMode = "full"
    top_layers: int = 1
    lora_rank: int = 8
    proximal_mu: float = 0.0
    seed: int = 0
    max_examples: int = 0

    def __post_init__(self) -> None:
        for name in ("lr", "proximal_mu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TrainingError(f"{_KEYS[name]} must be a number, got {value!r}")
        for name in ("local_steps", "batch_size", "max_seq_len", "top_layers", "lora_rank",
                     "seed", "max_examples"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TrainingError(f"{_KEYS[name]} must be an integer, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainingError(f"lr must be a positive finite number, got {self.lr!r}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise TrainingError(f"proximal-mu must be >= 0 and finite, got {self.proximal_mu!r}")
        minimum = {"local_steps": 1, "batch_size": 1, "max_seq_len": 2, "top_layers": 1,
                   "lora_rank": 1, "seed": 0, "max_examples": 0}  # fmt: skip
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise TrainingError(f"{_KEYS[name]} must be >= {low}, got {getattr(self, name)}")
        if self.mode not in TRAIN_MODES:
            raise TrainingError(
                f"train-mode must be one of {', '.join(TRAIN_MODES)}, got {self.mode!r}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> TrainSettings:
        """Settings from a Flower config (ConfigRecord or run config); missing keys take the
        defaults, other keys are ignored, wrong types or values raise :class:`TrainingError`."""
        kwargs: dict[str, object] = {}
        for field, key in _KEYS.items():
            if key not in cfg:
                continue
            value = cfg[key]
            if (
                field in ("lr", "proximal_mu")
                and isinstance(value, int)
                and not isinstance(value, bool)
            ):
                value = float(value)
            kwargs[field] = value
        return cls(**cast(dict[str, float | int | str], kwargs))  # type: ignore[arg-type]

    def to_config(self) -> dict[str, int | float | str]:
        """The inverse of :meth:`from_config` (hyphenated keys)."""
        values: dict[str, int | float | str] = asdict(self)
        return {_KEYS[field]: value for field, value in values.items()}
