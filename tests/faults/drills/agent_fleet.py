"""Real edge agents as processes for the request drills (rows 1, 2 and 5): a tiny signed model
pre-installed in each agent's store (restored from disk at start, no controller needed), the
agent started as ``edgefed edge run``, killed with SIGKILL and started again on the same state
directory; its executions read from its own Prometheus counter; a wiretap that records every
reply the agents publish (so an answer that happens twice is seen even when the caller has
stopped waiting for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from edgefed.common.artifact import MANIFEST_NAME, Manifest, SigningKey, verify
from edgefed.common.broker import PrivateBroker, free_port
from edgefed.common.errors import EdgefedError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.routing import Router, RouterConfig, Target
from edgefed.common.rpc import Requester
from edgefed.common.schemas import (
    DesiredModel,
    InferenceReply,
    InferenceRequest,
    decode,
)
from edgefed.common.settings import Settings, load_settings
from edgefed.common.topics import Topics
from edgefed.edge.config import AgentConfig, LocalEndpoint
from edgefed.edge.store import ModelStore
from edgefed.simulation.linkproxy import LinkProxy

MODEL = "tiny-embed"
TARGET = "x86-avx2"
EXECUTED_METRIC = "edgefed_agent_requests"
"""The agent's counter of requests it ran (``_total``, label ``outcome``)."""


@dataclass(frozen=True)
class TinyModel:
    """A tiny BERT embedding model exported to ONNX and signed (built in a few seconds)."""

    dir: Path
    manifest: Manifest
    key: SigningKey

    def desired(self) -> DesiredModel:
        digest = hashlib.sha256((self.dir / MANIFEST_NAME).read_bytes()).hexdigest()
        return DesiredModel(
            name=MODEL,
            version=self.manifest.version,
            artifact_url=f"http://127.0.0.1:9/artifacts/{MODEL}/v1/{TARGET}",
            manifest_sha256=digest,
            providers=["CPUExecutionProvider"],
        )


_BUILT: list[TinyModel] = []
_CACHE_VERSION = 1
"""Bump when :func:`build_tiny_model` changes: a cached build of another version is not used."""


