"""Liveness, readiness and Prometheus metrics (no token needed)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from edgefed.cloud.api.deps import ServicesDep, StateDep
from edgefed.cloud.api.metrics import HttpMetrics
from edgefed.cloud.api.schemas import Health
from edgefed.cloud.registry.db import current_revision

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is alive (says nothing about its database or broker)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(state: StateDep, services: ServicesDep) -> JSONResponse:
    """Ready to serve: the database answers and is migrated to this version's head, and the
    MQTT link is up (when a fleet view runs)."""
    checks: dict[str, str] = {}
    ok = True
    try:
        revision = current_revision(state.engine)
        checks["database"] = "ok"
        if revision == state.head_revision:
            checks["migrations"] = f"at head ({revision})"
        else:
            ok = False
            checks["migrations"] = f"at {revision}, head is {state.head_revision}"
    except SQLAlchemyError as exc:  # any database failure means "not ready", with the reason
        ok = False
        checks["database"] = f"unreachable: {type(exc).__name__}"
    if services.fleet is not None:
        try:
            connected = services.fleet.connected()
        except Exception as exc:
            log.warning("the fleet view failed to say whether it is connected", exc_info=True)
            connected = False
            checks["broker"] = f"error: {type(exc).__name__}"
        else:
            checks["broker"] = "connected" if connected else "disconnected"
        ok = ok and connected
    body = Health(status="ready" if ok else "unavailable", checks=checks)
    return JSONResponse(status_code=200 if ok else 503, content=body.model_dump())


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus metrics of the control API (text exposition format)."""
    collectors: HttpMetrics = request.app.state.metrics
    return Response(generate_latest(collectors.registry), media_type=CONTENT_TYPE_LATEST)
