"""A compression job in its own process: ``python -m edgefed.cloud.jobs.worker JOB_ID``.

The worker reads its job from the registry (the row's ``spec`` is a
:class:`~edgefed.cloud.api.schemas.CompressionJobSpec`, written by the API), runs the
compression pipeline with progress written back to the job row (about once a second), registers
the published artifacts (their signatures checked against the controller's key) and records the
outcome in the row: ``succeeded`` with ``result``, or ``failed``/``cancelled`` with ``error``.

The version a job publishes is chosen on its first attempt (one more than any version in the
store, the registry or claimed by another unfinished job of the model) and kept in
``progress["version"]``; a later attempt (after a crash or a controller restart) publishes the
same version, resumes distillation from the job's checkpoints and first removes what an
interrupted attempt left half-published in the store (a version the registry does not know).

SIGTERM (a cancel) stops it between two Python steps; what it had published of an unregistered
version is removed, so a cancelled job leaves nothing behind in the store or the registry. Once
the pipeline is done, registration is not interrupted (a cancel that late is too late: the job
succeeds). Exit codes: 0 done (the row says how), 1 failed, 143 cancelled.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from edgefed.cloud.api.schemas import CompressionJobSpec
from edgefed.cloud.jobs.versions import job_version
from edgefed.cloud.registry.models import Job, JobStatus, Model, ModelVersion

if TYPE_CHECKING:
    from edgefed.cloud.compress.config import CompressConfig
    from edgefed.cloud.compress.pipeline import CompressResult

log = logging.getLogger("edgefed.cloud.jobs.worker")

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 143


class _Cancelled(BaseException):
    """A cancel request (SIGTERM or the row's ``cancel_requested``); a BaseException so that no
    ``except Exception`` inside the pipeline swallows it."""


class _CancelGuard:
    """Turns SIGTERM into :class:`_Cancelled`, except inside :meth:`shielded` sections, where
    it is remembered and ignored (the work there finishes)."""

    def __init__(self) -> None:
        self.requested = False
        self.shielded = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        first = not self.requested
        self.requested = True
        if first and not self.shielded:
            raise _Cancelled

    def check(self) -> None:
        if self.requested and not self.shielded:
            raise _Cancelled


GUARD = _CancelGuard()


class _ProgressWriter:
    """Writes progress into the job row at most once a second (``force`` writes at once) and
    notices a cancel request there."""

    def __init__(self, sessions: sessionmaker[Session], job_id: int) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.last = 0.0

    def __call__(self, update: dict[str, Any], *, force: bool = False) -> None:
        GUARD.check()
        now = time.monotonic()
        if not force and now - self.last < 1.0:
            return
        self.last = now
        with self.sessions.begin() as session:
            job = session.get(Job, self.job_id)
            if job is None:
                raise _Cancelled  # the row was deleted: nobody waits for this job any more
            job.progress = {**(job.progress or {}), **update}
            job.heartbeat_at = datetime.now(UTC)
            cancel = job.cancel_requested
        if cancel:
            raise _Cancelled


def compression_config(
    spec: CompressionJobSpec,
    *,
    job_id: int,
    version: int,
    store: Path,
    signing_key: Path,
) -> CompressConfig:
    """The pipeline's config for a job: the spec as the API accepted it, the version the job
    publishes, the controller's store and signing key, and checkpoints kept per job (so that
    a later attempt resumes)."""
    from edgefed.cloud.compress.config import (
        CompressConfig,
        DistillSettings,
        GateThresholds,
        StudentSpec,
    )

    return CompressConfig(
        teacher_dir=Path(spec.teacher_dir),
        task=spec.task,
        targets=tuple(spec.targets),
        out_dir=store,
        name=spec.model,
        version=version,
        data=Path(spec.data) if spec.data is not None else None,
        max_examples=spec.max_examples,
        student=StudentSpec(
            layers=tuple(spec.student.layers) if spec.student.layers is not None else None,
            depth=spec.student.depth,
        ),
        distill=DistillSettings(
            **spec.distill.model_dump(),
            checkpoint_dir=job_work_dir(store, spec.model, job_id) / "checkpoints",
        ),
        gate=GateThresholds(**spec.gate.model_dump()) if spec.gate is not None else None,
        signing_key=signing_key,
        eval_examples=spec.eval_examples,
        latency_repeats=spec.latency_repeats,
    )


def job_work_dir(store: Path, model: str, job_id: int) -> Path:
    """Where a job keeps what survives between its attempts (distillation checkpoints)."""
    return store / ".work" / f"{model}-job{job_id}"


def _remove_unregistered(
    sessions: sessionmaker[Session], store: Path, name: str, version: int
) -> None:
    """Delete ``store/name/vVERSION`` when the registry does not know that version: it is what
    an interrupted or cancelled attempt of this job published."""
    folder = store / name / f"v{version}"
    if not folder.exists():
        return
    with sessions.begin() as session:
        known = session.scalar(
            select(ModelVersion.id)
            .join(Model, Model.id == ModelVersion.model_id)
            .where(Model.name == name, ModelVersion.version == version)
        )
    if known is None:
        log.warning("removing %s, left unregistered by an interrupted attempt", folder)
        shutil.rmtree(folder, ignore_errors=True)


def _check_teacher_dir(path: Path) -> None:
    """The pipeline's own first check of the teacher, early (cheap, no torch import)."""
    from edgefed.cloud.compress.errors import TeacherError

    if not path.exists():
        raise TeacherError(f"teacher directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise TeacherError(
            f"teacher directory {path} is not a Hugging Face model: it has no config.json"
        )


