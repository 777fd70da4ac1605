"""Row 12: every route of the control API called by every kind of caller that must be refused
(no token, an unknown one, a revoked one, an expired one, a token without the scope, another
agent's token), then a schemathesis run over the API's own OpenAPI schema with several callers.

The controller is ``edgefed cloud serve`` as a process (real uvicorn, real SQLite, real
mosquitto). Who may call what comes from ``tests/cloud/api/access.py`` (the declarations
``test_auth.py`` checks too): a route the app serves and that file does not declare is counted
as a problem, so a new route cannot slip past this drill unexamined.

Counted:

Agent A's desired state names the artifact the matrix downloads (recorded in the registry, as
a deployment does first); agent B downloading it, or reading agent A, is "another agent's
token".

* ``bypasses``: a caller that must be refused got anything but 401/403 (in the schemathesis
  run: a 2xx, as a generated path may match no route and be a plain 404);
* ``5xx``: any server error, in the matrix or the schemathesis run;
* ``wrong_refusals``: refused, but with the wrong code (401 for a valid token without the
  scope, 403 for an invalid one, 401 without ``WWW-Authenticate``) or without a ``detail``;
* ``false_refusals``: a caller that may call the route got 401/403.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from edgefed.cloud.api.app import create_app
from edgefed.cloud.registry.db import make_engine
from edgefed.cloud.settings import CloudSettings
from tests.cloud.api.access import (
    ARTIFACT,
    AUTHENTICATED,
    INVALID_KINDS,
    KINDS,
    REQUIRED,
    allowed,
    app_routes,
    assign_artifacts,
    fill,
)
from tests.faults.drills import DrillResult
from tests.faults.drills.api_controller import Controller, bearer, controller

ROW = 12
INJECT = (
    "every API route × {no token, unknown, revoked, expired, wrong scope, other agent's "
    "token}; schemathesis over the OpenAPI schema"
)
MUST_HOLD = "401/403 exactly where expected; never a 5xx"

MISSING_ID = "2147483000"
"""Ids in paths name nothing: an allowed caller gets 404/422, never a change."""


def _wait_expired(ctl: Controller, token: str) -> None:
    """Until the controller calls ``token`` expired (its lifetime is one second)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = ctl.call("GET", "/api/v1/models", token)
        if r.status_code == 401 and "expired" in r.json().get("detail", ""):
            return
        time.sleep(0.2)
    raise RuntimeError("a token with a 1 s lifetime did not expire in 30 s")


def _tokens(ctl: Controller) -> tuple[dict[str, str | None], dict[str, str], set[int]]:
    """Secrets per caller kind, path values, and the ids of the drill's own tokens."""
    agent_a, token_a = ctl.enrol("host-a")
    _agent_b, token_b = ctl.enrol("host-b")
    # Agent A's desired state names the artifact the matrix asks for; agent B's nothing.
    engine = make_engine(f"sqlite:///{ctl.data_dir / 'controller.db'}")
    try:
        assign_artifacts(engine, agent_a, ARTIFACT)
    finally:
        engine.dispose()
    revoked_id, revoked = ctl.token("admin", name="to-revoke")
    r = ctl.call("DELETE", f"/api/v1/tokens/{revoked_id}", ctl.admin_token)
    if r.status_code != 200:
        raise RuntimeError(f"token not revoked: {r.status_code} {r.text}")
    expired_id, expired = ctl.token("admin", name="to-expire", expires_in_s=1)
    reader_id, reader = ctl.token("reader", name="reader")
    operator_id, operator = ctl.token("operator", name="operator")
    _wait_expired(ctl, expired)
    tokens: dict[str, str | None] = {
        "none": None,
        "garbage": "not-a-token-at-all",
        "revoked": revoked,
        "expired": expired,
        "reader": reader,
        "operator": operator,
        "admin": ctl.admin_token,
        "agent-A": token_a,
        "agent-B": token_b,
    }
    values = {
        "token_id": MISSING_ID,
        "agent_id": agent_a,
        "name": ARTIFACT[0],
        "version": str(ARTIFACT[1]),
        "target": ARTIFACT[2],
        "file": "manifest.json",
        "job_id": MISSING_ID,
        "deployment_id": MISSING_ID,
        "run_id": MISSING_ID,
        "session_id": "f" * 32,
    }
    protected = {1, revoked_id, expired_id, reader_id, operator_id}
    return tokens, values, protected


def _matrix(
    ctl: Controller,
    routes: list[tuple[str, str]],
    tokens: dict[str, str | None],
    values: dict[str, str],
    problems: list[str],
) -> Counter[str]:
    counts: Counter[str] = Counter()
    with httpx.Client(base_url=ctl.url, timeout=30) as client:
        for method, template in routes:
            requirement = REQUIRED.get((method, template), AUTHENTICATED)
            if (method, template) not in REQUIRED:
                problems.append(f"undeclared route {method} {template}")
            path = fill(template, values)
            for kind in KINDS:
                counts["calls"] += 1
                try:
                    r = client.request(
                        method,
                        path,
                        headers=bearer(tokens[kind]),
                        json={} if method in ("POST", "PUT", "PATCH") else None,
                    )
                except httpx.HTTPError as exc:  # no answer at all: a server failure
                    counts["5xx"] += 1
                    problems.append(f"5xx {kind} {method} {path}: no answer, {exc!r}")
                    continue
                ok = allowed(requirement, kind)
                where = f"{kind} {method} {path}: {r.status_code}"
                if r.status_code >= 500:
                    counts["5xx"] += 1
                    problems.append(f"5xx {where}")
                if ok is True and r.status_code in (401, 403):
                    counts["false_refusals"] += 1
                    problems.append(f"refused {where} {r.text[:120]}")
                elif ok is False:
                    expected = 401 if kind in INVALID_KINDS else 403
                    if r.status_code not in (401, 403):
                        counts["bypasses"] += 1
                        problems.append(f"bypass {where}")
                    elif r.status_code != expected:
                        counts["wrong_refusals"] += 1
                        problems.append(f"{where}, not {expected}")
                    elif expected == 401 and (
                        r.headers.get("www-authenticate") != 'Bearer realm="edgefed"'
                    ):
                        counts["wrong_refusals"] += 1
                        problems.append(f"{where} without WWW-Authenticate")
                    elif not r.json().get("detail"):
                        counts["wrong_refusals"] += 1
                        problems.append(f"{where} without detail")
    return counts


