"""A real fleet for end-to-end tests of the controller: ``edgefed cloud serve`` and
``edgefed edge run`` as processes, the test session's mosquitto, tiny models exported to ONNX
and signed with the controller's own key.

Artifacts are published into the controller's store the way ``edgefed compress --out STORE``
publishes them (``NAME/vN/TARGET``) and registered through the API. Kinds:

* ``good``: the tiny embedding model;
* ``broken``: a signed artifact whose ONNX file is not a model (verifies, fails to load);
* ``erroring``: a model exported with 16 positions whose ``config.json`` claims 128 -- it loads
  and passes its warm-up (a 4-token text) but fails every request longer than 16 tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import torch
from transformers import BertConfig, BertModel

from edgefed.cloud.compress.export import export_onnx
from edgefed.cloud.compress.publish import graph_specs
from edgefed.common.artifact import SigningKey, write_artifact
from edgefed.common.errors import EdgefedError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import DesiredState, InferenceReply, InferenceRequest, decode
from edgefed.common.topics import Topics
from edgefed.edge.config import AgentConfig
from edgefed.edge.join import join
from tests.compress.tiny_hf import tokenizer
from tests.conftest import fast_settings

MODEL = "tiny-embed"
TARGET = "x86-avx2"
Kind = Literal["good", "broken", "erroring"]


def build_sources(root: Path) -> dict[Kind, Path]:
    """Exported (unsigned) ONNX folders of each kind, and the teacher's HF folder."""
    tok = tokenizer()
    out: dict[Kind, Path] = {}
    for kind, positions in (("good", 128), ("erroring", 16)):
        torch.manual_seed(0)
        model = BertModel(
            BertConfig(
                vocab_size=tok.vocab_size,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=positions,
            )
        ).eval()
        hf = root / f"{kind}-hf"
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
        onnx_dir = root / f"{kind}-onnx"
        export_onnx(hf, onnx_dir, "feature-extraction")
        out[kind] = onnx_dir  # type: ignore[index]
    config = json.loads((out["erroring"] / "config.json").read_text())
    config["max_position_embeddings"] = 128  # the lie that makes every longer request fail
    (out["erroring"] / "config.json").write_text(json.dumps(config))
    broken = root / "broken-onnx"
    shutil.copytree(out["good"], broken)
    (broken / "model.onnx").write_bytes(b"\x08\x07this is not an ONNX graph" * 64)
    out["broken"] = broken
    return out


def publish(store: Path, source: Path, version: int, key: SigningKey) -> Path:
    dest = store / MODEL / f"v{version}" / TARGET
    shutil.copytree(source, dest)
    good_graph = source.parent / "good-onnx" / "model.onnx"
    inputs, outputs, opset = graph_specs(
        dest / "model.onnx" if source.name != "broken-onnx" else good_graph
    )
    write_artifact(
        dest,
        name=MODEL,
        version=version,
        task="feature-extraction",
        target=TARGET,
        signing_key=key,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
    )
    return dest


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    env["EDGEFED_MQTT__BACKOFF_MAX_S"] = "0.5"
    env["EDGEFED_LOG_FORMAT"] = "plain"
    env.update(extra)
    return env


@dataclass
class ControllerProcess:
    """``edgefed cloud serve`` on a fixed port (agents keep its URL across restarts)."""

    data_dir: Path
    port: int
    broker_url: str
    fleet: str
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log = (self.data_dir.parent / f"controller-{self.starts}.log").open("wb")
        env = clean_env(
            EDGEFED_BROKER_URL=self.broker_url,
            EDGEFED_FLEET=self.fleet,
            EDGEFED_CONTROLLER__DATA_DIR=str(self.data_dir),
            EDGEFED_CONTROLLER__PORT=str(self.port),
            EDGEFED_CONTROLLER__ROLLOUT_TICK_S="0.2",
            EDGEFED_LOG_FORMAT="plain",
            EDGEFED_CONTROLLER__RATE_LIMIT_PER_MINUTE="100000",
        )
        command = [sys.executable, "-m", "edgefed.cli", "cloud", "serve"]
        self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the controller exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the controller did not become ready in 60 s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return -9


