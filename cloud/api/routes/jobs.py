"""Compression jobs: queue one (the job service runs it in a worker process), watch its
progress, cancel it.

The API checks what it can before anything is queued (the model, its teacher directory, the
targets, the student against the teacher's depth, the data file) and writes the job row; its
``spec`` is a :class:`~edgefed.cloud.api.schemas.CompressionJobSpec` (the request plus the
model's task and teacher directory), which the worker reads back with the same model. While a
job runs its ``progress`` holds ``step`` (what it is doing), ``version`` (the version it will
publish) and, while distilling, ``distill_step``/``distill_total``/``loss``/``holdout``/
``elapsed_s``; a finished job has ``result`` (published targets, refused ones with the gate's
reason, validation reports) or ``error``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import select

from edgefed.cloud.api.deps import (
    AUTH_ERRORS,
    AuditDep,
    IdPath,
    OperatorDep,
    ReaderDep,
    ServicesDep,
    SessionDep,
)
from edgefed.cloud.api.routes.models import get_model
from edgefed.cloud.api.schemas import (
    CompressionJobCreate,
    CompressionJobSpec,
    ErrorBody,
    JobPublic,
    StudentIn,
)
from edgefed.cloud.compress.config import TARGETS
from edgefed.cloud.registry.models import Job, JobStatus
from edgefed.cloud.services import kick

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["jobs"])

FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


def _check_teacher(model: str, teacher_dir: str | None) -> FsPath:
    """The model's teacher directory, or 422 when it is gone or no longer a model."""
    if not teacher_dir:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"model {model!r} has no teacher directory to compress",
        )
    path = FsPath(teacher_dir)
    if not (path / "config.json").is_file():
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"the teacher directory {teacher_dir} of model {model!r} no longer exists or holds "
            "no config.json on the controller; register the model again with a valid directory",
        )
    return path


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _teacher_depth(teacher: FsPath) -> int | None:
    """Transformer layers of the teacher per its config.json (None: not readable there)."""
    try:
        config = json.loads((teacher / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    for key in _LAYER_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _check_student(student: StudentIn, teacher: FsPath) -> None:
    """422 when the student cannot be cut from this teacher (the worker checks it again)."""
    depth = _teacher_depth(teacher)
    if depth is None:
        return
    problem = None
    if student.depth is not None and student.depth > depth:
        problem = f"student depth {student.depth} is more than the teacher's {depth} layers"
    elif student.layers is not None:
        outside = [i for i in student.layers if i >= depth]
        if outside:
            problem = f"student layers {outside} are outside the teacher's layers 0..{depth - 1}"
    if problem:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, problem)


@router.post(
    "/jobs/compression",
    status_code=status.HTTP_202_ACCEPTED,
    responses={**AUTH_ERRORS, 404: {"model": ErrorBody}},
)
def create_compression_job(
    body: CompressionJobCreate,
    session: SessionDep,
    services: ServicesDep,
    who: OperatorDep,
    audit: AuditDep,
) -> JobPublic:
    """Queue a compression of a registered model into signed artifacts for ``targets``.

    Refused before anything is queued: an unknown model (404), unknown targets, a teacher
    directory that is gone, a student the teacher cannot give (more layers than it has, layer
    indices outside it), data that does not exist (422)."""
    audit.resource = f"model:{body.model}"
    model = get_model(session, body.model)
    unknown = [t for t in body.targets if t not in TARGETS]
    if unknown:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"unknown targets {', '.join(unknown)}; known targets: {', '.join(TARGETS)}",
        )
    teacher = _check_teacher(model.name, model.teacher_dir)
    if body.distill.enabled:
        _check_student(body.student, teacher)
    data = None
    if body.data is not None:
        path = FsPath(body.data).expanduser()
        if not path.is_absolute() or not path.exists():
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"data {body.data!r} must be an absolute path that exists on the controller",
            )
        data = str(path.resolve())
    spec = CompressionJobSpec(
        **{
            **body.model_dump(),
            "targets": list(dict.fromkeys(body.targets)),
            "data": data,
        },
        task=model.task,
        teacher_dir=str(teacher),
    )
    job = Job(
        kind="compression",
        status=JobStatus.QUEUED,
        spec=spec.model_dump(mode="json"),
        progress={},
        attempts=0,
        cancel_requested=False,
        created_by=who.actor,
    )
    session.add(job)
    session.flush()
    audit.resource = f"job:{job.id}"
    answer = JobPublic.model_validate(job)
    session.commit()
    kick(services.jobs, "job")
    return answer


@router.get("/jobs", responses=AUTH_ERRORS)
def list_jobs(
    session: SessionDep,
    _who: ReaderDep,
    job_status: Annotated[JobStatus | None, Query(alias="status")] = None,
    kind: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> list[JobPublic]:
    """Jobs, newest first."""
    query = select(Job).order_by(Job.id.desc()).limit(limit).offset(offset)
    if job_status is not None:
        query = query.where(Job.status == job_status)
    if kind is not None:
        query = query.where(Job.kind == kind)
    return [JobPublic.model_validate(j) for j in session.scalars(query)]


def get_job(session: SessionDep, job_id: int, *, for_update: bool = False) -> Job:
    job = session.get(Job, job_id, with_for_update=for_update)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job with id {job_id}")
    return job


@router.get("/jobs/{job_id}", responses={**AUTH_ERRORS, 404: {"model": ErrorBody}})
def read_job(job_id: IdPath, session: SessionDep, _who: ReaderDep) -> JobPublic:
    """One job: status, progress, result (or error)."""
    return JobPublic.model_validate(get_job(session, job_id))


@router.post(
    "/jobs/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    responses={**AUTH_ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def cancel_job(
    job_id: IdPath,
    session: SessionDep,
    services: ServicesDep,
    who: OperatorDep,
    audit: AuditDep,
) -> JobPublic:
    """Ask a job to stop: a queued job is cancelled at once, a running one when its worker
    sees the request."""
    audit.resource = f"job:{job_id}"
    job = get_job(session, job_id, for_update=True)
    if job.status in FINISHED:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job {job_id} has already finished ({job.status.value})"
        )
    job.cancel_requested = True
    if job.status == JobStatus.QUEUED:
        job.status = JobStatus.CANCELLED
        job.finished_at = datetime.now(UTC)
        job.error = f"cancelled by {who.actor} before it started"
    answer = JobPublic.model_validate(job)
    session.commit()
    kick(services.jobs, "job")
    return answer
