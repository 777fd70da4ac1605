"""Who may call each route of the control API: the declarations the auth tests
(``test_auth.py``) and the fault drill of row 12 (``tests/faults/drills/row12_api_access.py``)
check every route against, with every kind of caller."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from sqlalchemy import Engine, update

from edgefed.cloud.registry.db import make_sessionmaker, session_scope
from edgefed.cloud.registry.models import Agent
from edgefed.common.schemas import DesiredModel, DesiredState

PUBLIC = "public"
OWN_ARTIFACT_OR_READER = "own-artifact-or-reader"
"""Readers, and agents whose desired state names the artifact (agent A's names the one in
:data:`PATH_VALUES`, agent B's nothing)."""
OWN_AGENT_OR_READER = "own-agent-or-reader"
"""Readers, and the agent's own token (the paths name agent A)."""

REQUIRED: dict[tuple[str, str], str] = {
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("POST", "/api/v1/agents/join"): PUBLIC,  # the join token in the body is the secret
    ("POST", "/api/v1/tokens"): "admin",
    ("GET", "/api/v1/tokens"): "admin",
    ("DELETE", "/api/v1/tokens/{token_id}"): "admin",
    ("GET", "/api/v1/audit"): "admin",
    ("POST", "/api/v1/join-tokens"): "operator",
    ("GET", "/api/v1/agents"): "reader",
    ("GET", "/api/v1/agents/{agent_id}"): OWN_AGENT_OR_READER,
    ("POST", "/api/v1/models"): "operator",
    ("GET", "/api/v1/models"): "reader",
    ("GET", "/api/v1/models/{name}"): "reader",
    ("POST", "/api/v1/models/{name}/versions"): "operator",
    ("POST", "/api/v1/jobs/compression"): "operator",
    ("GET", "/api/v1/jobs"): "reader",
    ("GET", "/api/v1/jobs/{job_id}"): "reader",
    ("POST", "/api/v1/jobs/{job_id}/cancel"): "operator",
    ("POST", "/api/v1/federation/runs"): "operator",
    ("GET", "/api/v1/federation/runs"): "reader",
    ("GET", "/api/v1/federation/runs/{run_id}"): "reader",
    ("POST", "/api/v1/federation/runs/{run_id}/stop"): "operator",
    ("GET", "/api/v1/autoscaler"): "reader",
    ("GET", "/api/v1/artifacts/{name}/v{version}/{target}/{file:path}"): OWN_ARTIFACT_OR_READER,
    ("POST", "/api/v1/deployments"): "operator",
    ("GET", "/api/v1/deployments"): "reader",
    ("GET", "/api/v1/deployments/{deployment_id}"): "reader",
    ("POST", "/api/v1/deployments/{deployment_id}/abort"): "operator",
    ("POST", "/api/v1/deployments/{deployment_id}/confirm"): "operator",
    ("GET", "/api/v1/stats/fleet"): "reader",
    ("GET", "/api/v1/stats/routing"): "reader",
    ("POST", "/api/v1/infer"): "reader",
    ("GET", "/api/v1/infer/targets"): "reader",
    ("GET", "/api/v1/split/placements"): "reader",
    # Sessions: any reader token, for its own sessions only (another token's are not found).
    ("POST", "/api/v1/sessions"): "reader",
    ("GET", "/api/v1/sessions"): "reader",
    ("GET", "/api/v1/sessions/{session_id}"): "reader",
    ("POST", "/api/v1/sessions/{session_id}/turns"): "reader",
    ("DELETE", "/api/v1/sessions/{session_id}"): "reader",
}
"""Who may call each route. A route under /api/v1 missing here is only checked for refusing
callers without a valid token (AUTHENTICATED): declare it here to check its scope."""
AUTHENTICATED = "authenticated"

RANK = {"reader": 1, "operator": 2, "admin": 3}
INVALID_KINDS = ("none", "garbage", "revoked", "expired")
KINDS = (*INVALID_KINDS, "reader", "operator", "admin", "agent-A", "agent-B")


def app_routes(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path template) the app answers (HEAD aside)."""
    out = []
    for ctx in iter_route_contexts(app.routes):
        for method in sorted(ctx.methods or ()):
            if method != "HEAD" and ctx.path is not None:
                out.append((method, ctx.path))
    return out


def allowed(requirement: str, kind: str) -> bool | None:
    """Whether ``kind`` may call a route needing ``requirement`` (None: not declared)."""
    if requirement == PUBLIC:
        return True
    if kind in INVALID_KINDS:
        return False
    if requirement == AUTHENTICATED:
        return None
    if kind.startswith("agent-"):
        return kind == "agent-A" and requirement in (OWN_ARTIFACT_OR_READER, OWN_AGENT_OR_READER)
    need = "reader" if requirement in (OWN_ARTIFACT_OR_READER, OWN_AGENT_OR_READER) else requirement
    return RANK[kind] >= RANK[need]


def fill(template: str, values: Mapping[str, str]) -> str:
    """A concrete path of a route template (``{name}`` and ``{file:path}`` replaced)."""
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: values[m.group(1)], template)


Artifact = tuple[str, int, str]
"""(name, version, target)."""


ARTIFACT: Artifact = ("nomodel", 1, "x86-avx2")
"""The artifact the route matrix asks for (never published: a caller let through gets 404)."""


def desired_state_naming(agent_id: str, *artifacts: Artifact) -> dict[str, Any]:
    """A stored desired state (``Agent.desired_state``) naming ``artifacts``, as the rollout
    engine records it before publishing."""
    models = [
        DesiredModel(
            name=name,
            version=version,
            artifact_url=f"http://controller.invalid/api/v1/artifacts/{name}/v{version}/{target}",
            manifest_sha256="0" * 64,
        )
        for name, version, target in artifacts
    ]
    return DesiredState(agent_id=agent_id, generation=1, models=models).model_dump(mode="json")


def assign_artifacts(engine: Engine, agent_id: str, *artifacts: Artifact) -> None:
    """Record a desired state naming ``artifacts`` for ``agent_id`` in the registry (what a
    deployment does first), without a rollout: the download route only reads the registry."""
    with session_scope(make_sessionmaker(engine, immediate=True)) as session:
        session.execute(
            update(Agent)
            .where(Agent.id == agent_id)
            .values(desired_state=desired_state_naming(agent_id, *artifacts), desired_generation=1)
        )
