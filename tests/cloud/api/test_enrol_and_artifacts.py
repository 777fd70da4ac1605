"""Enrolment, models and artifact downloads against the controller served by a real uvicorn
server, with the REAL edge client code on the other side (``edgefed.edge.join.join`` and
``edgefed.edge.fetch.ArtifactFetcher``) and real signed ONNX artifacts."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import update

from edgefed.cloud.registry.db import make_engine, make_sessionmaker, session_scope
from edgefed.cloud.registry.models import JoinToken
from edgefed.common.artifact import MANIFEST_NAME, SIGNATURE_NAME, load_signing_key
from edgefed.common.settings import ArtifactSettings
from edgefed.edge.config import AgentConfig
from edgefed.edge.errors import JoinRefused
from edgefed.edge.fetch import ArtifactAccessDenied, ArtifactFetcher, ArtifactNotFound
from edgefed.edge.join import join
from tests.cloud.api.access import assign_artifacts
from tests.cloud.api.conftest import Served
from tests.edge.tiny_artifacts import TinyArtifacts, build_tiny_artifacts, resign

MODEL = "tiny-embed"
TARGET = "x86-avx2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifacts:
    return build_tiny_artifacts(tmp_path_factory.mktemp("tiny"))


def store(served: Served) -> Path:
    return served.settings.controller.resolved_artifact_store


def publish(served: Served, tiny: TinyArtifacts, version: int, *, own_key: bool = True) -> Path:
    """Publish the tiny embedder as ``MODEL`` v``version`` into the controller's store, signed
    by the controller's key (or, with ``own_key=False``, by a key agents do not trust)."""
    key = load_signing_key(served.settings.controller.resolved_signing_key) if own_key else tiny.key
    dest = store(served) / MODEL / f"v{version}" / TARGET
    resign(tiny.embed.dir, dest, key=key, version=version, name=MODEL)
    return dest


