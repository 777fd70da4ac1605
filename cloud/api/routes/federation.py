"""Federated learning runs: start one on the controller's Flower SuperLink, watch it round by
round (accepted and rejected updates with their reasons, losses, accuracy), stop it.

The API checks what it can before anything is queued (the model, its model directory, the
data files the server reads, settings that cannot work together) and writes the run row; the
federation service (:mod:`edgefed.cloud.federation.service`) submits it with ``flwr run`` and
copies the ServerApp's progress into the row after every round.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, model_validator
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
from edgefed.cloud.api.schemas import ErrorBody, PathText, Text64
from edgefed.cloud.registry.models import FederationRun, FederationRunStatus
from edgefed.cloud.services import kick

router = APIRouter(prefix="/api/v1/federation", tags=["federation"])

STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedtrimmedavg",
    "fedmedian",
    "krum",
    "multikrum",
    "bulyan",
    "fltrust",
)
FINISHED = frozenset(
    {FederationRunStatus.SUCCEEDED, FederationRunStatus.FAILED, FederationRunStatus.STOPPED}
)

Fraction = Annotated[FiniteFloat, Field(gt=0, le=1)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainingIn(_In):
    """How each SuperNode fine-tunes the model on its local data per round."""

    lr: Annotated[FiniteFloat, Field(gt=0, le=1)] = 5e-5
    local_steps: Annotated[int, Field(ge=1, le=100_000)] = 10
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 8
    max_seq_len: Annotated[int, Field(ge=8, le=8192)] = 64
    train_mode: Literal["full", "top-layers", "head", "lora"] = "full"
    top_layers: Annotated[int, Field(ge=1, le=1000)] = 1
    """Layers trained under ``top-layers`` (the head always)."""
    lora_rank: Annotated[int, Field(ge=1, le=1024)] = 8
    proximal_mu: Annotated[FiniteFloat, Field(ge=0, le=1000)] = 0.0
    """FedProx proximal term (0: off; the ``fedprox`` strategy needs it above 0)."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    max_examples: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    """Examples per node per round at most (0: all)."""


class ValidationIn(_In):
    """Checks every update passes before aggregation; rejected ones are dropped with a reason."""

    max_update_norm: Annotated[FiniteFloat, Field(ge=0)] = 0.0
    """Absolute cap on ||w_i - w_global|| (0: off)."""
    norm_ratio: Annotated[FiniteFloat, Field(gt=1, le=1e6)] = 5.0
    """Reject an update whose norm is above this multiple of the round's median norm."""
    max_num_examples: Annotated[int, Field(ge=1, le=2**62)] = 100_000
    """Largest example count a node may claim."""
    min_valid_updates: Annotated[int, Field(ge=1, le=100_000)] = 1
    """The round fails when fewer updates than this pass."""


class DpIn(_In):
    """Central differential privacy with fixed clipping (Flower's server-side wrapper)."""

    noise_multiplier: Annotated[FiniteFloat, Field(ge=0, le=1000)]
    clipping_norm: Annotated[FiniteFloat, Field(gt=0, le=1e9)]


class FederationRunCreate(_In):
    model: Annotated[Text64, Field(min_length=1)]
    """A registered model; its teacher directory is federated unless ``model_dir`` says."""
    model_dir: PathText | None = None
    """An HF model directory on the controller (absolute): config.json, weights, tokenizer."""
    strategy: Literal[STRATEGIES] = "fedavg"  # type: ignore[valid-type]
    rounds: Annotated[int, Field(ge=1, le=10_000)] = 3
    min_nodes: Annotated[int, Field(ge=1, le=100_000)] = 2
    """SuperNodes that must take part in each round."""
    fraction_train: Fraction = 1.0
    eval_data: PathText | None = None
    """Held-out JSONL on the controller for server-side evaluation (absolute path)."""
    root_data: PathText | None = None
    """FLTrust's small root data set on the controller (absolute path; fltrust only)."""
    trimmed_beta: Annotated[FiniteFloat, Field(gt=0, lt=0.5)] = 0.2
    krum_byzantine: Annotated[int, Field(ge=0, le=100_000)] = 0
    """Malicious nodes Krum/MultiKrum/Bulyan tolerate."""
    training: TrainingIn = Field(default_factory=TrainingIn)
    validation: ValidationIn = Field(default_factory=ValidationIn)
    dp: DpIn | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FederationRunCreate:
        if self.strategy == "fltrust" and not self.root_data:
            raise ValueError("strategy fltrust needs root_data (the server's root data set)")
        if self.strategy == "fedprox" and self.training.proximal_mu <= 0:
            raise ValueError("strategy fedprox needs training.proximal_mu above 0")
        if self.validation.min_valid_updates > self.min_nodes:
            raise ValueError(
                f"validation.min_valid_updates ({self.validation.min_valid_updates}) is more "
                f"than min_nodes ({self.min_nodes}): no round could pass"
            )
        if self.strategy in ("krum", "multikrum") and self.min_nodes < 2 * self.krum_byzantine + 3:
            raise ValueError(
                f"{self.strategy} with krum_byzantine={self.krum_byzantine} needs min_nodes of "
                f"at least {2 * self.krum_byzantine + 3}"
            )
        if self.strategy == "bulyan" and self.min_nodes < 4 * self.krum_byzantine + 3:
            raise ValueError(
                f"bulyan with krum_byzantine={self.krum_byzantine} needs min_nodes of at least "
                f"{4 * self.krum_byzantine + 3}"
            )
        return self


class FederationRunPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    model: str
    status: FederationRunStatus
    flwr_run_id: str | None
    spec: dict[str, Any]
    progress: dict[str, Any]
    result: dict[str, Any] | None
    loop: dict[str, Any]
    """The closed loop after success (compression, canary rollout)."""
    error: str | None
    stop_requested: bool
    created_by: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


def _existing_file(what: str, text: str | None) -> str | None:
    if text is None:
        return None
    path = FsPath(text).expanduser()
    if not path.is_absolute() or not path.is_file():
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"{what} {text!r} must be an absolute path of a file that exists on the controller",
        )
    return str(path.resolve())


def _model_dir(name: str, given: str | None, teacher_dir: str | None) -> str:
    text = given or teacher_dir
    if not text:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"model {name!r} has no teacher directory: pass model_dir",
        )
    path = FsPath(text).expanduser()
    if not path.is_absolute() or not (path / "config.json").is_file():
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"model directory {text!r} must be an absolute path of an HF model directory "
            "(with config.json) on the controller",
        )
    if not (path / "tokenizer.json").is_file():
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"model directory {text!r} holds no tokenizer.json: SuperNodes get the tokenizer "
            "from it (save the tokenizer with save_pretrained)",
        )
    return str(path.resolve())


@router.post(
    "/runs",
    status_code=status.HTTP_202_ACCEPTED,
    responses={**AUTH_ERRORS, 404: {"model": ErrorBody}},
)
def create_run(
    body: FederationRunCreate,
    session: SessionDep,
    services: ServicesDep,
    who: OperatorDep,
    audit: AuditDep,
) -> FederationRunPublic:
    """Queue a federated run of a registered model on the SuperLink.

    Refused before anything is queued: an unknown model (404); a model directory without
    config.json or tokenizer.json, data files that do not exist, settings that cannot work
    together (422)."""
    audit.resource = f"model:{body.model}"
    model = get_model(session, body.model)
    spec = body.model_dump(mode="json")
    spec["model_dir"] = _model_dir(model.name, body.model_dir, model.teacher_dir)
    spec["eval_data"] = _existing_file("eval_data", body.eval_data)
    spec["root_data"] = _existing_file("root_data", body.root_data)
    dp = spec.pop("dp")
    if dp is not None:
        spec["dp_noise_multiplier"] = dp["noise_multiplier"]
        spec["dp_clipping_norm"] = dp["clipping_norm"]
    run = FederationRun(
        model=model.name,
        status=FederationRunStatus.QUEUED,
        spec=spec,
        progress={},
        loop={},
        stop_requested=False,
        created_by=who.actor,
    )
    session.add(run)
    session.flush()
    audit.resource = f"federation-run:{run.id}"
    answer = FederationRunPublic.model_validate(run)
    session.commit()
    kick(services.federation, "federation")
    return answer


@router.get("/runs", responses=AUTH_ERRORS)
def list_runs(
    session: SessionDep,
    _who: ReaderDep,
    run_status: Annotated[FederationRunStatus | None, Query(alias="status")] = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> list[FederationRunPublic]:
    """Federated runs, newest first."""
    query = select(FederationRun).order_by(FederationRun.id.desc()).limit(limit).offset(offset)
    if run_status is not None:
        query = query.where(FederationRun.status == run_status)
    if model is not None:
        query = query.where(FederationRun.model == model)
    return [FederationRunPublic.model_validate(r) for r in session.scalars(query)]


def get_run(session: SessionDep, run_id: int, *, for_update: bool = False) -> FederationRun:
    run = session.get(FederationRun, run_id, with_for_update=for_update)
    if run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no federated run with id {run_id}")
    return run


@router.get("/runs/{run_id}", responses={**AUTH_ERRORS, 404: {"model": ErrorBody}})
def read_run(run_id: IdPath, session: SessionDep, _who: ReaderDep) -> FederationRunPublic:
    """One run: status, progress per round (accepted and rejected updates with reasons,
    losses, accuracy), the result or the error, the closed loop."""
    return FederationRunPublic.model_validate(get_run(session, run_id))


@router.post(
    "/runs/{run_id}/stop",
    status_code=status.HTTP_202_ACCEPTED,
    responses={**AUTH_ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def stop_run(
    run_id: IdPath,
    session: SessionDep,
    services: ServicesDep,
    who: OperatorDep,
    audit: AuditDep,
) -> FederationRunPublic:
    """Stop a run: a queued run stops at once, a running one when the service has stopped its
    Flower run."""
    audit.resource = f"federation-run:{run_id}"
    run = get_run(session, run_id, for_update=True)
    if run.status in FINISHED:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"federated run {run_id} has already finished ({run.status.value})",
        )
    run.stop_requested = True
    if run.status == FederationRunStatus.QUEUED:
        run.status = FederationRunStatus.STOPPED
        run.error = f"stopped by {who.actor} before it started"
        run.finished_at = datetime.now(UTC)
    answer = FederationRunPublic.model_validate(run)
    session.commit()
    kick(services.federation, "federation")
    return answer
