"""``<out-dir>/progress.json``: how a federated run is doing, round by round.

The ServerApp runs in a process the controller does not own (the SuperLink starts it), so the
file is the channel back: the controller's run service polls it. It is rewritten whole and
atomically (temporary file + ``os.replace``) after every change, so a reader never sees half a
document. Schema::

    {"status": "running|succeeded|failed", "strategy": str, "num_rounds": int,
     "initial_eval_loss": float|null, "initial_eval_accuracy": float|null,
     "rounds": [{"round": r, "accepted": k, "rejected": [{"node_id": n, "reason": str}],
                 "train_loss": float|null, "eval_loss": float|null,
                 "eval_accuracy": float|null, "seconds": float}],
     "error": str|null, "model_dir": str|null, "started_at": float, "updated_at": float}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgefed.cloud.federation.errors import FederationError
from edgefed.cloud.federation.validation import Rejection

PROGRESS_FILE = "progress.json"


def _number(value: float | None) -> float | None:
    """JSON has no NaN; a non-finite metric is written as null."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


class ProgressWriter:
    """Keeps the run's progress document and writes it after every change."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / PROGRESS_FILE
        self.doc: dict[str, Any] = {}

    def start(self, *, strategy: str, num_rounds: int, **extra: Any) -> None:
        """A new run: status running, no rounds yet. ``extra`` keys go into the document."""
        now = time.time()
        self.doc = {
            "status": "running",
            "strategy": strategy,
            "num_rounds": num_rounds,
            "initial_eval_loss": None,
            "initial_eval_accuracy": None,
            "rounds": [],
            "error": None,
            "model_dir": None,
            "started_at": now,
            "updated_at": now,
            **extra,
        }
        self._write()

    def initial(self, *, eval_loss: float | None, eval_accuracy: float | None) -> None:
        """Server-side evaluation of the starting model (round 0)."""
        self.doc["initial_eval_loss"] = _number(eval_loss)
        self.doc["initial_eval_accuracy"] = _number(eval_accuracy)
        self._write()

    def round(
        self,
        server_round: int,
        *,
        accepted: int,
        rejected: Iterable[Rejection],
        train_loss: float | None,
        eval_loss: float | None,
        eval_accuracy: float | None,
        seconds: float,
        **extra: Any,
    ) -> None:
        """Record a finished round (replacing an earlier record of the same round)."""
        entry = {
            "round": server_round,
            "accepted": accepted,
            "rejected": [r.to_dict() for r in rejected],
            "train_loss": _number(train_loss),
            "eval_loss": _number(eval_loss),
            "eval_accuracy": _number(eval_accuracy),
            "seconds": round(seconds, 3),
            **extra,
        }
        rounds = [r for r in self.doc.get("rounds", []) if r["round"] != server_round]
        rounds.append(entry)
        self.doc["rounds"] = rounds
        self._write()

    def succeed(self, model_dir: Path | None) -> None:
        """The run finished; ``model_dir`` holds the final model (None when not saved)."""
        self.doc["status"] = "succeeded"
        self.doc["model_dir"] = str(model_dir) if model_dir is not None else None
        self._write()

    def fail(self, error: str) -> None:
        self.doc["status"] = "failed"
        self.doc["error"] = error
        self._write()

    def _write(self) -> None:
        self.doc["updated_at"] = time.time()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".progress-", suffix=".json", dir=self.out_dir)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(self.doc, fh, indent=2, allow_nan=False)
                    fh.write("\n")
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise FederationError(f"cannot write {self.path}: {exc}") from exc


def read_progress(out_dir: Path) -> dict[str, Any] | None:
    """The run's progress document, or None while there is none (not started, or unreadable
    because another writer is mid-way on a file system without atomic rename)."""
    path = Path(out_dir) / PROGRESS_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None
