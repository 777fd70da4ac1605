"""Row 14: the agent's disk fills up while it downloads a new model version.

The full disk is real: the agent's state directory (model store, staging folder, outbox) is on a
tmpfs of its own (``mount -t tmpfs``; the drill needs root, as the suite has here), which is
shrunk with ``mount -o remount,size=`` to what v1 uses plus 1.5 MiB once v1 serves. The next
version (4.9 MB, its ``model.onnx`` alone 4 MB) then hits ENOSPC part-way through its download.

Must hold: the download fails cleanly (a ``failed`` lifecycle event that names the full disk,
the agent process alive), v1 keeps answering requests throughout, and the partial download's
space is given back (the staging folder of the new version gone, the free space back to what it
was before the download).

Figures: ``serving`` (yes), ``requests_failed`` during the drill, ``reclaimed`` (yes),
``free_kib_before`` / ``free_kib_after``.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.cloud.e2e.world import MODEL
from tests.faults.drills import DrillResult
from tests.faults.drills.edge_stage import MqttSide, edge_stage

ROW = 14
INJECT = "the agent's disk (a tmpfs) fills up during an artifact download"
MUST_HOLD = (
    "the download fails cleanly; the old model keeps serving; the partial file's space is reclaimed"
)

HEADROOM = 1536 * 1024
"""Free space left on the agent's disk once v1 serves: less than the next version needs."""
SLACK = 256 * 1024
"""How much less free space than before the download still counts as reclaimed (the outbox
and the store's own files move a little)."""


class DiskUnavailable(RuntimeError):
    """A tmpfs cannot be mounted here (the drill needs root)."""


def _mount(path: Path, size: str, *, remount: bool = False) -> None:
    options = f"remount,size={size}" if remount else f"size={size},mode=0700"
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DiskUnavailable(
            f"row 14 needs a tmpfs of its own ({' '.join(command)}): {done.stderr.strip()}"
        )


def _free(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _used(path: Path) -> int:
    stats = os.statvfs(path)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    del full  # the same drill either way: one download into a full disk
    disk = workdir / "agent-disk"
    disk.mkdir(parents=True)
    _mount(disk, "64m")
    notes: list[str] = []
    try:
        with (
            edge_stage(workdir / "stage") as stage,
            MqttSide(stage.broker.url, stage.fleet, "row14-cloud") as cloud,
        ):
            cloud.watch_telemetry()
            agent = stage.enrol("agent", state_dir=disk / "state")
            old = stage.release_and_deploy()
            if cloud.serving(agent.agent_id) != old:
                raise AssertionError(f"the agent does not serve v{old}")
            size_kib = (_used(disk) + HEADROOM) // 1024
            _mount(disk, f"{size_kib}k", remount=True)
            free_before = _free(disk)
            notes.append(f"agent disk shrunk to {size_kib} KiB, {free_before // 1024} KiB free")
            new, _dep = stage.deploy_nowait()
            staged = disk / "state" / "staging" / MODEL / f"v{new}"
            ok = failed = 0
            failure: str | None = None
            reclaimed = False
            free_after = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                version, outcome = cloud.infer(agent.agent_id, timeout=5)
                if version == old:
                    ok += 1
                else:
                    failed += 1
                    notes.append(f"a request during the download got {version} ({outcome})")
                if failure is None:
                    failure = _failure(cloud, agent.agent_id, new)
                elif not staged.exists() and _free(disk) >= free_before - SLACK:
                    free_after = _free(disk)
                    reclaimed = True
                    break
                time.sleep(0.2)
            serving_now = cloud.infer(agent.agent_id, timeout=5)[0]
            alive = agent.alive()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)
    if failure is None:
        notes.append(f"no failed event for v{new} within 60 s")
    else:
        notes.append(f"v{new}: {failure}")
    full_disk = failure is not None and "space" in failure.lower()
    serving = serving_now == old and failed == 0
    figures: dict[str, int | float | str | bool] = {
        "serving": "yes" if serving else "no",
        "requests_ok": ok,
        "requests_failed": failed,
        "failed_cleanly": full_disk and alive,
        "reclaimed": "yes" if reclaimed else "no",
        "free_kib_before": free_before // 1024,
        "free_kib_after": free_after // 1024,
    }
    held = serving and full_disk and alive and reclaimed
    return DrillResult(ROW, figures, held=held, notes=notes)


def _failure(cloud: MqttSide, agent_id: str, version: int) -> str | None:
    """The detail of the first ``failed`` lifecycle event of ``version`` (None: none yet)."""
    for agent, _, record in list(cloud.records):
        fields = record.fields
        if (
            agent == agent_id
            and record.name == "model.lifecycle"
            and fields.get("step") == "failed"
            and fields.get("version") == version
        ):
            return str(fields.get("detail"))
    return None
