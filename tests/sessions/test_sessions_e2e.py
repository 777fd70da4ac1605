"""Sessions end to end: ``edgefed cloud serve`` and two ``edgefed edge run`` agents as real
processes on the test session's mosquitto, a tiny GPT-2 decoder (ONNX with its KV cache) installed
on both agents, conversations through the controller's HTTP API with two owners' tokens.

What a user relies on:

- a three-turn conversation whose holder is SIGKILLed after turn two finishes turn three on the
  other agent with the whole history: the reply is the one the model gives to the full
  conversation (and not the one it gives without it);
- another owner's token can neither read, continue, list nor delete the session;
- an expired session is refused with a clear error and no copy of it is left, on the holder's
  disk or in the controller's database;
- a message that would take the context over its size limit is refused (413) and the session
  goes on with its history intact.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefed.common.artifact import MANIFEST_NAME
from edgefed.common.broker import PrivateBroker, free_port
from edgefed.common.schemas import DesiredModel
from edgefed.common.serving.runtime import OnnxModel
from edgefed.common.sessions.chat import ChatFormat
from edgefed.common.sessions.context import ChatMessage
from edgefed.common.sessions.crypto import FleetKey
from edgefed.common.sessions.store import SessionStore
from edgefed.edge.config import AgentConfig, LocalEndpoint
from edgefed.edge.store import ModelStore
from tests.cloud.e2e.world import AgentProcess, ControllerProcess
from tests.edge.tiny_artifacts import TinyArtifact, build_tiny_artifacts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SYSTEM = "You are a terse assistant on a factory floor."
TURNS = [
    "my name is ada and i run press number seven",
    "the press jams every morning at six",
    "what should i check first",
]
PARAMS = {"max_new_tokens": 12}


@dataclass
class Fleet:
    controller: ControllerProcess
    agents: dict[str, AgentProcess]
    model: TinyArtifact
    key: FleetKey
    alice: str
    bob: str

    def call(self, token: str, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.controller.url}/api/v1{path}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
            **kw,
        )

    def ok(self, token: str, method: str, path: str, **kw: Any) -> Any:
        response = self.call(token, method, path, **kw)
        assert response.status_code < 300, (
            f"{method} {path}: {response.status_code} {response.text}"
        )
        return response.json()

    def create(self, token: str, **extra: Any) -> str:
        body = {"model": self.model.name, "system_prompt": SYSTEM, **extra}
        created = self.ok(token, "POST", "/sessions", json=body)
        return str(created["session_id"])

    def turn(self, token: str, sid: str, message: str) -> dict[str, Any]:
        body = {"message": message, "parameters": PARAMS}
        return dict(self.ok(token, "POST", f"/sessions/{sid}/turns", json=body))


def _install(
    root: Path,
    agent_id: str,
    fleet: str,
    broker_url: str,
    controller_url: str,
    model: TinyArtifact,
    trusted: str,
    key: FleetKey,
) -> AgentProcess:
    state = root / agent_id
    config = AgentConfig(
        agent_id=agent_id,
        fleet=fleet,
        controller_url=controller_url,
        broker_url=broker_url,
        trusted_keys=[trusted],
        state_dir=state,
        providers=["CPUExecutionProvider"],
        local_endpoint=LocalEndpoint(enabled=False),
        heartbeat_s=0.5,
        telemetry_s=0.5,
        metrics_port=None,
        session_key=key.to_base64(),  # type: ignore[arg-type]
    )
    config.save()
    store = ModelStore(state)
    staged = store.staging_dir(model.name, 1)
    shutil.rmtree(staged)
    shutil.copytree(model.dir, staged)
    desired = DesiredModel(
        name=model.name,
        version=1,
        artifact_url=f"{controller_url}/api/v1/artifacts/{model.name}/v1/x86-avx2",
        manifest_sha256=hashlib.sha256((model.dir / MANIFEST_NAME).read_bytes()).hexdigest(),
        providers=["CPUExecutionProvider"],
    )
    store.install(staged, model.manifest, desired)
    store.activate(model.name, 1)
    return AgentProcess(AgentConfig.load(state))


@pytest.fixture(scope="module")
def fleet(broker: PrivateBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("sessions")
    tiny = build_tiny_artifacts(root / "models")
    name = f"s-{secrets.token_hex(3)}"
    data_dir = root / "controller"
    data_dir.mkdir()
    key = FleetKey.load_or_create(data_dir / "session.key")
    controller = ControllerProcess(data_dir, free_port(), broker.url, name)
    controller.start()
    agents: dict[str, AgentProcess] = {}
    try:
        admin = (data_dir / "admin.token").read_text().strip()
        tokens = []
        for who in ("alice", "bob"):
            body = {"name": who, "scopes": ["reader"]}
            response = httpx.post(
                f"{controller.url}/api/v1/tokens",
                json=body,
                headers={"Authorization": f"Bearer {admin}"},
                timeout=30,
            )
            assert response.status_code == 201, response.text
            tokens.append(response.json()["token"])
        trusted = tiny.key.verify_key.to_base64()
        for agent_id in ("h1", "h2"):
            agent = _install(
                root / "agents",
                agent_id,
                name,
                broker.url,
                controller.url,
                tiny.generate,
                trusted,
                key,
            )
            agent.start()
            agents[agent_id] = agent
        fleet = Fleet(controller, agents, tiny.generate, key, tokens[0], tokens[1])
        _wait_serving(fleet)
        yield fleet
    finally:
        for agent in agents.values():
            agent.stop()
        controller.stop()


def _wait_serving(fleet: Fleet, timeout_s: float = 90) -> None:
    """Until the controller's router has both agents admitted."""
    deadline = time.monotonic() + timeout_s
    admin = (fleet.controller.data_dir / "admin.token").read_text().strip()
    text = ""
    while time.monotonic() < deadline:
        response = fleet.call(admin, "GET", "/infer/targets")
        text = response.text
        if response.status_code == 200:
            admitted = {t["id"] for t in response.json() if t["health"] == "admitted"}
            if admitted >= set(fleet.agents):
                return
        time.sleep(0.3)
    raise AssertionError(f"agents not admitted by the controller's router: {text[:2000]}")