def expire_join_token(served: Served, token_id: int) -> None:
    engine = make_engine(served.settings.controller.resolved_database_url)
    try:
        with session_scope(make_sessionmaker(engine, immediate=True)) as session:
            session.execute(
                update(JoinToken)
                .where(JoinToken.id == token_id)
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def registered(served: Served, tiny: TinyArtifacts) -> dict[str, Any]:
    """``MODEL`` registered with its teacher folder, and v1 published and registered."""
    with served.client() as client:
        r = client.post(
            "/api/v1/models",
            json={
                "name": MODEL,
                "task": "feature-extraction",
                "teacher_dir": str(tiny.embed.hf_dir),
            },
        )
        assert r.status_code == 201, r.text
        publish(served, tiny, 1)
        r = client.post(f"/api/v1/models/{MODEL}/versions", json={"version": 1, "note": "first"})
        assert r.status_code == 201, r.text
        answer: dict[str, Any] = r.json()
        return answer


@pytest.fixture(scope="module")
def agent(served: Served, tmp_path_factory: pytest.TempPathFactory) -> AgentConfig:
    """An agent enrolled with the real join client, its desired state naming ``MODEL`` v1 and
    v9 (never published) for ``TARGET``: an agent token downloads only those."""
    with served.client() as client:
        r = client.post("/api/v1/join-tokens", json={"labels": {"site": "lab"}})
        assert r.status_code == 201
        token = r.json()["token"]
    config = join(
        served.url,
        token,
        tmp_path_factory.mktemp("agent-state"),
        labels={"arch": "x86_64", "site": "mine"},
        device_profile="x86-avx2",
    )
    engine = make_engine(served.settings.controller.resolved_database_url)
    try:
        assign_artifacts(engine, config.agent_id, (MODEL, 1, TARGET), (MODEL, 9, TARGET))
    finally:
        engine.dispose()
    return config


# --------------------------------------------------------------------------- enrolment


def test_join_writes_the_agents_identity(served: Served, agent: AgentConfig) -> None:
    config_file = agent.state_dir / "agent.json"
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    saved = json.loads(config_file.read_text())
    assert saved["agent_id"] == agent.agent_id
    assert agent.agent_id.startswith("agent-")
    assert saved["agent_token"]
    assert saved["fleet"] == "served"
    assert saved["broker_url"] == served.settings.broker_url
    controller_key = load_signing_key(served.settings.controller.resolved_signing_key)
    assert saved["trusted_keys"] == [controller_key.verify_key.to_base64()]
    assert AgentConfig.load(agent.state_dir).agent_id == agent.agent_id

    # The registry recorded it, with the join token's labels winning over the agent's own.
    assert agent.agent_token is not None
    token = agent.agent_token.get_secret_value()
    with served.client(token) as client:
        r = client.get(f"/api/v1/agents/{agent.agent_id}")
    assert r.status_code == 200
    row = r.json()
    assert row["labels"] == {"arch": "x86_64", "site": "lab"}
    assert row["device_profile"] == "x86-avx2"
    assert row["hostname"]


def test_a_join_token_works_once(served: Served, tmp_path: Path) -> None:
    with served.client() as client:
        token = client.post("/api/v1/join-tokens", json={}).json()["token"]
    first = join(served.url, token, tmp_path / "one")
    with pytest.raises(JoinRefused, match="already been used"):
        join(served.url, token, tmp_path / "two")
    assert not (tmp_path / "two" / "agent.json").exists()
    with served.client() as client:
        agents = client.get("/api/v1/agents").json()
    assert sum(1 for a in agents if a["id"] == first.agent_id) == 1


def test_expired_and_unknown_join_tokens_are_refused(served: Served, tmp_path: Path) -> None:
    with served.client() as client:
        before = len(client.get("/api/v1/agents").json())
        r = client.post("/api/v1/join-tokens", json={"expires_in_s": 60}).json()
    expire_join_token(served, r["id"])
    with pytest.raises(JoinRefused, match="expired"):
        join(served.url, r["token"], tmp_path / "late")
    with pytest.raises(JoinRefused, match="not valid"):
        join(served.url, "made-up-token", tmp_path / "made-up")
    with served.client() as client:
        assert len(client.get("/api/v1/agents").json()) == before


def test_join_tokens_need_an_operator(served: Served) -> None:
    with served.client() as client:
        reader = client.post("/api/v1/tokens", json={"name": "r", "scopes": ["reader"]}).json()
    with served.client(reader["token"]) as client:
        assert client.post("/api/v1/join-tokens", json={}).status_code == 403


# --------------------------------------------------------------------------- models


def test_models_versions_and_reports_are_listed(
    served: Served, registered: dict[str, Any], tiny: TinyArtifacts
) -> None:
    assert registered["version"] == 1
    assert registered["note"] == "first"
    (artifact,) = registered["artifacts"]
    assert artifact["target"] == TARGET
    assert artifact["path"] == f"{MODEL}/v1/{TARGET}"
    manifest_bytes = (store(served) / MODEL / "v1" / TARGET / MANIFEST_NAME).read_bytes()
    assert artifact["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert artifact["url"] == f"{served.url}/api/v1/artifacts/{MODEL}/v1/{TARGET}"
    with served.client() as client:
        models = client.get("/api/v1/models").json()
        (model,) = [m for m in models if m["name"] == MODEL]
        assert model["versions"] == [1]
        assert model["latest_version"] == 1
        assert model["teacher_dir"] == str(tiny.embed.hf_dir.resolve())
        detail = client.get(f"/api/v1/models/{MODEL}").json()
        (version,) = detail["version_details"]
        assert version["artifacts"][0]["size_bytes"] > 0
        assert isinstance(version["artifacts"][0]["metrics"], dict)
        assert client.get("/api/v1/models/nothing-here").status_code == 404
        # Registering the same version again is idempotent.
        again = client.post(f"/api/v1/models/{MODEL}/versions", json={"version": 1})
        assert again.status_code == 201
        assert again.json()["artifacts"] == registered["artifacts"]


@pytest.mark.parametrize(
    ("teacher", "problem"),
    [
        ("relative/dir", "must be an absolute path"),
        ("/nonexistent/teacher", "does not exist"),
        ("FILE", "is not a directory"),
        ("EMPTY", "not a Hugging Face model directory"),
    ],
)
def test_bad_teacher_dirs_are_refused_and_nothing_is_registered(
    served: Served, tmp_path: Path, teacher: str, problem: str
) -> None:
    if teacher == "FILE":
        (tmp_path / "file").write_text("x")
        teacher = str(tmp_path / "file")
    elif teacher == "EMPTY":
        teacher = str(tmp_path)
    with served.client() as client:
        r = client.post(
            "/api/v1/models",
            json={"name": "bad-teacher", "task": "feature-extraction", "teacher_dir": teacher},
        )
        assert r.status_code == 422
        assert problem in r.json()["detail"]
        assert all(m["name"] != "bad-teacher" for m in client.get("/api/v1/models").json())


def test_bad_versions_are_refused_and_nothing_is_registered(
    served: Served, registered: dict[str, Any], tiny: TinyArtifacts
) -> None:
    with served.client() as client:
        r = client.post(f"/api/v1/models/{MODEL}/versions", json={"version": 7})
        assert r.status_code == 404
        assert "no published artifact" in r.json()["detail"]
        r = client.post("/api/v1/models/unknown-model/versions", json={"version": 1})
        assert r.status_code == 404
        assert "unknown-model" in r.json()["detail"]
        # Signed by a key the agents do not trust: refused.
        publish(served, tiny, 8, own_key=False)
        r = client.post(f"/api/v1/models/{MODEL}/versions", json={"version": 8})
        assert r.status_code == 422, r.text
        assert "v8" not in json.dumps(client.get(f"/api/v1/models/{MODEL}").json()["versions"])
        assert client.get(f"/api/v1/models/{MODEL}").json()["versions"] == [1]


# --------------------------------------------------------------------------- downloads


def _agent_client(served: Served, agent: AgentConfig) -> httpx.Client:
    assert agent.agent_token is not None
    return served.client(agent.agent_token.get_secret_value())


def test_agent_downloads_files_with_ranges(
    served: Served, registered: dict[str, Any], agent: AgentConfig
) -> None:
    folder = store(served) / MODEL / "v1" / TARGET
    data = (folder / "model.onnx").read_bytes()
    base = f"/api/v1/artifacts/{MODEL}/v1/{TARGET}"
    with _agent_client(served, agent) as client:
        full = client.get(f"{base}/model.onnx")
        assert full.status_code == 200
        assert full.content == data
        assert (
            client.get(f"{base}/{MANIFEST_NAME}").content == (folder / MANIFEST_NAME).read_bytes()
        )
        assert client.get(f"{base}/{SIGNATURE_NAME}").status_code == 200
        tail = client.get(f"{base}/model.onnx", headers={"Range": "bytes=100-"})
        assert tail.status_code == 206
        assert tail.content == data[100:]
        assert tail.headers["content-range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
        part = client.get(f"{base}/model.onnx", headers={"Range": "bytes=10-19"})
        assert part.status_code == 206
        assert part.content == data[10:20]
        beyond = client.get(f"{base}/model.onnx", headers={"Range": f"bytes={len(data)}-"})
        assert beyond.status_code == 416
        assert client.get(f"{base}/missing.bin").status_code == 404
    with served.client("not-a-token") as client:
        assert client.get(f"{base}/model.onnx").status_code == 401


def _raw_get(url: str, path: str, token: str) -> int:
    """GET ``path`` exactly as written (no client-side normalisation of ``..``)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        assert b"root:" not in body
        assert b"SECRET" not in body
        return response.status
    finally:
        conn.close()


def test_path_traversal_never_leaves_the_store(
    served: Served, registered: dict[str, Any], agent: AgentConfig
) -> None:
    root = store(served)
    (root.parent / "secret.txt").write_text("SECRET outside the store")
    folder = root / MODEL / "v1" / TARGET
    link = folder / "link.bin"
    if not link.is_symlink():
        os.symlink(root.parent / "secret.txt", link)
    assert agent.agent_token is not None
    token = agent.agent_token.get_secret_value()
    base = f"/api/v1/artifacts/{MODEL}/v1/{TARGET}"
    attempts = [
        f"{base}/../../../../secret.txt",
        f"{base}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        f"{base}/..%2f..%2f..%2f..%2fsecret.txt",
        f"{base}/%2Fetc%2Fpasswd",
        f"{base}//etc/passwd",
        f"{base}/link.bin",
        f"/api/v1/artifacts/{MODEL}/v1/..%2f..%2f/secret.txt",
        f"/api/v1/artifacts/..%2f/v1/{TARGET}/manifest.json",
        f"{base}/model.onnx%00.txt",
    ]
    for path in attempts:
        status = _raw_get(served.url, path, token)
        assert status in (400, 404, 422), (path, status)


def test_the_edge_fetcher_downloads_and_verifies_from_the_controller(
    served: Served, registered: dict[str, Any], agent: AgentConfig, tmp_path: Path
) -> None:
    (artifact,) = registered["artifacts"]
    assert agent.agent_token is not None
    from edgefed.common.artifact import VerifyKey

    keys = [VerifyKey.from_base64(k) for k in agent.trusted_keys]

    async def fetch() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            fetcher = ArtifactFetcher(
                client,
                agent.agent_token.get_secret_value() if agent.agent_token else None,
                keys,
                ArtifactSettings(),
            )
            manifest = await fetcher(
                artifact["url"],
                tmp_path / "staged",
                min_version=1,
                expected_manifest_sha256=artifact["manifest_sha256"],
            )
            assert (manifest.name, manifest.version, manifest.target) == (MODEL, 1, TARGET)
            with pytest.raises(ArtifactNotFound):
                await fetcher(
                    artifact["url"].replace("/v1/", "/v9/"), tmp_path / "none", min_version=1
                )

    asyncio.run(fetch())
    folder = store(served) / MODEL / "v1" / TARGET
    assert (tmp_path / "staged" / "model.onnx").read_bytes() == (folder / "model.onnx").read_bytes()


def test_an_agent_downloads_only_what_its_desired_state_names(
    served: Served, registered: dict[str, Any], agent: AgentConfig, tmp_path: Path
) -> None:
    (artifact,) = registered["artifacts"]
    with served.client() as client:
        r = client.post("/api/v1/join-tokens", json={})
        assert r.status_code == 201
        other = join(served.url, r.json()["token"], tmp_path / "other-state")
    assert other.agent_token is not None
    token = other.agent_token.get_secret_value()
    base = f"/api/v1/artifacts/{MODEL}/v1/{TARGET}"

    async def fetch() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            fetcher = ArtifactFetcher(client, token, [], ArtifactSettings())
            with pytest.raises(ArtifactAccessDenied):
                await fetcher(artifact["url"], tmp_path / "staged", min_version=1)

    # Published, and another agent's desired state names it: still not this agent's.
    asyncio.run(fetch())
    with served.client(token) as client:
        for file in (MANIFEST_NAME, SIGNATURE_NAME, "model.onnx"):
            r = client.get(f"{base}/{file}", headers={"Range": "bytes=0-"})
            assert r.status_code == 403
            assert f"{other.agent_id}'s names no {MODEL} v1" in r.json()["detail"]
    assert not (tmp_path / "staged" / "model.onnx").exists()
    # Once its own desired state names the artifact (what a deployment records first), it may.
    engine = make_engine(served.settings.controller.resolved_database_url)
    try:
        assign_artifacts(engine, other.agent_id, (MODEL, 1, TARGET))
    finally:
        engine.dispose()
    with served.client(token) as client:
        assert client.get(f"{base}/{MANIFEST_NAME}").status_code == 200
        assert client.get(f"/api/v1/artifacts/{MODEL}/v2/{TARGET}/model.onnx").status_code == 403
    # Readers download any artifact.
    with served.client() as admin:
        r = admin.post("/api/v1/tokens", json={"name": "dl", "scopes": ["reader"]})
        assert r.status_code == 201
    with served.client(r.json()["token"]) as client:
        assert client.get(f"{base}/{MANIFEST_NAME}").status_code == 200
