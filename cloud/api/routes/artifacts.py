"""Artifact downloads for agents: ``GET /api/v1/artifacts/NAME/vN/TARGET/FILE``.

Served from the artifact store with Range support (Starlette's ``FileResponse`` answers
``Range: bytes=N-`` with 206 and an unsatisfiable range with 416). Only published artifacts
(a ``manifest.json`` in the folder) are served, and only regular files inside them: a path
with ``..``, an absolute path, a symbolic link anywhere on the way or anything outside the
store is a 404 -- the same answer as a file that does not exist.

Readers (and above) may download any artifact. An agent token downloads only the artifacts its
own agent's desired state names (403 otherwise): one leaked agent token must not fetch every
model of the registry, or another agent's. The desired state is recorded in the registry before
it is published, so an agent never asks before the controller would answer.
"""

from __future__ import annotations

import stat
from pathlib import Path as FsPath
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException, Path, status
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from edgefed.cloud.api.deps import AUTH_ERRORS, PrincipalDep, SessionDep, StateDep
from edgefed.cloud.api.schemas import MAX_INT32, ErrorBody
from edgefed.cloud.api.security import Principal, forbidden
from edgefed.cloud.fleet.desired import stored_models
from edgefed.cloud.registry.models import Agent
from edgefed.common.artifact import MANIFEST_NAME, SIGNATURE_NAME, unsafe_path_problem
from edgefed.common.topics import ID_PATTERN

router = APIRouter(prefix="/api/v1", tags=["artifacts"])


def _not_found(rel: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no artifact file {rel}")


def names_artifact(agent: Agent | None, name: str, version: int, target: str) -> bool:
    """Whether ``agent``'s stored desired state names the artifact ``name`` v``version`` for
    ``target`` (its URL ends in ``NAME/vN/TARGET``, whatever host it was given)."""
    if agent is None:
        return False
    suffix = f"/{name}/v{version}/{target}"
    return any(
        m.name == name
        and m.version == version
        and urlsplit(m.artifact_url).path.rstrip("/").endswith(suffix)
        for m in stored_models(agent)
    )


def require_download(
    session: Session, who: Principal, name: str, version: int, target: str
) -> None:
    """403 unless ``who`` is a reader (or above), or an agent whose desired state names the
    artifact."""
    if not who.is_agent:
        who.require("reader")
        return
    agent = session.get(Agent, who.agent_id) if who.agent_id else None
    if not names_artifact(agent, name, version, target):
        raise forbidden(
            f"an agent token downloads only the artifacts of its own desired state "
            f"({who.agent_id}'s names no {name} v{version} for {target})"
        )


def contained_file(store: FsPath, parts: list[str], rel: str) -> FsPath:
    """``store/parts...`` when it is a regular file reached without following any symbolic
    link and lies inside the store; 404 otherwise."""
    current = store
    mode = 0
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\x00" in part:
            raise _not_found(rel)
        current = current / part
        try:
            mode = current.lstat().st_mode
        except (OSError, ValueError):
            raise _not_found(rel) from None
        if stat.S_ISLNK(mode):
            raise _not_found(rel)
    if not stat.S_ISREG(mode):
        raise _not_found(rel)
    resolved = current.resolve()
    if not resolved.is_relative_to(store):
        raise _not_found(rel)
    return resolved


@router.get(
    "/artifacts/{name}/v{version}/{target}/{file:path}",
    response_class=FileResponse,
    responses={
        **AUTH_ERRORS,
        200: {"content": {"application/octet-stream": {}}, "description": "the file"},
        206: {"content": {"application/octet-stream": {}}, "description": "a byte range"},
        404: {"model": ErrorBody},
        416: {"description": "range not satisfiable"},
    },
)
def download_artifact_file(
    name: Annotated[str, Path(pattern=ID_PATTERN)],
    version: Annotated[int, Path(ge=1, le=MAX_INT32)],
    target: Annotated[str, Path(pattern=ID_PATTERN)],
    file: Annotated[str, Path(min_length=1, max_length=4096)],
    state: StateDep,
    session: SessionDep,
    who: PrincipalDep,
) -> FileResponse:
    """A file of a published artifact (reader and above, or an agent whose desired state names
    it); ``Range: bytes=N-`` resumes a download (206)."""
    require_download(session, who, name, version, target)
    rel = f"{name}/v{version}/{target}/{file}"
    if file not in (MANIFEST_NAME, SIGNATURE_NAME) and unsafe_path_problem(file) is not None:
        raise _not_found(rel)
    store = state.artifact_store
    base = [name, f"v{version}", target]
    contained_file(store, [*base, MANIFEST_NAME], rel)  # published: the manifest exists
    path = contained_file(store, [*base, *file.split("/")], rel)
    return FileResponse(path, media_type="application/octet-stream")
