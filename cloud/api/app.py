"""The application factory of the control API.

:func:`create_app` builds a FastAPI app and nothing else; its lifespan does the work when the
app starts: the database engine and sessions, Alembic migrations to head, the artifact-signing
key (created on first start), the first admin token (when none exists: written to
``data_dir/admin.token``, mode 0600), the rate limiter. All of it sits on
``app.state.controller`` (:class:`ControllerState`); the background services on
``app.state.services`` (replaceable after start-up by whoever runs them).

Middleware, outermost first: metrics → audit → body size limit → routes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from edgefed import __version__
from edgefed.cloud.api.audit import AuditMiddleware
from edgefed.cloud.api.errors import install_exception_handlers
from edgefed.cloud.api.limits import BodySizeLimitMiddleware
from edgefed.cloud.api.metrics import HttpMetrics, MetricsMiddleware
from edgefed.cloud.api.ratelimit import RateLimiter
from edgefed.cloud.api.routes import ROUTERS
from edgefed.cloud.api.security import ADMIN_TOKEN_FILE, bootstrap_admin
from edgefed.cloud.api.state import ControllerState
from edgefed.cloud.keys import load_or_create_signing_key
from edgefed.cloud.registry.db import (
    head_revision,
    make_engine,
    make_sessionmaker,
    migrate,
    session_scope,
)
from edgefed.cloud.services import Services
from edgefed.cloud.settings import CloudSettings

log = logging.getLogger(__name__)

API_DESCRIPTION = """\
The edgefed controller: register teacher models, run compression jobs, list versions and their
validation reports, enrol agents, roll model versions out to them, read fleet and routing
statistics. Every call under `/api/v1` except agent enrolment needs a bearer token; scopes nest
`admin` ⊇ `operator` ⊇ `reader`, and `agent` tokens reach only their own agent. Every mutating
call is audited. Errors are `{"detail": "..."}`.
"""


def open_controller(settings: CloudSettings) -> ControllerState:
    """Everything the API needs, built and checked (blocking: run it off the event loop)."""
    ctl = settings.controller
    ctl.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = ctl.resolved_artifact_store
    store.mkdir(parents=True, exist_ok=True)
    engine = make_engine(ctl.resolved_database_url)
    try:
        migrate(engine)
        signing_key = load_or_create_signing_key(ctl.resolved_signing_key)
        write_sessions = make_sessionmaker(engine, immediate=True)
        with session_scope(write_sessions) as session:
            bootstrap_admin(session, ctl.data_dir)
    except BaseException:
        engine.dispose()
        raise
    log.info(
        "controller registry at %s, artifact store %s, signing key %s",
        engine.url.render_as_string(hide_password=True),
        store,
        signing_key.key_id,
    )
    return ControllerState(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        write_sessions=write_sessions,
        signing_key=signing_key,
        limiter=RateLimiter(ctl.rate_limit_per_minute, ctl.rate_limit_burst),
        head_revision=head_revision(),
        artifact_store=store.resolve(),
        admin_token_file=ctl.data_dir / ADMIN_TOKEN_FILE,
    )


def create_app(settings: CloudSettings, *, services: Services | None = None) -> FastAPI:
    """The control API for ``settings``; resources are built when the app starts (lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await to_thread.run_sync(open_controller, settings)
        app.state.controller = state
        log.info("control API ready (pid %d)", os.getpid())
        try:
            yield
        finally:
            app.state.controller = None
            await to_thread.run_sync(state.engine.dispose)

    app = FastAPI(
        title="edgefed controller",
        version=__version__,
        description=API_DESCRIPTION,
        lifespan=lifespan,
    )
    metrics = HttpMetrics(CollectorRegistry(auto_describe=True))
    app.state.controller = None
    app.state.services = services if services is not None else Services()
    app.state.metrics = metrics
    install_exception_handlers(app)
    # add_middleware puts each new one outside the previous ones.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.controller.max_request_bytes)
    app.add_middleware(AuditMiddleware, prefix="/api/v1")
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    for router in ROUTERS:
        app.include_router(router)
    _document_validation_errors(app)
    return app


VALIDATION_ERROR_SCHEMA: dict[str, Any] = {
    "title": "ValidationErrorBody",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {"type": "string", "description": "What was wrong, as one sentence."},
        "errors": {
            "type": "array",
            "description": "The problems one by one (where, kind, message).",
            "items": {
                "type": "object",
                "properties": {
                    "type": {"type": "string"},
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                },
            },
        },
    },
}
"""What a 422 really looks like (see ``errors.py``): FastAPI documents a list in ``detail``."""


def _document_validation_errors(app: FastAPI) -> None:
    """Make the OpenAPI document describe 422 answers as they are sent."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            schemas = document.get("components", {}).get("schemas", {})
            if "HTTPValidationError" in schemas:
                schemas["HTTPValidationError"] = VALIDATION_ERROR_SCHEMA
                schemas.pop("ValidationError", None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
