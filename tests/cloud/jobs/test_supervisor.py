"""The job supervisor with real worker processes on a real SQLite registry: restart survival
(adopt a live worker, re-queue and resume a dead one, give up after MAX_ATTEMPTS), and jobs
that can only fail at run time end failed with a readable reason and leave nothing behind
(a job refused by its quality gate: see test_api_jobs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from edgefed.cloud.jobs.supervisor import MAX_ATTEMPTS, JobSupervisor, _alive
from edgefed.cloud.jobs.worker import job_work_dir
from edgefed.cloud.registry.models import Job, JobStatus, ModelVersion
from edgefed.common.artifact import load_verify_key, verify

from .conftest import LONG_DISTILL, Registry, run_as_task, tick_until_finished, wait_for


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _running_row(registry: Registry, job_id: int, *, attempts: int, pid: int | None) -> None:
    with registry.sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = JobStatus.RUNNING
        job.attempts = attempts
        job.worker_pid = pid


def test_a_restarted_controller_adopts_a_live_worker_and_resumes_a_dead_one(
    registry: Registry, teacher_dir: Path
) -> None:
    registry.add_model("tiny", teacher_dir)
    job_id = registry.add_job(
        "tiny", teacher_dir, targets=["fp32"], distill={**LONG_DISTILL, "time_budget_s": 3.0}
    )
    first = registry.supervisor()
    first.tick()
    pid = first.running[job_id]
    checkpoints = job_work_dir(registry.store, "tiny", job_id) / "checkpoints"
    # Distilling, with a checkpoint on disk.
    wait_for(
        lambda: (registry.job(job_id), checkpoints.is_dir() and any(checkpoints.iterdir())),
        lambda v: v[0].progress.get("distill_step", 0) >= 3 and v[1],
    )

    # The controller restarts while the worker runs: the new supervisor adopts it.
    first.shutdown()
    second = registry.supervisor()
    second.recover()
    second.tick()
    assert second.running == {job_id: pid}
    job = registry.job(job_id)
    assert (job.status, job.attempts, job.worker_pid) == (JobStatus.RUNNING, 1, pid)

    # Now the controller and the worker both die; the next controller queues the job again.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _alive(pid, job_id), lambda alive: not alive)
    third = registry.supervisor()
    third.recover()
    job = registry.job(job_id)
    assert job.status == JobStatus.QUEUED
    assert job.worker_pid is None
    assert "worker is gone" in job.progress["step"]
    version = job.progress["version"]

    job = tick_until_finished(third, registry, job_id)
    assert job.status == JobStatus.SUCCEEDED, (job.error, registry.log(job_id))
    assert job.attempts == 2
    assert job.result is not None
    assert job.result["version"] == version == 1
    assert job.result["distillation"]["resumed_from_step"] >= 2
    with registry.sessions() as session:
        versions = session.scalars(select(ModelVersion)).all()
        assert [(v.version, v.job_id) for v in versions] == [(1, job_id)]
    manifest = verify(
        registry.store / "tiny" / "v1" / "fp32",
        load_verify_key(registry.signing_key.with_suffix(".pub")),
    )
    assert manifest.version == 1
    # The worker removes its checkpoints just after it records the success, then exits.
    work = job_work_dir(registry.store, "tiny", job_id)
    wait_for(work.exists, lambda exists: not exists, timeout_s=30)


def test_a_job_whose_worker_died_is_queued_again_until_attempts_run_out(
    registry: Registry, teacher_dir: Path
) -> None:
    registry.add_model("tiny", teacher_dir)
    retry = registry.add_job("tiny", teacher_dir)
    no_pid = registry.add_job("tiny", teacher_dir)
    exhausted = registry.add_job("tiny", teacher_dir)
    dead = _dead_pid()
    _running_row(registry, retry, attempts=1, pid=dead)
    _running_row(registry, no_pid, attempts=2, pid=None)
    _running_row(registry, exhausted, attempts=MAX_ATTEMPTS, pid=dead)
    # A live process that is not this job's worker (a reused pid) is not adopted either.
    _running_row(registry, registry.add_job("tiny", teacher_dir), attempts=1, pid=os.getpid())

    supervisor = JobSupervisor(
        registry.sessions,
        database_url=registry.url,
        store=registry.store,
        signing_key=registry.signing_key,
    )
    supervisor.recover()

    assert supervisor.running == {}
    for job_id in (retry, no_pid):
        job = registry.job(job_id)
        assert (job.status, job.worker_pid, job.error) == (JobStatus.QUEUED, None, None)
    job = registry.job(exhausted)
    assert job.status == JobStatus.FAILED
    assert job.finished_at is not None
    assert job.error is not None
    assert f"stopped {MAX_ATTEMPTS} times" in job.error
    assert "worker is gone" in job.error
    with registry.sessions() as session:
        stuck = session.scalars(select(Job).where(Job.status == JobStatus.RUNNING)).all()
        assert stuck == []


def test_a_teacher_deleted_after_queueing_fails_the_job_with_a_readable_error(
    registry: Registry, own_teacher: Path
) -> None:
    registry.add_model("tiny", own_teacher)
    job_id = registry.add_job("tiny", own_teacher)
    for child in own_teacher.iterdir():
        child.unlink()
    own_teacher.rmdir()

    job = tick_until_finished(registry.supervisor(), registry, job_id)

    assert job.status == JobStatus.FAILED, registry.log(job_id)
    assert job.error == f"teacher directory {own_teacher} does not exist"
    assert job.worker_pid is None
    assert job.finished_at is not None
    assert not (registry.store / "tiny").exists()


def test_the_supervisor_runs_as_an_asyncio_task_and_wakes_on_a_kick_from_another_thread(
    registry: Registry, teacher_dir: Path
) -> None:
    registry.add_model("tiny", teacher_dir)
    supervisor = registry.supervisor(poll_s=3600.0)  # only a kick makes it look again
    with run_as_task(supervisor):
        wait_for(lambda: supervisor.ticks, lambda n: n >= 1)  # now asleep for an hour
        # Cancelled before it starts: no worker needed.
        job_id = registry.add_job("tiny", teacher_dir, cancel_requested=True)

        supervisor.kick()

        done = wait_for(lambda: registry.job(job_id), lambda j: j.status != JobStatus.QUEUED)
        assert done.status == JobStatus.CANCELLED
        assert done.error == "cancelled before it started"
        assert done.attempts == 0
        assert wait_for(lambda: supervisor.ticks, lambda n: n >= 2) == 2
    assert supervisor.running == {}