def tiny_model() -> TinyModel:
    """The tiny model, shared by every drill: built once into the system's temporary folder
    (torch's export takes half a minute on a loaded 2-core machine) and re-verified, with its
    signing key, by later processes."""
    if not _BUILT:
        cache = Path(tempfile.gettempdir()) / f"edgefed-drill-model-v{_CACHE_VERSION}-{os.getuid()}"
        # One builder at a time (test workers start together): a second one would replace the
        # first one's model under its feet, signed with a key the first one's agents distrust.
        with (cache.parent / f"{cache.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _BUILT.append(_cached(cache) or _build_into(cache))
    return _BUILT[0]


def _cached(cache: Path) -> TinyModel | None:
    try:
        key = SigningKey.load(cache / "signing.pem")
        manifest = verify(cache / "tiny-onnx", key.verify_key)
    except (OSError, EdgefedError):
        return None
    return TinyModel(cache / "tiny-onnx", manifest, key)


def _build_into(cache: Path) -> TinyModel:
    """Build in a private folder, then rename it into place (another process may win)."""
    staging = Path(tempfile.mkdtemp(prefix=f"{cache.name}-", dir=cache.parent))
    built = build_tiny_model(staging)
    built.key.save(staging / "signing.pem")
    with contextlib.suppress(OSError):
        if cache.exists():
            shutil.rmtree(cache)  # an unusable leftover
        staging.rename(cache)
        return TinyModel(cache / "tiny-onnx", built.manifest, built.key)
    return built


def build_tiny_model(root: Path) -> TinyModel:
    """Export and sign the tiny model under ``root`` (imports torch: tests only)."""
    import torch
    from transformers import BertConfig, BertModel

    from edgefed.cloud.compress.export import export_onnx
    from edgefed.cloud.compress.publish import graph_specs
    from edgefed.common.artifact import generate_signing_key, write_artifact
    from tests.compress.tiny_hf import tokenizer

    tok = tokenizer()
    torch.manual_seed(0)
    config = BertConfig(  # type: ignore[no-untyped-call]
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model = BertModel(config).eval()  # type: ignore[no-untyped-call]
    hf = root / "tiny-hf"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    art = root / "tiny-onnx"
    export_onnx(hf, art, "feature-extraction")
    inputs, outputs, opset = graph_specs(art / "model.onnx")
    key = generate_signing_key()
    manifest = write_artifact(
        art,
        name=MODEL,
        version=1,
        task="feature-extraction",
        target=TARGET,
        signing_key=key,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
    )
    return TinyModel(art, manifest, key)


def drill_settings(broker_url: str, fleet: str) -> Settings:
    """Settings of the drill's own clients: short timeouts and reconnect backoff."""
    return load_settings(
        broker_url=broker_url,
        fleet=fleet,
        mqtt={
            "connect_timeout_s": 5.0,
            "publish_timeout_s": 5.0,
            "subscribe_timeout_s": 5.0,
            "request_timeout_s": 5.0,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "keepalive_s": 5,
        },
    )


@dataclass
class AgentProcess:
    """One ``edgefed edge run`` process with the tiny model installed in its store."""

    agent_id: str
    state_dir: Path
    metrics_port: int
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the process (e.g. ``EDGEFED_MQTT__KEEPALIVE_S``)."""

    @classmethod
    def prepare(
        cls, root: Path, agent_id: str, *, fleet: str, broker_url: str, model: TinyModel
    ) -> AgentProcess:
        state_dir = root / agent_id
        port = free_port()
        config = AgentConfig(
            agent_id=agent_id,
            fleet=fleet,
            controller_url="http://127.0.0.1:9",  # never reached: the model is installed
            broker_url=broker_url,
            trusted_keys=[model.key.verify_key.to_base64()],
            state_dir=state_dir,
            providers=["CPUExecutionProvider"],
            local_endpoint=LocalEndpoint(enabled=False),
            heartbeat_s=0.5,
            metrics_port=port,
        )
        config.save()
        store = ModelStore(state_dir)
        staged = store.staging_dir(MODEL, model.manifest.version)
        shutil.rmtree(staged)
        shutil.copytree(model.dir, staged)
        store.install(staged, model.manifest, model.desired())
        store.activate(MODEL, model.manifest.version)
        return cls(agent_id, state_dir, port)

    def start(self) -> None:
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
        env["EDGEFED_MQTT__BACKOFF_MAX_S"] = "0.5"
        env["EDGEFED_MQTT__BACKOFF_INITIAL_S"] = "0.05"
        env["EDGEFED_LOG_FORMAT"] = "plain"
        env.update(self.env)
        log = (self.state_dir.parent / f"{self.agent_id}-{self.starts}.log").open("ab")
        command = [sys.executable, "-m", "edgefed.cli", "edge", "run", "--state-dir"]
        self.proc = subprocess.Popen(
            [*command, str(self.state_dir)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def kill(self) -> None:
        """SIGKILL (a crash): nothing of the process runs after this."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def executed_now(self) -> int:
        """Requests this life of the process ran (its ``requests_total`` counter, all
        outcomes but ``expired``: an expired request is refused, not run)."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            if family.name != EXECUTED_METRIC:
                continue
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("outcome") != "expired":
                    total += sample.value
        return int(total)


def inference(request_id: str | None = None) -> InferenceRequest:
    return InferenceRequest(model=MODEL, texts=["a fault drill"], request_id=request_id or _id())


def _id() -> str:
    return uuid.uuid4().hex


async def wait_answering(
    requester: Requester, topics: Topics, agent_id: str, *, limit_s: float = 60.0
) -> str:
    """Send probes straight to ``agent_id`` until one is answered; returns the answered probe's
    request id. Raises AssertionError after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        probe = inference(f"probe-{_id()}")
        try:
            await requester.request(
                topics.agent_infer(agent_id), probe, InferenceReply, timeout=1.0
            )
            return probe.request_id
        except EdgefedError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"agent {agent_id} did not answer within {limit_s:g} s")


@dataclass
class Wiretap:
    """Every inference reply published to one reply topic, by request id and responder."""

    answers: Counter[str] = field(default_factory=Counter)
    by_agent: Counter[str] = field(default_factory=Counter)
    replies_at: dict[str, list[float]] = field(default_factory=dict)
    log: list[tuple[float, str, str]] = field(default_factory=list)
    """(when, served by, request id) of every reply, in arrival order."""

    async def attach(self, client: MqttClient, reply_topic: str) -> None:
        await client.subscribe(reply_topic, self._on_reply)

    async def _on_reply(self, message: Message) -> None:
        try:
            reply = decode(message.payload, message.content_type, InferenceReply).message
        except EdgefedError:
            return  # error replies are answers of another kind: not executions
        self.answers[reply.request_id] += 1
        self.by_agent[reply.served_by] += 1
        now = time.monotonic()
        self.replies_at.setdefault(reply.request_id, []).append(now)
        self.log.append((now, reply.served_by, reply.request_id))

    def twice(self, ids: set[str] | None = None) -> int:
        """Requests answered more than once (among ``ids``)."""
        return sum(1 for rid, n in self.answers.items() if n > 1 and (ids is None or rid in ids))


@dataclass
class Rig:
    """A broker, agents as processes, and the cloud side of one drill: a router (with its
    requester) watching the fleet, a wiretap on the router's replies, and a control client
    that publishes desired states like the controller."""

    broker: PrivateBroker
    topics: Topics
    agents: dict[str, AgentProcess]
    model: TinyModel
    requester: Requester
    router: Router
    tap: Wiretap
    control: MqttClient
    links: dict[str, LinkProxy]
    """The uplink of each agent started with ``proxied`` (cut and restored by the drill)."""

    def installed_generation(self, agent_id: str) -> int:
        """The desired-state generation the agent recorded as applied (its installed.json)."""
        path = self.agents[agent_id].state_dir / "installed.json"
        return int(json.loads(path.read_text()).get("generation", 0))


@contextlib.asynccontextmanager
async def running_rig(
    workdir: Path,
    agent_ids: tuple[str, ...],
    *,
    router_config: RouterConfig,
    persistence: bool = False,
    proxied: tuple[str, ...] = (),
    agent_env: dict[str, str] | None = None,
) -> AsyncIterator[Rig]:
    """Start everything, wait until every agent answers, yield; stop everything (also on
    failure). Agents in ``proxied`` reach the broker through a :class:`LinkProxy`; every agent
    gets ``agent_env`` in its environment."""
    fleet = f"f{uuid.uuid4().hex[:8]}"
    topics = Topics(fleet)
    model = await asyncio.to_thread(tiny_model)
    with PrivateBroker(data_dir=workdir / "broker", persistence=persistence) as broker:
        links: dict[str, LinkProxy] = {}
        agents: dict[str, AgentProcess] = {}
        try:
            for a in agent_ids:
                url = broker.url
                if a in proxied:
                    links[a] = LinkProxy(broker.host, broker.port)
                    await links[a].start()
                    url = f"mqtt://127.0.0.1:{links[a].port}"
                agents[a] = AgentProcess.prepare(
                    workdir / "agents", a, fleet=fleet, broker_url=url, model=model
                )
                agents[a].env.update(agent_env or {})
            for agent in agents.values():
                agent.start()
            settings = drill_settings(broker.url, fleet)
            async with (
                MqttClient.from_settings(settings, client_id=f"{fleet}-router") as client,
                MqttClient.from_settings(settings, client_id=f"{fleet}-tap") as tap_client,
                MqttClient.from_settings(settings, client_id=f"{fleet}-control") as control,
            ):
                requester = Requester(client, topics)
                tap = Wiretap()
                await tap.attach(tap_client, requester.reply_topic)
                router = Router(
                    requester,
                    [Target.agent(topics, a) for a in agent_ids],
                    config=router_config,
                    rng=random.Random(7),
                )
                await router.watch(client, topics)
                for agent_id in agent_ids:
                    await wait_answering(requester, topics, agent_id)
                yield Rig(broker, topics, agents, model, requester, router, tap, control, links)
        finally:  # in threads, so that proxied agents can say goodbye through their links
            await asyncio.gather(*(asyncio.to_thread(a.stop) for a in agents.values()))
            for link in links.values():
                await link.close()
