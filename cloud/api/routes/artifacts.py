"""Artifact downloads for agents: ``GET /api/v1/artifacts/NAME/vN/TARGET/FILE``.

Served from the artifact store with Range support (Starlette's ``FileResponse`` answers
``Range: bytes=N-`` with 206 and an unsatisfiable range with 416). Only published artifacts
(a ``manifest.json`` in the folder) are served, and only regular files inside them: a path
with ``..``, an absolute path, a symbolic link anywhere on the way or anything outside the
store is a 404 -- the same answer as a file that does not exist.
"""

from __future__ import annotations

import stat
from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status
from fastapi.responses import FileResponse

from edgefed.cloud.api.deps import AUTH_ERRORS, PrincipalDep, StateDep
from edgefed.cloud.api.schemas import MAX_INT32, ErrorBody
from edgefed.common.artifact import MANIFEST_NAME, SIGNATURE_NAME, unsafe_path_problem
from edgefed.common.topics import ID_PATTERN

router = APIRouter(prefix="/api/v1", tags=["artifacts"])


def _not_found(rel: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no artifact file {rel}")


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
    who: PrincipalDep,
) -> FileResponse:
    """A file of a published artifact (agent tokens, or reader and above); ``Range: bytes=N-``
    resumes a download (206)."""
    if not (who.is_agent or who.allows("reader")):
        who.require("reader")
    rel = f"{name}/v{version}/{target}/{file}"
    if file not in (MANIFEST_NAME, SIGNATURE_NAME) and unsafe_path_problem(file) is not None:
        raise _not_found(rel)
    store = state.artifact_store
    base = [name, f"v{version}", target]
    contained_file(store, [*base, MANIFEST_NAME], rel)  # published: the manifest exists
    path = contained_file(store, [*base, *file.split("/")], rel)
    return FileResponse(path, media_type="application/octet-stream")