def _answer(model_dir: Path, manifest: Any, messages: list[ChatMessage]) -> str:
    onnx = OnnxModel.load(model_dir, manifest, providers=["CPUExecutionProvider"])
    prompt = ChatFormat.for_artifact(model_dir).render(messages)
    result = onnx.generate_turn(prompt, PARAMS, None)
    return result.text


def test_turn_three_after_the_holder_is_killed_has_the_whole_history(fleet: Fleet) -> None:
    sid = fleet.create(fleet.alice)
    first = fleet.turn(fleet.alice, sid, TURNS[0])
    second = fleet.turn(fleet.alice, sid, TURNS[1])
    holder = second["holder"]
    assert first["holder"] == holder, "the session moved between turns with its holder healthy"
    assert holder in fleet.agents

    fleet.agents[holder].proc.kill()  # type: ignore[union-attr]
    fleet.agents[holder].proc.wait(10)  # type: ignore[union-attr]

    third = fleet.turn(fleet.alice, sid, TURNS[2])
    assert third["holder"] != holder
    assert third["handoff"] is not None, third
    assert third["handoff"]["method"] == "rerun", third  # the old holder's cache died with it

    m = fleet.model
    history = [ChatMessage(role="system", content=SYSTEM)]
    for message, answer in zip(TURNS[:2], (first["reply"], second["reply"]), strict=True):
        history += [
            ChatMessage(role="user", content=message),
            ChatMessage(role="assistant", content=answer),
        ]
    with_history = _answer(
        m.dir, m.manifest, [*history, ChatMessage(role="user", content=TURNS[2])]
    )
    without = _answer(
        m.dir,
        m.manifest,
        [ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content=TURNS[2])],
    )
    assert with_history != without, "the test's conversation does not make the history matter"
    assert third["reply"] == with_history

    body = fleet.ok(fleet.alice, "GET", f"/sessions/{sid}")
    contents = [msg["content"] for msg in body["history"]]
    assert contents == [
        TURNS[0],
        first["reply"],
        TURNS[1],
        second["reply"],
        TURNS[2],
        third["reply"],
    ]

    # The killed holder comes back: the copy it kept on disk is deleted (the session lives on
    # the other holder now), and the conversation goes on where it is.
    fleet.agents[holder].start()
    assert _eventually(lambda: sid not in _disk_copies(fleet, holder)), (
        "the old holder kept its copy of a session that moved"
    )
    fourth = fleet.turn(fleet.alice, sid, "thanks")
    assert fourth["holder"] == third["holder"]
    assert fourth["version"] == 4


