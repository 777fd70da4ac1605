"""Models: register a teacher directory, list models, versions, artifacts and their validation
reports, register versions published to the artifact store out of band."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, status
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from edgefed.cloud.api.deps import (
    AUTH_ERRORS,
    AuditDep,
    OperatorDep,
    ReaderDep,
    SessionDep,
    StateDep,
)
from edgefed.cloud.api.schemas import (
    ArtifactPublic,
    ErrorBody,
    ModelCreate,
    ModelDetail,
    ModelPublic,
    ModelVersionPublic,
    VersionRegister,
)
from edgefed.cloud.registry.artifacts import artifact_url, published_targets, register_artifacts
from edgefed.cloud.registry.models import Model, ModelVersion
from edgefed.common.topics import ID_PATTERN

router = APIRouter(prefix="/api/v1", tags=["models"])

ModelNamePath = Annotated[str, Path(pattern=ID_PATTERN, description="A model name")]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody}}


def get_model(session: Session, name: str) -> Model:
    """The model called ``name``; 404 naming it when there is none."""
    model = session.scalars(select(Model).where(Model.name == name)).one_or_none()
    if model is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model named {name!r}")
    return model


def check_teacher_dir(text: str) -> FsPath:
    """The teacher directory as an absolute path, or 422 saying what is wrong with it."""
    path = FsPath(text).expanduser()
    problem = None
    if not path.is_absolute():
        problem = f"teacher_dir {text!r} must be an absolute path on the controller"
    elif not path.exists():
        problem = f"teacher_dir {text!r} does not exist on the controller"
    elif not path.is_dir():
        problem = f"teacher_dir {text!r} is not a directory"
    elif not (path / "config.json").is_file():
        problem = f"teacher_dir {text!r} holds no config.json: not a Hugging Face model directory"
    if problem:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, problem)
    return path.resolve()


def version_public(name: str, version: ModelVersion, public_url: str) -> ModelVersionPublic:
    out = ModelVersionPublic.model_validate(version)
    out.artifacts = [
        ArtifactPublic.model_validate(a).model_copy(
            update={"url": artifact_url(public_url, name, version.version, a.target)}
        )
        for a in version.artifacts
    ]
    return out


def model_public(model: Model) -> ModelPublic:
    versions = sorted(v.version for v in model.versions)
    return ModelPublic(
        name=model.name,
        task=model.task,
        teacher_dir=model.teacher_dir,
        created_at=model.created_at,
        created_by=model.created_by,
        versions=versions,
        latest_version=max(versions, default=None),
    )


@router.post(
    "/models",
    status_code=status.HTTP_201_CREATED,
    responses={**AUTH_ERRORS, 409: {"model": ErrorBody}},
)
def create_model(
    body: ModelCreate, session: SessionDep, who: OperatorDep, audit: AuditDep
) -> ModelPublic:
    """Register a teacher: a Hugging Face model directory on the controller."""
    audit.resource = f"model:{body.name}"
    teacher = check_teacher_dir(body.teacher_dir)
    if session.scalars(select(Model.id).where(Model.name == body.name)).first() is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"a model named {body.name!r} exists")
    model = Model(name=body.name, task=body.task, teacher_dir=str(teacher), created_by=who.actor)
    session.add(model)
    session.flush()
    answer = ModelPublic(
        name=model.name,
        task=model.task,
        teacher_dir=model.teacher_dir,
        created_at=model.created_at,
        created_by=model.created_by,
    )
    session.commit()
    return answer


@router.get("/models", responses=AUTH_ERRORS)
def list_models(session: SessionDep, _who: ReaderDep) -> list[ModelPublic]:
    """Registered models with their version numbers."""
    rows = session.scalars(select(Model).options(selectinload(Model.versions)).order_by(Model.name))
    return [model_public(m) for m in rows]


@router.get("/models/{name}", responses={**AUTH_ERRORS, **_NOT_FOUND})
def get_model_detail(
    name: ModelNamePath, session: SessionDep, state: StateDep, _who: ReaderDep
) -> ModelDetail:
    """A model with every version, its artifacts and their validation reports (metrics)."""
    model = get_model(session, name)
    out = ModelDetail(**model_public(model).model_dump())
    out.version_details = [
        version_public(name, v, state.controller.resolved_public_url) for v in model.versions
    ]
    return out


@router.post(
    "/models/{name}/versions",
    status_code=status.HTTP_201_CREATED,
    responses={**AUTH_ERRORS, **_NOT_FOUND, 409: {"model": ErrorBody}},
)
def register_version(
    name: ModelNamePath,
    body: VersionRegister,
    session: SessionDep,
    state: StateDep,
    _who: OperatorDep,
    audit: AuditDep,
) -> ModelVersionPublic:
    """Register a version already published to the artifact store (``NAME/vN/TARGET``, e.g.
    by ``edgefed compress --out STORE --signing-key <the controller's key>``). Artifacts must
    be signed by the controller's key: agents trust no other."""
    audit.resource = f"model:{name}/v{body.version}"
    get_model(session, name)
    targets = body.targets or published_targets(state.artifact_store, name, body.version)
    if not targets:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"the artifact store holds no published artifact of {name} v{body.version}",
        )
    version = register_artifacts(
        session,
        name,
        body.version,
        state.artifact_store,
        targets,
        None,
        trusted_keys=[state.signing_key.verify_key],
        note=body.note,
    )
    answer = version_public(name, version, state.controller.resolved_public_url)
    session.commit()
    return answer
