"""Exception handlers: every error leaves the API as ``{"detail": "<what was wrong>"}``.

* invalid input (including malformed JSON) → 422 with a readable sentence per problem (the
  structured list is kept under ``errors``);
* a database constraint (duplicate name, a row that vanished) → 409;
* a value the database cannot store → 422;
* a database that is busy or unreachable → 503 with ``Retry-After``;
* registry errors → 404 (unknown model, artifact not in the store), 409 (conflicting
  artifact), 422 (other);
* anything else → 500 ``internal error`` (logged with its traceback; never the exception text).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from edgefed.cloud.registry.artifacts import (
    ArtifactConflictError,
    ArtifactMissingError,
    RegistryError,
    UnknownModelError,
)

log = logging.getLogger(__name__)


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """One readable line for pydantic/FastAPI validation errors."""
    parts: list[str] = []
    for err in errors[:10]:
        loc = [str(p) for p in err.get("loc", ())]
        where = ".".join(loc) or "request"
        kind = err.get("type", "")
        if kind == "json_invalid":
            reason = (err.get("ctx") or {}).get("error") or err.get("msg", "")
            position = f" at character {loc[-1]}" if len(loc) > 1 else ""
            parts.append(f"the request body is not valid JSON ({reason}){position}")
        elif kind == "missing":
            parts.append(f"{where}: a value is required")
        else:
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}")
    if len(errors) > 10:
        parts.append(f"and {len(errors) - 10} more problems")
    return "; ".join(parts) or "invalid request"


def _first_line(exc: Exception) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0][:300] if str(orig).strip() else type(orig).__name__


async def _validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    slim = [{k: e.get(k) for k in ("type", "loc", "msg")} for e in errors]
    return JSONResponse(
        status_code=422,
        content={"detail": describe_validation_errors(errors), "errors": jsonable_encoder(slim)},
    )


async def _integrity(_request: Request, exc: Exception) -> JSONResponse:
    log.info("integrity error: %s", exc)
    return JSONResponse(
        status_code=409,
        content={"detail": f"conflicts with what the registry holds: {_first_line(exc)}"},
    )


async def _data(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={"detail": f"a value does not fit the registry: {_first_line(exc)}"},
    )


async def _operational(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    return JSONResponse(
        status_code=503,
        content={"detail": f"the registry database is busy or unreachable: {_first_line(exc)}"},
        headers={"Retry-After": "1"},
    )


async def _registry(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RegistryError)
    code = 422
    if isinstance(exc, UnknownModelError | ArtifactMissingError):
        code = 404
    elif isinstance(exc, ArtifactConflictError):
        code = 409
    return JSONResponse(status_code=code, content={"detail": exc.message})


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error answering %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(status_code=500, content={"detail": "internal error (see the log)"})


def install_exception_handlers(app: FastAPI) -> None:
    """Register the handlers above on ``app``."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(IntegrityError, _integrity)
    app.add_exception_handler(DataError, _data)
    app.add_exception_handler(OperationalError, _operational)
    app.add_exception_handler(RegistryError, _registry)
    app.add_exception_handler(Exception, _internal)
