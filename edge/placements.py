"""The placements of the desired state (where local applications' requests run, per model), kept
on disk next to the model store so an agent that restarts without the cloud keeps routing as the
controller last asked.

``placements.json`` in the state directory holds the generation they came with and the
placements; it is replaced atomically (write, fsync, rename), so a crash leaves the old or the
new file, never half of one. Listeners (the offload router) hear of every change.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from edgefed.common.schemas import Identifier, Placement

log = logging.getLogger(__name__)

__all__ = ["PLACEMENTS_NAME", "PlacementBook"]

PLACEMENTS_NAME = "placements.json"

Listener = Callable[[Mapping[str, Placement]], None]


class _PlacementFile(BaseModel):
    generation: int = Field(default=0, ge=0)
    placements: dict[Identifier, Placement] = Field(default_factory=dict)


class PlacementBook:
    """The placements in force and their copy on disk (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / PLACEMENTS_NAME
        self._data = _PlacementFile()
        self._listeners: list[Listener] = []

    @property
    def generation(self) -> int:
        """The desired-state generation the placements came with (0: none yet)."""
        return self._data.generation

    @property
    def current(self) -> dict[str, Placement]:
        return dict(self._data.placements)

    def load(self) -> dict[str, Placement]:
        """Read the file (at start-up); a missing or unreadable one means no placements (the
        unreadable one is logged: the desired state will bring them again)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.error("cannot read %s (%s): starting without placements", self.path, exc)
            return {}
        try:
            self._data = _PlacementFile.model_validate_json(raw)
        except ValidationError as exc:
            log.error("%s is not valid (%s): starting without placements", self.path, exc)
            return {}
        self._notify()
        return self.current

    def on_change(self, listener: Listener) -> None:
        """Call ``listener(placements)`` on every change (and now, with the current ones)."""
        self._listeners.append(listener)
        listener(self.current)

    async def apply(self, generation: int, placements: Mapping[str, Placement]) -> bool:
        """Record the placements of desired-state ``generation``; returns whether they changed.
        A failing disk is logged and the new placements still apply in memory."""
        new = _PlacementFile(generation=generation, placements=dict(placements))
        if new == self._data:
            return False
        changed = new.placements != self._data.placements
        try:
            await asyncio.to_thread(_write_atomic, self.path, new.model_dump_json(indent=2))
        except OSError as exc:
            log.error("cannot save placements to %s: %s (in force until restart)", self.path, exc)
        self._data = new
        if changed:
            self._notify()
        return changed

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener(self.current)
            except Exception:  # a broken listener must not stop the others
                log.exception("a placement listener failed")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
