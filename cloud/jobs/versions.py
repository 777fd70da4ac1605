"""Which version a compression job publishes.

The supervisor chooses it when it starts the job's first attempt (jobs start in id order, so
jobs queued one after the other get increasing versions) and keeps it in the job's
``progress["version"]``; later attempts publish the same version.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefed.cloud.registry.models import Job, JobStatus, Model, ModelVersion
from edgefed.common.artifact import MANIFEST_NAME

_VERSION_DIR = re.compile(r"^v([0-9]+)$")


def store_latest(store: Path, name: str) -> int:
    """Highest version of ``name`` with a published target in the store (0: none); the same
    rule as :func:`edgefed.cloud.compress.publish.latest_version`, without its imports."""
    root = store / name
    if not root.is_dir():
        return 0
    versions = [
        int(m.group(1))
        for child in root.iterdir()
        if (m := _VERSION_DIR.match(child.name))
        and child.is_dir()
        and any((t / MANIFEST_NAME).is_file() for t in child.iterdir() if t.is_dir())
    ]
    return max(versions, default=0)


def job_version(session: Session, job: Job, store: Path) -> int | None:
    """The version ``job`` publishes: the one chosen earlier, else one more than any version of
    its model in the store, the registry or claimed by another unfinished job; None when the
    job names no registered model (the worker reports that)."""
    chosen = (job.progress or {}).get("version")
    if isinstance(chosen, int) and not isinstance(chosen, bool) and chosen >= 1:
        return chosen
    name = (job.spec or {}).get("model")
    model = session.scalar(select(Model).where(Model.name == name)) if name else None
    if model is None:
        return None
    registered = session.scalars(
        select(ModelVersion.version).where(ModelVersion.model_id == model.id)
    ).all()
    claimed: list[int] = []
    for other in session.scalars(
        select(Job).where(
            Job.id != job.id,
            Job.kind == job.kind,
            Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)),
        )
    ):
        value = (other.progress or {}).get("version")
        if (other.spec or {}).get("model") == model.name and isinstance(value, int):
            claimed.append(value)
    return 1 + max([store_latest(store, model.name), *registered, *claimed])
