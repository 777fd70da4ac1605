"""The loop back to the edge: a finished federated run becomes a new signed version that rolls
out with a canary, like any other.

After the last round the ServerApp leaves the aggregated model as an HF directory
(``<out-dir>/model``). The loop then moves through stages, recorded in the run's ``loop``
dictionary so that a restarted controller picks it up where it was:

1. ``gate`` -- the federated model must not be worse than the model the run started from on
   the server's held-out set (round 0 against the last round of server-side evaluation, at most
   ``max_accuracy_drop`` lower); otherwise ``not-promoted`` with the figures.
2. ``compressing`` -- a compression job (the same worker and pipeline as ``edgefed compress``,
   distillation off: export, quantize per target, the quality gate, signing, registration) with
   the federated model as its teacher; the job's own failure or gate refusal ends the loop
   (``failed``) with its reason.
3. ``rolling-out`` -- a canary deployment of the new version to the agents the model's latest
   deployment covered (its selector and target), through the same checks as the API's create;
   ``registered`` when the model was never deployed (nothing to follow), with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefed.cloud.api.routes.deployments import insert_deployment
from edgefed.cloud.api.schemas import CompressionJobSpec, DeploymentCreate, DistillIn
from edgefed.cloud.registry.models import (
    Artifact,
    Deployment,
    DeploymentStatus,
    Job,
    JobStatus,
    Model,
    ModelVersion,
)

log = logging.getLogger(__name__)

DONE_STAGES = frozenset({"rolling-out", "registered", "not-promoted", "failed"})
"""Stages after which the loop has nothing more to do (the rollout engine owns the rollout)."""


@dataclass(frozen=True)
class LoopSettings:
    """How a finished run is promoted."""

    enabled: bool = True
    max_accuracy_drop: float = 0.02
    """The federated model may be at most this much less accurate (server-side held-out set)
    than the model the run started from; more and it is not promoted."""
    canary_count: int = 1
    soak_s: float = 30.0
    eval_examples: int = 64
    latency_repeats: int = 3


def accuracy_problem(progress: dict[str, Any], max_drop: float) -> str | None:
    """Why the run's model must not be promoted on its server-side accuracy, or None.

    Without server-side evaluation (no held-out set) there is nothing to compare; the
    compression pipeline's quality gate still applies."""
    rounds = [r for r in progress.get("rounds", []) if r.get("eval_accuracy") is not None]
    initial = progress.get("initial_eval_accuracy")
    if initial is None or not rounds:
        return None
    final = float(rounds[-1]["eval_accuracy"])
    if final < float(initial) - max_drop:
        return (
            f"server-side accuracy fell from {float(initial):.4f} (round 0) to {final:.4f} "
            f"(round {rounds[-1]['round']}), more than the allowed {max_drop:.4f}"
        )
    return None


def _model(session: Session, name: str) -> Model:
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        raise LookupError(f"model {name!r} is no longer registered")
    return model


def _latest_deployment(session: Session, model: Model) -> Deployment | None:
    """The model's newest deployment that got somewhere (not pending, not aborted)."""
    return session.scalar(
        select(Deployment)
        .where(
            Deployment.model_id == model.id,
            Deployment.status.in_(
                (DeploymentStatus.COMPLETED, DeploymentStatus.ROLLING, DeploymentStatus.SOAKING)
            ),
        )
        .order_by(Deployment.id.desc())
        .limit(1)
    )


def _targets(session: Session, model: Model) -> list[str]:
    """The targets of the model's latest registered version (x86-avx2 when it has none)."""
    latest = session.scalar(
        select(ModelVersion)
        .where(ModelVersion.model_id == model.id)
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )
    if latest is None:
        return ["x86-avx2"]
    targets = sorted(
        session.scalars(select(Artifact.target).where(Artifact.version_id == latest.id))
    )
    return targets or ["x86-avx2"]