def _remove_work(store: Path, name: str, version: int, job_id: int) -> None:
    """Intermediate files of a job that will not run again (checkpoints, the pipeline's work)."""
    shutil.rmtree(job_work_dir(store, name, job_id), ignore_errors=True)
    shutil.rmtree(store / ".work" / f"{name}-v{version}", ignore_errors=True)


def _fail(sessions: sessionmaker[Session], job_id: int, status: JobStatus, error: str) -> None:
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is not None:
            _finish(job, status, error=error)


def _summary(result: CompressResult) -> dict[str, Any]:
    distilled = result.distillation
    return {
        "version": result.version,
        "published": [t.target for t in result.targets if t.published],
        "refused": {t.target: t.rejected.message for t in result.targets if t.rejected},
        "student_layers": result.student_layers,
        "distillation": None
        if distilled is None
        else {
            "steps": distilled.steps,
            "stopped": distilled.stopped,
            "best_step": distilled.best_step,
            "best_holdout": distilled.best_holdout,
            "resumed_from_step": distilled.resumed_from_step,
        },
        "reports": {t.target: t.report.metrics() for t in result.targets},
    }


def run_job(sessions: sessionmaker[Session], job_id: int, store: Path, signing_key: Path) -> int:
    """Run one compression job to its end; returns the process exit code."""
    write = _ProgressWriter(sessions, job_id)
    name: str | None = None
    version: int | None = None
    try:
        with sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is None:
                log.error("job %d does not exist", job_id)
                return EXIT_FAILED
            if job.status != JobStatus.RUNNING:
                log.error("job %d is %s, not running: nothing to do", job_id, job.status.value)
                return EXIT_FAILED
            if job.cancel_requested:
                raise _Cancelled
            try:
                spec = CompressionJobSpec.model_validate(job.spec)
            except ValidationError as exc:
                _finish(job, JobStatus.FAILED, error=f"the job's spec is not valid: {exc}")
                return EXIT_FAILED
            model = session.scalar(select(Model).where(Model.name == spec.model))
            if model is None:
                _finish(job, JobStatus.FAILED, error=f"model {spec.model!r} is not registered")
                return EXIT_FAILED
            name = model.name
            version = job_version(session, job, store)
            assert version is not None  # the model exists
            job.progress = {**(job.progress or {}), "version": version}
            job.heartbeat_at = datetime.now(UTC)
        _remove_unregistered(sessions, store, name, version)
        _check_teacher_dir(Path(spec.teacher_dir))  # before the slow imports below
        # The pipeline's imports (torch, transformers, Optimum) take seconds: only now.
        from edgefed.cloud.compress.pipeline import compress
        from edgefed.cloud.registry.artifacts import register_artifacts
        from edgefed.common.artifact import load_signing_key

        key = load_signing_key(signing_key)
        config = compression_config(
            spec, job_id=job_id, version=version, store=store, signing_key=signing_key
        )

        def on_step(message: str) -> None:
            log.info("job %d: %s", job_id, message)
            write({"step": message}, force=True)

        def on_distill(event: Any) -> None:
            write(
                {
                    "distill_step": event.step,
                    "distill_total": event.total_steps,
                    "loss": round(float(event.loss), 6),
                    "holdout": event.holdout,
                    "elapsed_s": round(float(event.elapsed_s), 1),
                }
            )

        result = compress(config, on_step=on_step, on_distill=on_distill)
        GUARD.shielded = True  # from here the job finishes: a late cancel is too late
        summary = _summary(result)
        published = summary["published"]
        refused: dict[str, str] = summary["refused"]
        with sessions.begin() as session:
            job = session.get(Job, job_id)
            if published:
                register_artifacts(
                    session,
                    result.name,
                    result.version,
                    store,
                    published,
                    job_id,
                    trusted_keys=[key.verify_key],
                )
            if job is not None:
                job.result = summary
                job.progress = {**(job.progress or {}), "step": "done"}
                if published:
                    _finish(job, JobStatus.SUCCEEDED)
                else:
                    _finish(
                        job,
                        JobStatus.FAILED,
                        error="every target was refused by the quality gate: "
                        + "; ".join(refused.values()),
                    )
        _remove_work(store, result.name, result.version, job_id)
        return EXIT_DONE
    except _Cancelled:
        GUARD.shielded = True
        log.info("job %d: cancelled", job_id)
        if name is not None and version is not None:
            _remove_unregistered(sessions, store, name, version)
            _remove_work(store, name, version, job_id)
        _fail(sessions, job_id, JobStatus.CANCELLED, "cancelled on request")
        return EXIT_CANCELLED
    except Exception as exc:
        GUARD.shielded = True
        log.exception("job %d failed", job_id)
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        if name is not None and version is not None:
            _remove_unregistered(sessions, store, name, version)
            _remove_work(store, name, version, job_id)
        _fail(sessions, job_id, JobStatus.FAILED, str(message))
        return EXIT_FAILED


def _finish(job: Job, status: JobStatus, *, error: str | None = None) -> None:
    job.status = status
    job.error = error
    job.finished_at = datetime.now(UTC)
    job.worker_pid = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgefed-job-worker")
    parser.add_argument("job_id", type=int)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--signing-key", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("EDGEFED_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    GUARD.install()
    from edgefed.cloud.registry.db import make_engine, make_sessionmaker

    engine = make_engine(args.database_url)
    try:
        return run_job(
            make_sessionmaker(engine, immediate=True), args.job_id, args.store, args.signing_key
        )
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
