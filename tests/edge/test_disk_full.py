"""A full disk on the device never stops the agent: telemetry that cannot be written is dropped
and counted, and a desired-state generation that cannot be recorded is kept in memory. Both
once crashed the agent's task group (row 14 of the fault suite found it). The disk is a real
tmpfs, filled to the last byte by another file."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefed.edge.store import ModelStore
from edgefed.edge.telemetry import Outbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs, which needs root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(path: Path) -> Path:
    """Write ``path`` until the disk refuses: another program filling the disk."""
    with path.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return path


def test_telemetry_on_a_full_disk_is_dropped_and_counted_and_the_outbox_recovers(
    small_disk: Path,
) -> None:
    box = Outbox(small_disk / "outbox.sqlite")
    box.put("t", b"before")
    filler = fill(small_disk / "filler")
    box.put("t", b"x" * 200_000)  # new pages: the disk refuses them
    assert box.dropped == 1
    assert [m.payload for m in box.peek()] == [b"before"]
    filler.unlink()
    box.put("t", b"after")
    assert [m.payload for m in box.peek()] == [b"before", b"after"]
    box.close()


def test_a_generation_that_cannot_be_recorded_is_kept_and_written_with_the_next(
    small_disk: Path,
) -> None:
    store = ModelStore(small_disk / "state")
    filler = fill(small_disk / "filler")
    store.record_generation(3, digest="d3")
    assert store.generation == 3
    filler.unlink()
    store.record_generation(4, digest="d4")
    assert ModelStore(small_disk / "state").generation == 4