def _fuzz(
    ctl: Controller,
    tokens: dict[str, str | None],
    protected: set[int],
    examples: int,
    problems: list[str],
) -> Counter[str]:
    """schemathesis cases (valid and invalid inputs) for every operation of the schema, each
    sent as the admin (reaches every handler), a reader, agent A and nobody."""
    schema = schemathesis.openapi.from_dict(create_app(CloudSettings()).openapi())
    counts: Counter[str] = Counter()
    with httpx.Client(base_url=ctl.url, timeout=30) as client:
        for result in schema.get_all_operations():
            if not isinstance(result, Ok):
                problems.append(f"an operation of the schema cannot be tested: {result!r}")
                continue
            operation = result.ok()
            requirement = REQUIRED.get((operation.method.upper(), operation.path), AUTHENTICATED)
            documented = set(operation.definition.raw.get("responses", {}))
            for case in _cases(operation, examples):
                for kind in FUZZ_CALLERS:
                    status = _send(client, case, kind, tokens, protected, counts, problems)
                    where = f"fuzz {kind} {case.method} {case.path}"
                    if status >= 500:
                        if str(status) in documented and status != 500:
                            counts["documented_5xx"] += 1  # e.g. /infer's 503: no target
                        else:
                            counts["5xx"] += 1
                            problems.append(f"5xx {where}: {status}")
                    if allowed(requirement, kind) is False and 200 <= status < 300:
                        counts["bypasses"] += 1
                        problems.append(f"bypass {where}: {status}")
    return counts


FUZZ_CALLERS = ("admin", "reader", "agent-A", "none")


def _cases(operation: Any, examples: int) -> list[schemathesis.Case[Any]]:
    """Up to ``examples`` cases of ``operation``, valid and invalid inputs mixed, the same
    ones on every run (derandomised, no example database)."""
    cases: list[schemathesis.Case[Any]] = []
    strategy = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def collect(case: schemathesis.Case[Any]) -> None:
        cases.append(case)

    collect()
    return cases


def _send(
    client: httpx.Client,
    case: schemathesis.Case[Any],
    kind: str,
    tokens: dict[str, str | None],
    protected: set[int],
    counts: Counter[str],
    problems: list[str],
) -> int:
    """Send ``case`` as ``kind``: the status (0 when no answer came, counted as a server
    error here)."""
    params = case.path_parameters or {}
    if case.method == "DELETE" and params.get("token_id") in protected:
        params["token_id"] = int(MISSING_ID)  # keep the drill's own callers
    sent = case.as_transport_kwargs(base_url=str(client.base_url).rstrip("/"))
    headers = dict(sent.get("headers") or {})
    headers.pop("Authorization", None)
    headers.update(bearer(tokens[kind]))
    body: dict[str, Any] = {}
    if "json" in sent:
        body["json"] = sent["json"]
        if isinstance(body["json"], dict) and isinstance(body["json"].get("timeout_s"), float):
            # Bounded drill: a gateway call waits at most 1 s for a target (then a 504).
            body["json"]["timeout_s"] = min(body["json"]["timeout_s"], 1.0)
    elif sent.get("data") is not None:
        data = sent["data"]
        body["content"] = data.encode() if isinstance(data, str) else data
    try:
        r = client.request(
            sent["method"], sent["url"], params=sent.get("params"), headers=headers, **body
        )
    except httpx.HTTPError as exc:  # a reset connection is a failure too
        counts["5xx"] += 1
        problems.append(f"fuzz {kind} {case.method} {case.path}: no answer, {exc!r}")
        return 0
    counts["fuzz_calls"] += 1
    return r.status_code


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    problems: list[str] = []
    with controller(workdir, rate_limit_per_minute="1000000", gateway_timeout_s="1") as ctl:
        tokens, values, protected = _tokens(ctl)
        routes = app_routes(create_app(CloudSettings()))
        matrix = _matrix(ctl, routes, tokens, values, problems)
        fuzz = _fuzz(ctl, tokens, protected, 25 if full else 3, problems)
    counts = matrix + fuzz
    figures: dict[str, int | float | str | bool] = {
        "bypasses": counts["bypasses"],
        "5xx": counts["5xx"],
        "wrong_refusals": counts["wrong_refusals"],
        "false_refusals": counts["false_refusals"],
        "documented_5xx": counts["documented_5xx"],
        "routes": len(routes),
        "matrix_calls": matrix["calls"],
        "fuzz_calls": fuzz["fuzz_calls"],
    }
    held = not problems
    notes = [
        f"{len(routes)} routes × {len(KINDS)} callers; schemathesis "
        f"{25 if full else 3} cases per operation (valid and invalid inputs), each sent by "
        f"{len(FUZZ_CALLERS)} callers; documented_5xx: answers the schema declares (/infer's "
        "503 without a live target), not counted as server errors",
        *problems[:20],
    ]
    return DrillResult(row=ROW, figures=figures, held=held, notes=notes)