def queue_compression(
    session: Session, model_name: str, model_dir: Path, settings: LoopSettings, actor: str | None
) -> Job:
    """A compression job of the federated model: distillation off, the model's targets."""
    model = _model(session, model_name)
    spec = CompressionJobSpec(
        model=model.name,
        targets=_targets(session, model),
        distill=DistillIn(enabled=False),
        eval_examples=settings.eval_examples,
        latency_repeats=settings.latency_repeats,
        task=model.task,
        teacher_dir=str(model_dir),
    )
    job = Job(
        kind="compression",
        status=JobStatus.QUEUED,
        spec=spec.model_dump(mode="json"),
        progress={},
        attempts=0,
        cancel_requested=False,
        created_by=actor,
    )
    session.add(job)
    session.flush()
    return job


def _job_version(job: Job) -> int | None:
    version = (job.result or {}).get("version") or (job.progress or {}).get("version")
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def start_rollout(
    session: Session,
    model_name: str,
    version: int,
    settings: LoopSettings,
    fleet: str,
    actor: str | None,
) -> dict[str, Any]:
    """A canary deployment of ``version`` following the model's latest deployment; the loop
    state it ends in."""
    model = _model(session, model_name)
    previous = _latest_deployment(session, model)
    if previous is None:
        return {
            "stage": "registered",
            "version": version,
            "reason": f"{model_name} was never deployed: no agents to roll v{version} out to; "
            "deploy it yourself",
        }
    body = DeploymentCreate.model_validate(
        {
            "model": model_name,
            "version": version,
            "target": previous.target,
            "selector": previous.selector,
            "strategy": {
                "kind": "canary",
                "canary_count": settings.canary_count,
                "soak_s": settings.soak_s,
            },
        }
    )
    try:
        deployment, _ = insert_deployment(session, body, fleet, actor)
    except HTTPException as exc:
        return {
            "stage": "registered",
            "version": version,
            "reason": f"the canary rollout of v{version} was refused: {exc.detail}",
        }
    return {"stage": "rolling-out", "version": version, "deployment_id": deployment.id}


def advance(
    session: Session,
    loop: dict[str, Any],
    *,
    model_name: str,
    model_dir: Path,
    progress: dict[str, Any],
    settings: LoopSettings,
    fleet: str,
    actor: str | None,
) -> dict[str, Any]:
    """One step of the loop from state ``loop`` (``{}`` for a run that just succeeded); the new
    state. The caller commits the session and kicks the job and rollout services when the stage
    changed."""
    stage = loop.get("stage")
    if stage in DONE_STAGES:
        return loop
    if not stage:
        problem = accuracy_problem(progress, settings.max_accuracy_drop)
        if problem is not None:
            return {"stage": "not-promoted", "reason": problem}
        if not (model_dir / "config.json").is_file():
            return {"stage": "failed", "reason": f"the run left no model in {model_dir}"}
        job = queue_compression(session, model_name, model_dir, settings, actor)
        log.info("federated %s: compression job %d queued for %s", model_name, job.id, model_dir)
        return {"stage": "compressing", "job_id": job.id}
    queued = session.get(Job, loop.get("job_id"))
    if queued is None:
        return {"stage": "failed", "reason": f"compression job {loop.get('job_id')} is gone"}
    job = queued
    if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
        return loop
    if job.status != JobStatus.SUCCEEDED:
        return {**loop, "stage": "failed", "reason": f"compression job {job.id}: {job.error}"}
    version = _job_version(job)
    published = (job.result or {}).get("published") or []
    if version is None or not published:
        why = (job.result or {}).get("refused") or "no target passed the quality gate"
        return {**loop, "stage": "failed", "reason": f"compression job {job.id}: {why}"}
    state = start_rollout(session, model_name, version, settings, fleet, actor)
    log.info("federated %s: v%d %s", model_name, version, state["stage"])
    return {**loop, **state}
