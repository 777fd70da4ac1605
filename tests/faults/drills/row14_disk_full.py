"""Row 14: the agent's disk fills up while it downloads a new model version.

The full disk is real: the agent's state directory (model store, staging folder, outbox) is on a
tmpfs of its own (``mount -t tmpfs``, which needs root; without it the drill limits the agent's
file size instead, see :func:`_run_file_size_limit`), shrunk with ``mount -o remount,size=`` to
what v1 uses plus 1.5 MiB once v1 serves. The next version (4.9 MB, its ``model.onnx`` alone
4 MB) then hits ENOSPC part-way through its download.

Must hold: the download fails cleanly (a ``failed`` lifecycle event that names the full disk,
the agent process alive), v1 keeps answering requests throughout, and the partial download's
space is given back (the staging folder of the new version gone, the free space back to what it
was before the download). Then another file fills the disk to the last byte while the agent
retries: the agent survives it and keeps serving (its telemetry and its store's generation
record cannot be written meanwhile); in the bench (``full``) the disk is then given room and
the retry must bring the new version in.

Figures: ``serving`` (yes), ``requests_failed`` during the drill, ``reclaimed`` (yes),
``free_kib_before`` / ``free_kib_after``, ``survived_full_disk``, ``recovered`` (bench only).
"""

from __future__ import annotations

import os
import resource
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
    disk = workdir / "agent-disk"
    disk.mkdir(parents=True)
    try:
        _mount(disk, "64m")
    except DiskUnavailable as exc:
        return _run_file_size_limit(workdir, str(exc))
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
            requests = _Requests(cloud, agent.agent_id, old, notes)
            failure: str | None = None
            reclaimed = False
            free_after = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                requests.one()
                if failure is None:
                    failure = _failure(cloud, agent.agent_id, new)
                elif not staged.exists() and _free(disk) >= free_before - SLACK:
                    free_after = _free(disk)
                    reclaimed = True
                    break
                time.sleep(0.2)
            # Phase 2: something else fills the disk to the last byte while the agent retries
            # (a log, another program): the agent keeps serving, and once there is room (the
            # filler gone, the disk grown) its retry brings the new version in.
            failures_logged = _count_failures(agent.log_path, new)
            filler = _fill(disk / "filler")
            retried = False
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and agent.alive():
                requests.one()
                if _count_failures(agent.log_path, new) > failures_logged:
                    retried = True
                    for _ in range(5):  # and a little longer on the full disk
                        requests.one()
                        time.sleep(0.2)
                    break
                time.sleep(0.2)
            alive = agent.alive()
            filler.unlink()
            _mount(disk, "64m", remount=True)  # room for the new version at last
            recovered = False
            # The retry backs off (2 s doubling to 60 s): the bench waits for it, the test not.
            deadline = time.monotonic() + (90 if full else 0)
            while alive and time.monotonic() < deadline:
                version, _ = cloud.infer(agent.agent_id, timeout=5)
                if version == new:
                    recovered = True
                    break
                time.sleep(0.5)
            serving_now = cloud.infer(agent.agent_id, timeout=5)[0]
            alive = alive and agent.alive()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)
    if failure is None:
        notes.append(f"no failed event for v{new} within 60 s")
    else:
        notes.append(f"v{new}: {failure}")
    if not retried:
        notes.append("the agent did not retry on the disk filled by another file within 40 s")
    if not alive:
        notes.append(f"the agent process died: {agent.log_tail(1500)}")
    full_disk = failure is not None and "space" in failure.lower()
    serving = requests.failed == 0 and serving_now in (old, new)
    figures: dict[str, int | float | str | bool] = {
        "serving": "yes" if serving else "no",
        "requests_ok": requests.ok,
        "requests_failed": requests.failed,
        "failed_cleanly": full_disk and alive,
        "reclaimed": "yes" if reclaimed else "no",
        "free_kib_before": free_before // 1024,
        "free_kib_after": free_after // 1024,
        "survived_full_disk": retried and alive,
        "recovered": ("yes" if recovered else "no") if full else "not measured",
    }
    held = serving and full_disk and alive and reclaimed and retried and (recovered or not full)
    return DrillResult(ROW, figures, held=held, notes=notes)


def _run_file_size_limit(workdir: Path, why: str) -> DrillResult:
    """Where no tmpfs can be mounted (not root): the agent's files may not grow past
    ``HEADROOM`` bytes (``RLIMIT_FSIZE`` set on the running agent with ``prlimit``), so the
    4 MB ``model.onnx`` of the next version fails part-way with EFBIG, as a full disk fails
    with ENOSPC. The same checks but the free space (the staging folder must be gone) and the
    disk filled by another file, which this cannot show."""
    notes = [f"no tmpfs ({why}); the agent's file size is limited instead (RLIMIT_FSIZE)"]
    with (
        edge_stage(workdir / "stage") as stage,
        MqttSide(stage.broker.url, stage.fleet, "row14-cloud") as cloud,
    ):
        cloud.watch_telemetry()
        agent = stage.enrol("agent")
        old = stage.release_and_deploy()
        if cloud.serving(agent.agent_id) != old:
            raise AssertionError(f"the agent does not serve v{old}")
        assert agent.proc is not None
        resource.prlimit(agent.proc.pid, resource.RLIMIT_FSIZE, (HEADROOM, HEADROOM))
        new, _dep = stage.deploy_nowait()
        staged = agent.config.state_dir / "staging" / MODEL / f"v{new}"
        requests = _Requests(cloud, agent.agent_id, old, notes)
        failure: str | None = None
        reclaimed = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            requests.one()
            if failure is None:
                failure = _failure(cloud, agent.agent_id, new)
            elif not staged.exists():
                reclaimed = True
                break
            time.sleep(0.2)
        serving_now = cloud.infer(agent.agent_id, timeout=5)[0]
        alive = agent.alive()
    notes.append(f"v{new}: {failure}")
    too_big = failure is not None and "too large" in failure.lower()
    serving = requests.failed == 0 and serving_now == old
    figures: dict[str, int | float | str | bool] = {
        "serving": "yes" if serving else "no",
        "requests_ok": requests.ok,
        "requests_failed": requests.failed,
        "failed_cleanly": too_big and alive,
        "reclaimed": "yes" if reclaimed else "no",
        "survived_full_disk": "not measured",
        "recovered": "not measured",
    }
    return DrillResult(ROW, figures, held=serving and too_big and alive and reclaimed, notes=notes)


class _Requests:
    """Requests to the agent from the cloud, counted: each must be answered by ``old``."""

    def __init__(self, cloud: MqttSide, agent_id: str, old: int, notes: list[str]) -> None:
        self.cloud, self.agent_id, self.old, self.notes = cloud, agent_id, old, notes
        self.ok = self.failed = 0

    def one(self) -> None:
        version, outcome = self.cloud.infer(self.agent_id, timeout=5)
        if version == self.old:
            self.ok += 1
        else:
            self.failed += 1
            self.notes.append(f"a request on the full disk got {version} ({outcome})")


def _fill(path: Path) -> Path:
    """Write ``path`` until the disk refuses (ENOSPC): another program filling the disk."""
    chunk = b"\0" * 65536
    with path.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError:
            pass
    return path


def _count_failures(log_path: Path, version: int) -> int:
    """How many failures of ``version`` the agent has logged (its retries)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return 0
    return text.count(f"v{version}: failed")


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
