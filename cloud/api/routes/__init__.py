"""The routes of the control API, one module per resource; :data:`ROUTERS` in include order."""

from __future__ import annotations

from fastapi import APIRouter

from edgefed.cloud.api.routes import (
    agents,
    artifacts,
    audit,
    autoscaler,
    deployments,
    federation,
    health,
    infer,
    jobs,
    models,
    sessions,
    split,
    stats,
    tokens,
)

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    tokens.router,
    agents.router,
    models.router,
    jobs.router,
    artifacts.router,
    deployments.router,
    stats.router,
    audit.router,
    infer.router,
    sessions.router,
    split.router,
    federation.router,
    autoscaler.router,
)

__all__ = ["ROUTERS"]
