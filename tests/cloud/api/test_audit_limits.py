"""The audit log of mutating calls, the per-token rate limit and the request body limit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefed.cloud.api.app import create_app
from tests.cloud.api.conftest import Api, ServedApp, bearer, controller_settings


def audit_records(api: Api, **params: Any) -> list[dict[str, Any]]:
    r = api.client.get("/api/v1/audit", headers=api.admin, params={"limit": 1000, **params})
    assert r.status_code == 200
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def teacher_dir(tmp_path: Path) -> str:
    folder = tmp_path / "teacher"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return str(folder)


def test_every_mutating_call_is_audited_whatever_its_outcome(api: Api, tmp_path: Path) -> None:
    reader_id, reader = api.token("reader", name="rd")
    good = {"name": "m1", "task": "feature-extraction", "teacher_dir": teacher_dir(tmp_path)}
    calls = [
        (None, "POST", "/api/v1/models", good, 401),
        ("garbage", "POST", "/api/v1/models", good, 401),
        (reader, "POST", "/api/v1/models", good, 403),
        (api.admin_token, "POST", "/api/v1/models", {"name": "m1"}, 422),
        (api.admin_token, "POST", "/api/v1/models", good, 201),
        (api.admin_token, "POST", "/api/v1/models", good, 409),
        (api.admin_token, "DELETE", f"/api/v1/tokens/{reader_id}", None, 200),
        (None, "POST", "/api/v1/agents/join", {"token": "wrong"}, 401),
    ]
    before = {r["id"] for r in audit_records(api)}
    for token, method, path, body, expected in calls:
        headers = bearer(token) if token else {}
        r = api.client.request(method, path, json=body, headers=headers)
        assert r.status_code == expected, (method, path, r.text)
    # Reads are not audited.
    api.client.get("/api/v1/models", headers=api.admin)

    new = [r for r in reversed(audit_records(api)) if r["id"] not in before]
    assert [(r["action"], r["outcome"]) for r in new] == [
        (f"{method} {path}", expected) for _, method, path, _, expected in calls
    ]
    anonymous, garbage, refused, invalid, created, duplicate, revoked, bad_join = new
    assert anonymous["actor"] == "anonymous"
    assert "bearer token is required" in (anonymous["detail"]["error"])
    assert garbage["actor"] == "anonymous"
    assert "unknown bearer token" in garbage["detail"]["error"]
    assert refused["actor"] == f"rd#{reader_id}"
    assert "operator" in refused["detail"]["error"]
    assert invalid["actor"] == "bootstrap-admin#1"
    assert "task" in invalid["detail"]["error"]
    assert created["resource"] == "model:m1"
    assert "error" not in created["detail"]
    assert duplicate["outcome"] == 409
    assert "exists" in duplicate["detail"]["error"]
    assert revoked["resource"] == f"token:{reader_id}"
    assert bad_join["actor"] == "anonymous"
    for record in new:
        assert record["ts"].endswith("Z")
        assert record["detail"]["client"] == "testclient"

    # Filtering by actor, paging, admin only.
    mine = audit_records(api, actor="bootstrap-admin#1")
    assert mine
    assert all(r["actor"] == "bootstrap-admin#1" for r in mine)
    page = api.client.get("/api/v1/audit", headers=api.admin, params={"limit": 2}).json()
    assert len(page["items"]) == 2
    assert page["total"] >= len(new)
    _, operator = api.token("operator")
    assert api.client.get("/api/v1/audit", headers=bearer(operator)).status_code == 403


def test_rate_limit_per_token(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path / "ctl", rate_limit_per_minute=5)
    with ServedApp(create_app(settings)) as server:
        admin = (tmp_path / "ctl" / "admin.token").read_text().strip()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            tokens = []
            for name in ("a", "b"):
                r = client.post(
                    "/api/v1/tokens",
                    json={"name": name, "scopes": ["reader"]},
                    headers=bearer(admin),
                )
                assert r.status_code == 201
                tokens.append(r.json()["token"])
            a, b = tokens
            answers = [client.get("/api/v1/models", headers=bearer(a)) for _ in range(6)]
            assert [r.status_code for r in answers[:5]] == [200] * 5
            limited = answers[5]
            assert limited.status_code == 429
            assert int(limited.headers["retry-after"]) >= 1
            assert "rate limit of 5 requests per minute" in limited.json()["detail"]
            # Another token is not affected.
            assert client.get("/api/v1/models", headers=bearer(b)).status_code == 200
            # A refused mutating call is audited as 429.
            r = client.post("/api/v1/join-tokens", json={}, headers=bearer(a))
            assert r.status_code == 429
            records = client.get(
                "/api/v1/audit", headers=bearer(admin), params={"limit": 1}
            ).json()["items"]
            assert records[0]["outcome"] == 429
            assert records[0]["action"].endswith("join-tokens")


@pytest.fixture
def small_body_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    settings = controller_settings(tmp_path / "ctl", max_request_bytes=2048)
    with ServedApp(create_app(settings)) as server:
        yield server.url, (tmp_path / "ctl" / "admin.token").read_text().strip()


def test_request_body_over_the_limit_is_413_and_writes_nothing(
    small_body_server: tuple[str, str], tmp_path: Path
) -> None:
    url, admin = small_body_server
    body = json.dumps(
        {
            "name": "big",
            "task": "feature-extraction",
            "teacher_dir": teacher_dir(tmp_path) + "/" + "x" * 3000,
        }
    ).encode()
    assert len(body) > 2048

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 500):
            yield body[start : start + 500]

    with httpx.Client(base_url=url, headers=bearer(admin), timeout=30) as client:
        headers = {"content-type": "application/json"}
        declared = client.post("/api/v1/models", content=body, headers=headers)
        assert declared.status_code == 413
        assert "limit of 2048 bytes" in declared.json()["detail"]
        streamed = client.post("/api/v1/models", content=chunks(), headers=headers)
        assert streamed.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in streamed.request.headers
        assert streamed.status_code == 413
        assert "limit of 2048 bytes" in streamed.json()["detail"]
        assert client.get("/api/v1/models").json() == []
        records = client.get("/api/v1/audit", params={"limit": 2}).json()["items"]
        assert [r["outcome"] for r in records] == [413, 413]
        # Under the limit the same route works.
        ok = client.post(
            "/api/v1/models",
            json={
                "name": "small",
                "task": "feature-extraction",
                "teacher_dir": teacher_dir(tmp_path),
            },
        )
        assert ok.status_code == 201


def test_calls_with_invalid_tokens_are_rate_limited_per_address(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path / "ctl", rate_limit_per_minute=5)
    with (
        ServedApp(create_app(settings)) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        answers = [client.get("/api/v1/models", headers=bearer(f"guess-{i}")) for i in range(8)]
        answers.append(client.get("/api/v1/models"))  # no token at all: the same budget
    codes = [a.status_code for a in answers]
    assert codes[:5] == [401] * 5
    assert set(codes[5:]) == {429}
    assert int(answers[-1].headers["Retry-After"]) >= 1
