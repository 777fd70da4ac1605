"""The controller re-plans each agent's split placement from the link it measures and pushes a
changed plan as one desired-state change: real mosquitto, the real FleetMonitor,
DesiredStatePublisher and RolloutEngine wired as ``edgefed cloud serve`` wires them, real head and
tail artifacts of a tiny encoder signed with the controller's key, and an agent scripted over MQTT
(retained status with its device profile, heartbeats with link figures).

The planner's figures come from a fixed profile shaped like MiniLM (``planning_profiles``): these
tests are about what is published when, not about timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from edgefed.cloud.api.app import create_app
from edgefed.cloud.fleet.desired import DesiredStatePublisher
from edgefed.cloud.registry.models import Agent
from edgefed.cloud.services import Services
from edgefed.cloud.settings import SplitModelSettings, SplitSettings, load_cloud_settings
from edgefed.cloud.split import SplitPair, export_split
from edgefed.cloud.split.placements import PlacementService
from edgefed.cloud.split.publish import publish_pairs
from edgefed.common.mqtt import MqttClient
from edgefed.common.schemas import (
    AgentState,
    AgentStatus,
    DesiredState,
    Heartbeat,
    LinkFigures,
    LoadedModel,
    ResourceFigures,
)
from edgefed.common.topics import Topics
from tests.cloud.rollout import conftest as rollout
from tests.cloud.rollout.conftest import (
    TARGET,
    Cloud,
    Controller,
    DesiredSpy,
    api_client,
    desired_spy,
    eventually,
    running_controller,
)
from tests.cloud.split.planning_profiles import encoder_profile
from tests.cloud.split.tiny_split import build

pytestmark = pytest.mark.integration

cloud = rollout.cloud  # the rollout tests' controller state (registry, store, key), reused

MODEL = "tiny-bert"
AGENT = "edge-1"
# With the 4-layer MiniLM-shaped profile (cloud-cpu workers):
FAST = LinkFigures(rtt_ms=5, bandwidth_mbps=100, samples=20)
"""jetson-nano: all-cloud (34 ms) beats all-edge (338 ms) and split k=1 (119 ms)."""
SLOW = LinkFigures(rtt_ms=200, bandwidth_mbps=1, samples=20)
"""x86-nuc: all-edge (45 ms); anything over the link pays 200 ms + the bytes."""
LAN = LinkFigures(rtt_ms=1, bandwidth_mbps=1000, samples=20)
"""x86-nuc without sending raw input: split k=1 (34 ms) beats all-edge (45 ms)."""
EDGY = LinkFigures(rtt_ms=20, bandwidth_mbps=100, samples=20)
"""x86-nuc: all-edge (45.0 ms) just ahead of all-cloud (48.5 ms); 20 % less RTT flips it."""


def published(f: Any) -> list[int]:
    """Generations the spy saw, each once: the rollout engine may republish the recorded
    desired state (same generation) when an agent is slow to confirm it, which is no new plan."""
    return sorted({s.generation for s in f.spy.seen})


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> list[SplitPair]:
    """Head and tail of a tiny 4-layer encoder at k = 1 and 2 (exported once)."""
    root = tmp_path_factory.mktemp("placements")
    build("bert", root / "model")
    return [
        export_split(root / "model", root / f"k{k}", k, task="feature-extraction") for k in (1, 2)
    ]


def deploy_model(cloud: Cloud, pairs: list[SplitPair], *, profile: bool = True) -> None:
    """``tiny-bert`` v1 registered, with its split pairs (k = 1, 2) and, unless told otherwise,
    its profile published the way ``edgefed split publish`` publishes them."""
    cloud.add_model(MODEL)
    cloud.publish_version(1, MODEL)
    with cloud.sessions() as session:
        done = publish_pairs(
            pairs,
            store=cloud.store,
            session=session,
            name=MODEL,
            version=1,
            target=TARGET,
            signing_key=cloud.state.signing_key,
            profile=encoder_profile(layers=4),
        )
        session.commit()
    if not profile:
        done.profile_file.unlink()


def split_settings(**model: object) -> SplitSettings:
    return SplitSettings(enabled=True, models={MODEL: SplitModelSettings(**model)})


@dataclass
class ScriptedAgent:
    """An enrolled agent as the controller hears it: a retained status naming its device
    profile, and heartbeats carrying the link figures the test chooses."""

    client: MqttClient
    topics: Topics
    agent_id: str
    seq: int = 0

    async def status(self, device_profile: str | None) -> None:
        status = AgentStatus(
            agent_id=self.agent_id,
            state=AgentState.ONLINE,
            device_profile=device_profile,
            models=[LoadedModel(name=MODEL, version=1)],
        )
        await self.client.publish(
            self.topics.agent_status(self.agent_id), status.to_json(), qos=1, retain=True
        )

    async def beat(self, link: LinkFigures | None) -> int:
        self.seq += 1
        beat = Heartbeat(
            agent_id=self.agent_id,
            seq=self.seq,
            resources=ResourceFigures(cpu_percent=1, memory_used_bytes=1, memory_total_bytes=2),
            models=[LoadedModel(name=MODEL, version=1)],
            link=link,
        )
        await self.client.publish(self.topics.heartbeat(self.agent_id), beat.to_json(), qos=1)
        return self.seq


@dataclass
class Fleet:
    cloud: Cloud
    ctl: Controller
    service: PlacementService
    agent: ScriptedAgent
    spy: DesiredSpy

    @property
    def publisher(self) -> DesiredStatePublisher:
        return self.ctl.publisher

    def stored(self) -> DesiredState:
        with self.cloud.state.sessions() as s:
            row = s.scalars(select(Agent).where(Agent.id == AGENT)).one()
            assert row.desired_state is not None
            return DesiredState.model_validate(row.desired_state)

    async def report(self, link: LinkFigures | None) -> None:
        """Send a heartbeat and wait until the service has planned from it."""
        seq = await self.agent.beat(link)
        await eventually(lambda: (self.service.evaluated_seq(AGENT) or 0) >= seq)

    async def published_generation(self, generation: int) -> DesiredState:
        """The desired state of ``generation`` as the agent receives it over MQTT."""
        found: DesiredState = await eventually(
            lambda: next((s for s in self.spy.seen if s.generation == generation), None)
        )
        return found


@contextlib.asynccontextmanager
async def fleet(
    cloud: Cloud, settings: SplitSettings, device_profile: str | None
) -> AsyncIterator[Fleet]:
    """The controller with its placement service wired as ``cloud serve`` wires it, an agent
    running ``tiny-bert`` v1 (desired generation 1), and a spy on the desired states."""
    cloud.enrol(AGENT, site="lab")
    async with (
        running_controller(cloud) as ctl,
        desired_spy(cloud) as spy,
        MqttClient.from_settings(cloud.settings, client_id=f"agent-{uuid.uuid4().hex[:8]}") as c,
    ):
        service = PlacementService(settings, cloud.sessions, ctl.publisher, store=cloud.store)
        ctl.monitor.add_listener(service)
        task = asyncio.create_task(service.run())
        try:
            with cloud.sessions() as session:
                model = ctl.publisher.desired_model(session, MODEL, 1, TARGET)
                await ctl.publisher.publish(session, AGENT, [model])
            agent = ScriptedAgent(c, Topics(cloud.settings.fleet), AGENT)
            await agent.status(device_profile)
            yield Fleet(cloud, ctl, service, agent, spy)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def model_names(state: DesiredState) -> dict[str, tuple[int, str, int | None]]:
    return {m.name: (m.version, m.role, m.split_point) for m in state.models}


# --------------------------------------------------------------------------- choices


async def test_a_fast_link_and_a_slow_device_place_the_model_in_the_cloud(
    cloud: Cloud, pairs: list[SplitPair]
) -> None:
    deploy_model(cloud, pairs)
    async with fleet(cloud, split_settings(pool="gpu"), "jetson-nano") as f:
        await f.report(FAST)
        state = await f.published_generation(2)

    placement = state.placements[MODEL]
    assert (placement.mode, placement.pool, placement.split_point) == ("cloud", "gpu", None)
    assert placement.expected_ms is not None
    assert "jetson-nano" in (placement.reason or "")
    assert model_names(state) == {MODEL: (1, "full", None)}  # no head for an all-cloud plan
    assert f.stored() == state


async def test_a_slow_link_keeps_the_model_on_the_edge(
    cloud: Cloud, pairs: list[SplitPair]
) -> None:
    deploy_model(cloud, pairs)
    async with fleet(cloud, split_settings(), "x86-nuc") as f:
        await f.report(SLOW)
        state = await f.published_generation(2)

    assert state.placements[MODEL].mode == "edge"
    assert model_names(state) == {MODEL: (1, "full", None)}


async def test_raw_input_kept_on_the_device_is_never_sent_to_the_cloud(
    cloud: Cloud, pairs: list[SplitPair]
) -> None:
    deploy_model(cloud, pairs)
    settings = split_settings(keep_raw_input_on_device=True)
    async with fleet(cloud, settings, "jetson-nano") as f:
        await f.report(FAST)  # all-cloud would win here (see the first test)
        state = await f.published_generation(2)

    placement = state.placements[MODEL]
    assert (placement.mode, placement.split_point) == ("split", 1)
    assert placement.keep_raw_input_on_device
    head = next(m for m in state.models if m.name == f"{MODEL}.k1.head")
    assert (head.version, head.role, head.split_point) == (1, "head", 1)
    assert head.artifact_url.endswith(f"/api/v1/artifacts/{MODEL}.k1.head/v1/{TARGET}")


# --------------------------------------------------------------------------- hysteresis


async def test_link_jitter_inside_the_band_publishes_nothing(
    cloud: Cloud, pairs: list[SplitPair]
) -> None:
    deploy_model(cloud, pairs)
    async with fleet(cloud, split_settings(band=0.25), "x86-nuc") as f:
        await f.report(EDGY)
        first = await f.published_generation(2)
        for rtt in (16.0, 24.0, 17.0, 23.0, 16.5):  # ±20 %: a fresh plan would say all-cloud
            await f.report(LinkFigures(rtt_ms=rtt, bandwidth_mbps=90, samples=20))
        stored = f.stored()

    assert first.placements[MODEL].mode == "edge"
    assert stored.generation == 2
    assert published(f) == [1, 2]


async def test_a_move_past_the_band_publishes_exactly_one_new_generation(
    cloud: Cloud, pairs: list[SplitPair]
) -> None:
    deploy_model(cloud, pairs)
    settings = split_settings(keep_raw_input_on_device=True)
    async with fleet(cloud, settings, "x86-nuc") as f:
        await f.report(SLOW)
        edge = await f.published_generation(2)
        await f.report(LAN)
        await f.report(LAN)  # the same figures again change nothing
        split = await f.published_generation(3)
        await f.report(SLOW)
        back = await f.published_generation(4)
        generations = published(f)
        stored = f.stored()

    assert edge.placements[MODEL].mode == "edge"
    assert (split.placements[MODEL].mode, split.placements[MODEL].split_point) == ("split", 1)
    assert model_names(split) == {
        MODEL: (1, "full", None),
        f"{MODEL}.k1.head": (1, "head", 1),
    }
    assert back.placements[MODEL].mode == "edge"
    assert model_names(back) == {MODEL: (1, "full", None)}  # the head went with the split
    assert generations == [1, 2, 3, 4]  # one new generation per move, none for the repeat
    assert stored == back


async def test_placements_in_force_are_readable_from_the_api(
    cloud: Cloud, pairs: list[SplitPair]
) -> None:
    deploy_model(cloud, pairs)
    async with fleet(cloud, split_settings(), "jetson-nano") as f:
        await f.report(FAST)
        await f.published_generation(2)
        services = Services(rollouts=f.ctl.engine, fleet=f.ctl.monitor)
        services.placements = f.service
        app = create_app(cloud.settings, services=services)
        app.state.controller = cloud.state
        async with api_client(cloud, f.ctl) as plain:
            unplanned = await plain.get("/api/v1/split/placements")
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://controller",
            headers={"Authorization": f"Bearer {cloud.admin_token}"},
        ) as api:
            listed = await api.get("/api/v1/split/placements")
            one = await api.get("/api/v1/split/placements", params={"agent": "nobody"})
            anonymous = await api.get(
                "/api/v1/split/placements", headers={"Authorization": "Bearer nope"}
            )

    assert listed.status_code == 200, listed.text
    [entry] = listed.json()
    assert (entry["agent_id"], entry["generation"]) == (AGENT, 2)
    [model] = entry["placements"]
    assert (model["model"], model["placement"]["mode"]) == (MODEL, "cloud")
    assert model["planned"]["device_profile"] == "jetson-nano"
    assert (model["planned"]["rtt_ms"], model["planned"]["bandwidth_mbps"]) == (5, 100)
    assert unplanned.json()[0]["placements"][0]["planned"] is None  # registry only
    assert one.json() == []
    assert anonymous.status_code == 401


# --------------------------------------------------------------------------- bad input


async def test_a_heartbeat_without_link_figures_plans_nothing(
    cloud: Cloud, pairs: list[SplitPair], caplog: pytest.LogCaptureFixture
) -> None:
    deploy_model(cloud, pairs)
    caplog.set_level(logging.WARNING, logger="edgefed.cloud.split.placements")
    async with fleet(cloud, split_settings(), "jetson-nano") as f:
        await f.report(None)
        await f.report(LinkFigures(rtt_ms=5, bandwidth_mbps=None, samples=3))
        stored = f.stored()

    assert stored.generation == 1
    assert stored.placements == {}
    assert model_names(stored) == {MODEL: (1, "full", None)}
    assert published(f) == [1]
    messages = [r.getMessage() for r in caplog.records]
    assert f"agent {AGENT}: heartbeat carries no link figures; no plan" in messages
    assert any("bandwidth not measured yet" in m for m in messages)


async def test_an_unknown_device_profile_plans_nothing_and_says_so(
    cloud: Cloud, pairs: list[SplitPair], caplog: pytest.LogCaptureFixture
) -> None:
    deploy_model(cloud, pairs)
    caplog.set_level(logging.WARNING, logger="edgefed.cloud.split.placements")
    async with fleet(cloud, split_settings(), "toaster") as f:
        await f.report(FAST)
        await f.report(FAST)
        stored = f.stored()

    assert stored.generation == 1
    assert stored.placements == {}
    assert published(f) == [1]
    unknown = [r.getMessage() for r in caplog.records if "toaster" in r.getMessage()]
    assert len(unknown) == 1  # said once, not on every heartbeat
    assert "unknown device profile 'toaster'" in unknown[0]


async def test_a_model_without_a_published_profile_plans_nothing_and_keeps_its_state(
    cloud: Cloud, pairs: list[SplitPair], caplog: pytest.LogCaptureFixture
) -> None:
    deploy_model(cloud, pairs, profile=False)
    caplog.set_level(logging.WARNING, logger="edgefed.cloud.split.placements")
    async with fleet(cloud, split_settings(), "jetson-nano") as f:
        await f.report(FAST)
        stored = f.stored()

    assert stored.generation == 1
    assert model_names(stored) == {MODEL: (1, "full", None)}
    assert published(f) == [1]
    [message] = [r.getMessage() for r in caplog.records if "split profile" in r.getMessage()]
    assert f"{MODEL} v1 has no split profile" in message
    assert "edgefed split publish" in message


async def test_only_published_split_points_are_chosen(cloud: Cloud, pairs: list[SplitPair]) -> None:
    only_k2 = [p for p in pairs if p.k == 2]
    cloud.add_model(MODEL)
    cloud.publish_version(1, MODEL)
    with cloud.sessions() as session:
        publish_pairs(
            only_k2,
            store=cloud.store,
            session=session,
            name=MODEL,
            version=1,
            target=TARGET,
            signing_key=cloud.state.signing_key,
            profile=encoder_profile(layers=4),
        )
        session.commit()
    settings = split_settings(keep_raw_input_on_device=True)
    async with fleet(cloud, settings, "jetson-nano") as f:
        await f.report(FAST)  # k=1 would be best (third test); only k=2 is published
        state = await f.published_generation(2)

    assert (state.placements[MODEL].mode, state.placements[MODEL].split_point) == ("split", 2)
    assert f"{MODEL}.k2.head" in model_names(state)


async def test_a_rollout_keeps_the_placement_in_the_desired_state(
    cloud: Cloud, pairs: list[SplitPair]
) -> None:
    deploy_model(cloud, pairs)
    cloud.publish_version(2, MODEL)
    async with fleet(cloud, split_settings(), "jetson-nano") as f:
        await f.report(FAST)
        await f.published_generation(2)
        with cloud.sessions() as session:
            newer = f.publisher.desired_model(session, MODEL, 2, TARGET)
            after = await f.publisher.publish(session, AGENT, [newer])

    assert after.generation == 3
    assert model_names(after) == {MODEL: (2, "full", None)}
    assert after.placements[MODEL].mode == "cloud"  # carried over, not lost


def test_enabling_split_placement_without_models_is_refused() -> None:
    with pytest.raises(ValueError, match="names no models"):
        SplitSettings(enabled=True)
    with pytest.raises(ValueError, match="unknown device profile 'toaster'"):
        SplitSettings(cloud_profile="toaster")


def test_settings_path_is_in_the_controller_table(tmp_path: Path) -> None:
    config = tmp_path / "edgefed.toml"
    config.write_text(
        "[controller.split]\nenabled = true\n"
        f'[controller.split.models."{MODEL}"]\npool = "gpu"\nkeep_raw_input_on_device = true\n'
    )
    settings = load_cloud_settings(config)
    assert settings.controller.split.enabled
    assert settings.controller.split.models[MODEL].pool == "gpu"
    assert settings.controller.split.models[MODEL].keep_raw_input_on_device
