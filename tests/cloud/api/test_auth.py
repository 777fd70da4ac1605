"""Bearer tokens and scopes of the control API, over every route the app serves."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from edgefed.cloud.api.state import ControllerState
from edgefed.cloud.registry.db import make_sessionmaker, session_scope
from edgefed.cloud.registry.models import ApiToken
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
from tests.cloud.api.conftest import Api, bearer, start_api


def expire(api: Api, token_id: int) -> None:
    state = api.app.state.controller
    assert isinstance(state, ControllerState)
    with session_scope(make_sessionmaker(state.engine)) as session:
        session.execute(
            update(ApiToken)
            .where(ApiToken.id == token_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )


def test_every_route_against_every_kind_of_token(api: Api) -> None:
    agent_a, token_a = api.enrol("a")
    _agent_b, token_b = api.enrol("b")
    state = api.app.state.controller
    assert isinstance(state, ControllerState)
    assign_artifacts(state.engine, agent_a, ARTIFACT)
    revoked_id, revoked = api.token("admin", name="to-revoke")
    assert api.client.delete(f"/api/v1/tokens/{revoked_id}", headers=api.admin).status_code == 200
    expired_id, expired = api.token("admin", name="to-expire")
    expire(api, expired_id)
    tokens: dict[str, str | None] = {
        "none": None,
        "garbage": "not-a-token-at-all",
        "revoked": revoked,
        "expired": expired,
        "reader": api.token("reader")[1],
        "operator": api.token("operator")[1],
        "admin": api.admin_token,
        "agent-A": token_a,
        "agent-B": token_b,
    }
    values = {
        "token_id": "2147483000",
        "agent_id": agent_a,
        "name": "nomodel",
        "version": "1",
        "target": "x86-avx2",
        "file": "manifest.json",
        "job_id": "2147483000",
        "deployment_id": "2147483000",
        "run_id": "2147483000",
        "session_id": "f" * 32,
    }
    routes = app_routes(api.app)
    assert set(REQUIRED) <= set(routes), "REQUIRED names routes the app does not serve"
    undeclared = [r for r in routes if r not in REQUIRED]
    assert undeclared == [], "declare who may call each new route in REQUIRED"
    problems = []
    for method, template in routes:
        requirement = REQUIRED.get((method, template), AUTHENTICATED)
        path = fill(template, values)
        for kind in KINDS:
            token = tokens[kind]
            headers = bearer(token) if token is not None else {}
            r = api.client.request(
                method, path, headers=headers, json={} if method in ("POST", "PUT") else None
            )
            ok = allowed(requirement, kind)
            where = f"{kind} {method} {path}: {r.status_code}"
            if ok is True and r.status_code in (401, 403):
                problems.append(f"{where} {r.text[:120]}")
            elif ok is False:
                expected = 401 if kind in INVALID_KINDS else 403
                challenge = r.headers.get("www-authenticate")
                if r.status_code != expected:
                    problems.append(f"{where}, not {expected}")
                elif expected == 401 and challenge != 'Bearer realm="edgefed"':
                    problems.append(f"{where} without WWW-Authenticate")
                elif not r.json().get("detail"):
                    problems.append(f"{where} without detail")
            if r.status_code >= 500:
                problems.append(where)
    assert problems == []


def test_agent_token_reaches_only_its_own_agent(api: Api) -> None:
    agent_a, token_a = api.enrol("host-a", site="lab")
    agent_b, token_b = api.enrol("host-b")
    r = api.client.get(f"/api/v1/agents/{agent_a}", headers=bearer(token_a))
    assert r.status_code == 200
    assert r.json()["id"] == agent_a
    assert r.json()["hostname"] == "host-a"
    r = api.client.get(f"/api/v1/agents/{agent_b}", headers=bearer(token_a))
    assert r.status_code == 403
    assert agent_a in r.json()["detail"]
    assert api.client.get("/api/v1/agents", headers=bearer(token_b)).status_code == 403
    # An admin sees both.
    listed = api.client.get("/api/v1/agents", headers=api.admin).json()
    assert {a["id"] for a in listed} == {agent_a, agent_b}


def test_tokens_are_created_listed_revoked_by_admins_only(api: Api) -> None:
    _, operator = api.token("operator", name="ops")
    r = api.client.post(
        "/api/v1/tokens", json={"name": "x", "scopes": ["admin"]}, headers=bearer(operator)
    )
    assert r.status_code == 403
    assert "admin" in r.json()["detail"]

    r = api.client.post(
        "/api/v1/tokens",
        json={"name": "reader-1", "scopes": ["reader"], "expires_in_s": 3600},
        headers=api.admin,
    )
    assert r.status_code == 201
    created = r.json()
    secret, token_id = created["token"], created["id"]
    assert created["scopes"] == ["reader"]
    assert created["expires_at"] is not None
    assert api.client.get("/api/v1/models", headers=bearer(secret)).status_code == 200

    listed = api.client.get("/api/v1/tokens", headers=api.admin).json()
    assert any(t["id"] == token_id and t["name"] == "reader-1" for t in listed)
    assert all("token" not in t and "token_hash" not in t for t in listed)

    r = api.client.delete(f"/api/v1/tokens/{token_id}", headers=bearer(operator))
    assert r.status_code == 403
    r = api.client.delete(f"/api/v1/tokens/{token_id}", headers=api.admin)
    assert r.status_code == 200
    assert r.json()["revoked_at"] is not None
    again = api.client.delete(f"/api/v1/tokens/{token_id}", headers=api.admin)
    assert again.status_code == 200
    assert again.json()["revoked_at"] == r.json()["revoked_at"]
    r = api.client.get("/api/v1/models", headers=bearer(secret))
    assert r.status_code == 401
    assert "revoked" in r.json()["detail"]
    assert api.client.delete("/api/v1/tokens/99999", headers=api.admin).status_code == 404


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"name": "x", "scopes": ["agent"]}, "agent_id"),
        ({"name": "x", "scopes": ["agent", "reader"], "agent_id": "a"}, "cannot be combined"),
        ({"name": "x", "scopes": ["reader"], "agent_id": "a"}, "only for tokens"),
        ({"name": "x", "scopes": ["root"]}, "scopes.0"),
        ({"name": "x", "scopes": []}, "scopes"),
        ({"name": "x\n", "scopes": ["reader"]}, "control characters"),
        ({"name": "x", "scopes": ["agent"], "agent_id": "nobody"}, "no agent 'nobody'"),
    ],
)
def test_bad_token_requests_are_refused_and_create_nothing(
    api: Api, body: dict[str, object], problem: str
) -> None:
    before = api.client.get("/api/v1/tokens", headers=api.admin).json()
    r = api.client.post("/api/v1/tokens", json=body, headers=api.admin)
    assert r.status_code in (404, 422)
    assert problem in r.json()["detail"]
    assert api.client.get("/api/v1/tokens", headers=api.admin).json() == before


def _db_bytes(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("controller.db*")))


def test_tokens_are_stored_hashed_never_in_clear(api: Api) -> None:
    secrets = [api.admin_token, api.token("reader")[1], api.token("admin")[1]]
    _, agent_token = api.enrol("h")
    join_secret = api.join_token()
    secrets += [agent_token, join_secret]
    data_dir = api.settings.controller.data_dir
    stored = _db_bytes(data_dir)
    assert len(stored) > 0
    for secret in secrets:
        assert secret.encode() not in stored
    # ... and not in the audit log either (it is in the same file, but say it plainly).
    audit = api.client.get("/api/v1/audit", headers=api.admin).text
    for secret in secrets:
        assert secret not in audit


def test_bootstrap_admin_token_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "ctl"
    for started in start_api(data_dir):
        token_file = data_dir / "admin.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        first = token_file.read_text().strip()
        assert first == started.admin_token
        assert started.client.get("/api/v1/tokens", headers=started.admin).status_code == 200
        _, second_admin = started.token("admin", name="mine")

    # An admin exists: a restart writes no new token, even when the file is gone.
    token_file.unlink()
    for started in start_api(data_dir):
        assert not token_file.exists()
        # Revoke every admin token: the next start bootstraps a new one.
        tokens = started.client.get("/api/v1/tokens", headers=bearer(second_admin)).json()
        for t in tokens:
            if "admin" in t["scopes"] and t["name"] != "mine":
                started.client.delete(f"/api/v1/tokens/{t['id']}", headers=bearer(second_admin))
        mine = next(t for t in tokens if t["name"] == "mine")
        started.client.delete(f"/api/v1/tokens/{mine['id']}", headers=bearer(second_admin))
    for started in start_api(data_dir):
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert started.admin_token != first
        assert started.client.get("/api/v1/tokens", headers=started.admin).status_code == 200
        old = started.client.get("/api/v1/tokens", headers=bearer(first))
        assert old.status_code == 401
    assert not [p for p in os.listdir(data_dir) if p.endswith(".tmp")]