@dataclass
class AgentProcess:
    config: AgentConfig
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.config.state_dir.parent / f"{self.config.agent_id}.log").open("ab")
        command = [sys.executable, "-m", "edgefed.cli", "edge", "run", "--state-dir"]
        command.append(str(self.config.state_dir))
        self.proc = subprocess.Popen(command, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class World:
    root: Path
    controller: ControllerProcess
    key: SigningKey
    sources: dict[Kind, Path]
    agents: list[AgentProcess] = field(default_factory=list)

    @property
    def store(self) -> Path:
        return self.controller.data_dir / "artifacts"

    @property
    def admin(self) -> str:
        return (self.controller.data_dir / "admin.token").read_text().strip()

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.admin}"}
        return httpx.request(
            method, f"{self.controller.url}/api/v1{path}", headers=headers, timeout=30, **kw
        )

    def ok(self, method: str, path: str, **kw: Any) -> Any:
        response = self.api(method, path, **kw)
        assert response.status_code < 300, (
            f"{method} {path}: {response.status_code} {response.text}"
        )
        return response.json()

    def enrol(self, n: int, labels: dict[str, str]) -> None:
        for i in range(n):
            token = self.ok("POST", "/join-tokens", json={"labels": labels})["token"]
            state = self.root / f"agent{i}"
            config = join(self.controller.url, token, state)
            config = config.model_copy(
                update={"heartbeat_s": 0.5, "telemetry_s": 0.5, "metrics_port": None}
            )
            config.local_endpoint = config.local_endpoint.model_copy(update={"enabled": False})
            config.save()
            agent = AgentProcess(AgentConfig.load(state))
            agent.start()
            self.agents.append(agent)

    def next_version(self) -> int:
        folder = self.store / MODEL
        taken = [int(p.name[1:]) for p in folder.glob("v*")] if folder.exists() else []
        return max(taken, default=0) + 1

    def release(self, kind: Kind) -> int:
        """Publish an artifact of ``kind`` as the next version and register it."""
        version = self.next_version()
        publish(self.store, self.sources[kind], version, self.key)
        self.ok("POST", f"/models/{MODEL}/versions", json={"version": version})
        return version

    def deploy(self, version: int, **strategy: Any) -> int:
        body = {
            "model": MODEL,
            "version": version,
            "target": TARGET,
            "selector": {"labels": {"site": "lab"}},
            "strategy": strategy,
        }
        return int(self.ok("POST", "/deployments", json=body)["id"])

    def deployment(self, dep_id: int) -> dict[str, Any]:
        return dict(self.ok("GET", f"/deployments/{dep_id}"))

    def wait_deployment(
        self,
        dep_id: int,
        statuses: set[str],
        timeout_s: float = 90,
        during: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            dep = self.deployment(dep_id)
            if dep["status"] in statuses:
                return dep
            if time.monotonic() > deadline:
                raise AssertionError(f"deployment {dep_id} stuck: {json.dumps(dep)[:3000]}")
            if during is not None:
                during()
            time.sleep(0.2)


class Observer:
    """The test's own MQTT client, on a thread with its own event loop: it records every
    desired state published to the fleet (retained ones included) and sends inference requests
    to agents, so the tests themselves can stay synchronous."""

    def __init__(self, broker_url: str, fleet: str) -> None:
        self.settings = fast_settings(broker_url, fleet)
        self.topics = Topics(fleet)
        self.desired: list[tuple[str, int, dict[str, int]]] = []
        """(agent id, generation, {model: version}) of every desired state seen."""
        self.outcomes: list[tuple[str, int | None, str]] = []
        """(agent id, version that answered, "ok" or the error) of every request sent."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._client: MqttClient | None = None
        self._requester: Requester | None = None

    def __enter__(self) -> Observer:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._call(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        client = MqttClient.from_settings(self.settings, client_id=f"observer-{os.getpid()}")
        await client.__aenter__()
        self._client = client
        self._requester = Requester(client, self.topics)

        async def on_desired(message: Message) -> None:
            state = decode(message.payload, message.content_type, DesiredState).message
            versions = {m.name: m.version for m in state.models}
            self.desired.append((state.agent_id, state.generation, versions))

        await client.subscribe(f"{self.topics.prefix}/agents/+/desired", on_desired)

    def versions_sent(self, version: int) -> set[str]:
        """Agents that were ever told to run ``version`` of the model."""
        return {agent for agent, _, models in self.desired if models.get(MODEL) == version}

    def infer(self, agent_id: str, text: str = "hello edge") -> tuple[int | None, str]:
        """One request to ``agent_id``: (version that answered, "ok") or (None, error)."""
        assert self._requester is not None
        requester = self._requester

        async def go() -> tuple[int | None, str]:
            try:
                reply = await requester.request(
                    self.topics.agent_infer(agent_id),
                    InferenceRequest(model=MODEL, texts=[text]),
                    InferenceReply,
                    timeout=10,
                )
            except EdgefedError as exc:
                return None, f"{type(exc).__name__}: {exc.message}"
            return reply.message.version, "ok"

        version, outcome = self._call(go())
        self.outcomes.append((agent_id, version, outcome))
        return version, outcome

    def serving_pool(self, pool: str, timeout_s: float = 60) -> str:
        """The worker of ``pool`` that answers a request sent to the pool's topic (waits)."""
        assert self._requester is not None
        requester = self._requester

        async def go() -> str:
            reply = await requester.request(
                self.topics.worker_infer(pool),
                InferenceRequest(model=MODEL, texts=["ping"]),
                InferenceReply,
                timeout=1,
            )
            return reply.message.served_by

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return str(self._call(go()))
            except EdgefedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def serving(self, agent_id: str, wanted: int | None = None, timeout_s: float = 60) -> int:
        """The version ``agent_id`` answers with: ``wanted`` once it does (waits for it, as
        an agent loads a new version a moment after it is told to), or any version."""
        deadline = time.monotonic() + timeout_s
        while True:
            version, outcome = self.infer(agent_id)
            if version is not None and (wanted is None or version == wanted):
                return version
            if time.monotonic() > deadline:
                raise AssertionError(f"{agent_id} answered {version} ({outcome}), not {wanted}")
            time.sleep(0.2)
