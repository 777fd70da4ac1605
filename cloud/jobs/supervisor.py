"""Runs queued jobs in worker processes and keeps the jobs table truthful.

* queued jobs start in order, at most ``job_workers`` at a time, each as
  ``python -m edgefed.cloud.jobs.worker JOB_ID`` (its own process: a crash or an out-of-memory
  kill of a job never takes the controller down);
* a cancel request stops the worker (SIGTERM, then SIGKILL) and marks the job cancelled;
* after a controller restart, a job left ``running`` whose worker is still alive is adopted and
  watched; one whose worker is gone is queued again (the pipeline resumes from its
  distillation checkpoints) while it has attempts left, and otherwise marked failed with the
  reason. No job stays "running" without a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from edgefed.cloud.jobs.versions import job_version
from edgefed.cloud.registry.db import make_sessionmaker
from edgefed.cloud.registry.models import Job, JobStatus

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


@dataclass
class _Running:
    job_id: int
    pid: int
    proc: subprocess.Popen[bytes] | None
    """None for a worker adopted after a restart (not our child: polled by pid)."""
    stopping: bool = False
    """SIGTERM sent (a cancel)."""


def _alive(pid: int, job_id: int) -> bool:
    """Whether ``pid`` is a live worker of ``job_id`` (the pid may have been reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return b"edgefed.cloud.jobs.worker" in cmdline and str(job_id).encode() in cmdline


class JobSupervisor:
    """The job service of the controller (see :class:`edgefed.cloud.services.JobService`).

    Run it as an asyncio task (``asyncio.create_task(supervisor.run())``, cancelled to stop);
    :meth:`kick` may be called from any thread. Its database work runs in a thread, in write
    transactions (``BEGIN IMMEDIATE`` on SQLite) on the engine behind ``sessions``. Tests and
    tools may instead call :meth:`recover` once and then :meth:`tick` themselves.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        database_url: str,
        store: Path,
        signing_key: Path,
        workers: int = 1,
        poll_s: float = 0.5,
        log_dir: Path | None = None,
        stop_grace_s: float = 10.0,
    ) -> None:
        bind = sessions.kw.get("bind")
        self.sessions = (
            make_sessionmaker(bind, immediate=True) if isinstance(bind, Engine) else sessions
        )
        self.database_url = database_url
        self.store = store
        self.signing_key = signing_key
        self.workers = workers
        self.poll_s = poll_s
        self.log_dir = log_dir
        self.stop_grace_s = stop_grace_s
        self._running: dict[int, _Running] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recovered = False
        self.ticks = 0
        """Passes over the jobs table so far."""

    @property
    def running(self) -> dict[int, int]:
        """Job id -> worker pid of the workers this supervisor watches."""
        return {job_id: r.pid for job_id, r in self._running.items()}

    def kick(self) -> None:
        """Look at the jobs table now (thread-safe; before :meth:`run` it is a no-op)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Until cancelled: recover once, then start, watch and cancel jobs."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            await asyncio.to_thread(self.recover)
            while True:
                self._wake.clear()
                try:
                    await asyncio.to_thread(self.tick)
                except Exception:
                    log.exception("the job supervisor's tick failed; trying again")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
        finally:
            self._loop = None
            self.shutdown()

    # ------------------------------------------------------------------ steps (sync, in a thread)

    def recover(self) -> None:
        """Make every job left ``running`` by an earlier controller truthful again."""
        with self.sessions.begin() as session:
            for job in session.scalars(select(Job).where(Job.status == JobStatus.RUNNING)):
                if job.id in self._running:
                    continue
                pid = job.worker_pid
                if pid is not None and _alive(pid, job.id):
                    log.info(
                        "job %d: adopting worker %d left by the previous controller", job.id, pid
                    )
                    self._running[job.id] = _Running(job.id, pid, None)
                else:
                    _requeue_or_fail(job, "its worker is gone (controller restart or crash)")
        self._recovered = True

    def tick(self) -> None:
        if not self._recovered:
            self.recover()
        self._reap()
        self._cancel_requested()
        self._start_queued()
        self.ticks += 1

    def _reap(self) -> None:
        for job_id, running in list(self._running.items()):
            code: int | None = None
            if running.proc is not None:
                code = running.proc.poll()
                if code is None:
                    continue
            elif _alive(running.pid, job_id):
                continue
            del self._running[job_id]
            with self.sessions.begin() as session:
                job = session.get(Job, job_id)
                if job is None or job.status != JobStatus.RUNNING:
                    continue  # the worker recorded its own outcome
                if job.cancel_requested:
                    job.status = JobStatus.CANCELLED
                    job.finished_at = datetime.now(UTC)
                    job.worker_pid = None
                    job.error = job.error or "cancelled on request"
                elif code is None:  # an adopted worker: its exit code is unknown
                    _requeue_or_fail(job, "its worker stopped without recording an outcome")
                elif code < 0:  # killed by a signal (out of memory, an operator): try again
                    _requeue_or_fail(job, f"its worker was killed by signal {-code}")
                else:
                    job.status = JobStatus.FAILED
                    job.finished_at = datetime.now(UTC)
                    job.worker_pid = None
                    job.error = job.error or (
                        f"the worker process exited with code {code} before finishing"
                        + self._log_hint(job_id)
                    )

    def _log_hint(self, job_id: int) -> str:
        return "" if self.log_dir is None else f" (see {self.log_dir / f'job-{job_id}.log'})"

    def _cancel_requested(self) -> None:
        to_stop: list[_Running] = []
        with self.sessions.begin() as session:
            jobs = session.scalars(
                select(Job).where(
                    Job.cancel_requested.is_(True),
                    Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)),
                )
            ).all()
            for job in jobs:
                if job.status == JobStatus.QUEUED:
                    job.status = JobStatus.CANCELLED
                    job.finished_at = datetime.now(UTC)
                    job.error = job.error or "cancelled before it started"
                elif job.id in self._running and not self._running[job.id].stopping:
                    to_stop.append(self._running[job.id])
        for running in to_stop:  # outside the transaction: the worker records its own end
            self._stop(running)

    def _start_queued(self) -> None:
        free = self.workers - len(self._running)
        if free <= 0:
            return
        with self.sessions.begin() as session:
            queued = session.scalars(
                select(Job).where(Job.status == JobStatus.QUEUED).order_by(Job.id).limit(free)
            ).all()
            claimed = []
            for job in queued:  # claimed first: a crash before the spawn is a dead worker
                job.status = JobStatus.RUNNING
                job.worker_pid = None
                job.attempts += 1
                job.error = None
                job.started_at = job.started_at or datetime.now(UTC)
                job.heartbeat_at = datetime.now(UTC)
                version = job_version(session, job, self.store)
                if version is not None:
                    job.progress = {**(job.progress or {}), "version": version}
                session.flush()  # the next job of the same model sees this one's version
                claimed.append((job.id, job.attempts))
        for job_id, attempt in claimed:
            try:
                proc = self._spawn(job_id)
            except OSError as exc:
                log.error("job %d: cannot start a worker: %s", job_id, exc)
                with self.sessions.begin() as session:
                    unstarted = session.get(Job, job_id)
                    if unstarted is not None:
                        unstarted.status = JobStatus.FAILED
                        unstarted.finished_at = datetime.now(UTC)
                        unstarted.error = f"cannot start a worker process: {exc}"
                continue
            self._running[job_id] = _Running(job_id, proc.pid, proc)
            with self.sessions.begin() as session:
                started = session.get(Job, job_id)
                if started is not None and started.status == JobStatus.RUNNING:
                    started.worker_pid = proc.pid
            log.info("job %d: started worker %d (attempt %d)", job_id, proc.pid, attempt)

    def _spawn(self, job_id: int) -> subprocess.Popen[bytes]:
        command = [
            sys.executable,
            "-m",
            "edgefed.cloud.jobs.worker",
            str(job_id),
            "--database-url",
            self.database_url,
            "--store",
            str(self.store),
            "--signing-key",
            str(self.signing_key),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        if self.log_dir is None:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # survives a controller restart; adopted afterwards
                env=env,
            )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"job-{job_id}.log").open("ab") as output:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )

    def _stop(self, running: _Running) -> None:
        """SIGTERM (the worker cleans up and records the cancel), SIGKILL after the grace."""
        running.stopping = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(running.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        while time.monotonic() < deadline:
            if running.proc is not None:
                if running.proc.poll() is not None:
                    return
            elif not _alive(running.pid, running.job_id):
                return
            time.sleep(0.05)
        log.warning("job %d: worker %d ignored SIGTERM; killing it", running.job_id, running.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(running.pid, signal.SIGKILL)
        if running.proc is not None:
            running.proc.wait()

    def shutdown(self) -> None:
        """The controller stops: workers keep running (they are adopted after the restart)."""
        self._running.clear()
        self._recovered = False


def _requeue_or_fail(job: Job, why: str) -> None:
    """A job whose worker died: queued again (it resumes) while it has attempts left."""
    job.worker_pid = None
    if job.attempts < MAX_ATTEMPTS:
        log.warning("job %d: %s; queued again to resume", job.id, why)
        job.status = JobStatus.QUEUED
        job.progress = {**(job.progress or {}), "step": f"queued again: {why}"}
    else:
        log.error("job %d: %s; no attempts left", job.id, why)
        job.status = JobStatus.FAILED
        job.finished_at = datetime.now(UTC)
        job.error = (
            f"{why}; the worker stopped {job.attempts} times without finishing, "
            f"not retried again (at most {MAX_ATTEMPTS} attempts)"
        )