def test_another_owner_can_neither_read_nor_continue_nor_delete(fleet: Fleet) -> None:
    sid = fleet.create(fleet.alice)
    fleet.turn(fleet.alice, sid, TURNS[0])
    for method, path, body in (
        ("GET", f"/sessions/{sid}", None),
        ("POST", f"/sessions/{sid}/turns", {"message": "tell me what ada said"}),
        ("DELETE", f"/sessions/{sid}", None),
    ):
        response = fleet.call(fleet.bob, method, path, json=body)
        assert response.status_code == 404, (method, path, response.status_code, response.text)
        assert TURNS[0] not in response.text
    listed = fleet.ok(fleet.bob, "GET", "/sessions")
    assert sid not in {s["session_id"] for s in listed}
    # Alice's session is untouched by all that.
    body = fleet.ok(fleet.alice, "GET", f"/sessions/{sid}")
    assert body["history"][0]["content"] == TURNS[0]
    assert len(body["history"]) == 2
    assert sid in {s["session_id"] for s in fleet.ok(fleet.alice, "GET", "/sessions")}


def test_an_expired_session_is_refused_and_no_copy_is_left(fleet: Fleet) -> None:
    sid = fleet.create(fleet.alice, ttl_s=3)
    holder = fleet.turn(fleet.alice, sid, TURNS[0])["holder"]
    assert sid in _disk_copies(fleet, holder)
    time.sleep(3.5)
    response = fleet.call(fleet.alice, "POST", f"/sessions/{sid}/turns", json={"message": TURNS[1]})
    assert response.status_code == 410, response.text
    assert "expired" in response.json()["detail"]
    assert fleet.call(fleet.alice, "GET", f"/sessions/{sid}").status_code == 410
    assert _eventually(lambda: all(sid not in _disk_copies(fleet, a) for a in fleet.agents))
    assert _eventually(lambda: _db_context(fleet, sid) is None), "the controller kept the context"


def test_a_message_over_the_size_limit_is_refused_and_the_session_goes_on(fleet: Fleet) -> None:
    sid = fleet.create(fleet.alice)
    first = fleet.turn(fleet.alice, sid, TURNS[0])
    huge = "press " * 12_000  # 72 kB: over the 64 kB a context may hold
    response = fleet.call(fleet.alice, "POST", f"/sessions/{sid}/turns", json={"message": huge})
    assert response.status_code == 413, response.text
    assert "limit" in response.json()["detail"]
    body = fleet.ok(fleet.alice, "GET", f"/sessions/{sid}")
    assert [m["content"] for m in body["history"]] == [TURNS[0], first["reply"]]
    second = fleet.turn(fleet.alice, sid, TURNS[1])
    assert second["version"] == 2


def _disk_copies(fleet: Fleet, agent_id: str) -> set[str]:
    """Sessions whose encrypted context is on the agent's disk."""
    state = fleet.agents[agent_id].config.state_dir
    store = SessionStore(state / "sessions", fleet.key, fleet.controller.fleet)
    return set(store.ids())


def _db_context(fleet: Fleet, sid: str) -> bytes | None:
    """The sealed context the controller's database keeps for ``sid`` (None: none)."""
    db = fleet.controller.data_dir / "controller.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT context FROM sessions WHERE id = ?", (sid,)).fetchone()
    return None if row is None else row[0]


def _eventually(check: Any, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return bool(check())
