"""/healthz, /readyz and /metrics of the control API."""

from __future__ import annotations

import re
from pathlib import Path

from alembic import command
from fastapi.testclient import TestClient

from edgefed.cloud.api.app import create_app
from edgefed.cloud.api.state import ControllerState
from edgefed.cloud.registry.db import alembic_config, migrate
from tests.cloud.api.conftest import Api, controller_settings


def test_not_ready_until_started_but_alive(tmp_path: Path) -> None:
    app = create_app(controller_settings(tmp_path / "ctl"))
    client = TestClient(app)  # no context manager: the lifespan has not run
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503
    assert "starting" in r.json()["detail"]
    assert not (tmp_path / "ctl").exists()  # nothing happens before start-up


def test_ready_only_while_the_database_is_at_head(api: Api) -> None:
    r = api.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ready"
    assert r.json()["checks"]["migrations"].startswith("at head")
    state = api.app.state.controller
    assert isinstance(state, ControllerState)
    # Someone rolls the schema back under the running controller: not ready, and why.
    with state.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    r = api.client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["status"] == "unavailable"
    assert r.json()["checks"]["migrations"] == f"at None, head is {state.head_revision}"
    assert api.client.get("/healthz").status_code == 200
    migrate(state.engine)
    assert api.client.get("/readyz").status_code == 200


def _sample(text: str, method: str, route: str, status: int) -> float:
    pattern = (
        r"^edgefed_http_requests_total\{"
        + rf'method="{method}",route="{re.escape(route)}",status="{status}"'
        + r"\} ([0-9.e+]+)$"
    )
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_requests_by_route_template(api: Api) -> None:
    for _ in range(3):
        assert api.client.get("/api/v1/models", headers=api.admin).status_code == 200
    assert api.client.get("/api/v1/models/nope", headers=api.admin).status_code == 404
    assert api.client.get("/api/v1/models").status_code == 401
    assert api.client.get("/no/such/path").status_code == 404
    r = api.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE edgefed_http_requests_total counter" in text
    assert _sample(text, "GET", "/api/v1/models", 200) == 3
    assert _sample(text, "GET", "/api/v1/models", 401) == 1
    assert _sample(text, "GET", "/api/v1/models/{name}", 404) == 1
    assert _sample(text, "GET", "unmatched", 404) == 1
    assert "edgefed_http_request_duration_seconds_bucket" in text
    # Raw paths never become labels (bounded cardinality).
    assert "/api/v1/models/nope" not in text
