"""Who may call each route of the control API: the declarations the auth tests
(``test_auth.py``) and the fault drill of row 12 (``tests/faults/drills/row12_api_access.py``)
check every route against, with every kind of caller."""

from __future__ import annotations

import re
from collections.abc import Mapping

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

PUBLIC = "public"
AGENT_OR_READER = "agent-or-reader"
OWN_AGENT_OR_READER = "own-agent-or-reader"

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
    ("GET", "/api/v1/artifacts/{name}/v{version}/{target}/{file:path}"): AGENT_OR_READER,
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
        return requirement == AGENT_OR_READER or (
            requirement == OWN_AGENT_OR_READER and kind == "agent-A"
        )
    need = "reader" if requirement in (AGENT_OR_READER, OWN_AGENT_OR_READER) else requirement
    return RANK[kind] >= RANK[need]


def fill(template: str, values: Mapping[str, str]) -> str:
    """A concrete path of a route template (``{name}`` and ``{file:path}`` replaced)."""
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: values[m.group(1)], template)
