"""Router behaviour that needs no broker: in-process senders (an agent's own local target),
heartbeats and status applied to targets."""

from __future__ import annotations

import random

import pytest

from edgefed.common.errors import ConfigError, ErrorCode, RemoteTemporaryError
from edgefed.common.routing import (
    Health,
    NoRouteError,
    Router,
    RouterConfig,
    Sender,
    Target,
    TargetKind,
)
from edgefed.common.schemas import (
    AgentState,
    AgentStatus,
    Decoded,
    Heartbeat,
    InferenceReply,
    InferenceRequest,
    LoadedModel,
    Priority,
    ResourceFigures,
)
from edgefed.common.topics import Topics

TOPICS = Topics("unit")


def reply_from(name: str) -> Sender:
    async def send(
        target: Target, request: InferenceRequest, tensors: object, timeout: float
    ) -> Decoded[InferenceReply]:
        assert request.deadline is not None  # the router always sets one
        return Decoded(
            InferenceReply(request_id=request.request_id, model="m", version=1, served_by=name)
        )

    return send


async def test_local_target_runs_in_process_through_its_own_sender() -> None:
    local = Target.agent(TOPICS, "me", local=True)
    router = Router(None, config=RouterConfig(policy="round-robin"), rng=random.Random(1))
    router.add_target(local, sender=reply_from("me-in-process"))
    routed = await router.request(InferenceRequest(model="m"), timeout=1.0)
    assert routed.reply.message.served_by == "me-in-process"
    assert routed.target == local


async def test_failing_local_sender_fails_over_to_a_peer_with_the_same_id() -> None:
    seen: list[str] = []

    async def broken(
        target: Target, request: InferenceRequest, tensors: object, timeout: float
    ) -> Decoded[InferenceReply]:
        seen.append(request.request_id)
        raise RemoteTemporaryError("session crashed", code=ErrorCode.INTERNAL)

    router = Router(None, config=RouterConfig(policy="round-robin"), rng=random.Random(1))
    router.add_target(Target.agent(TOPICS, "me", local=True), sender=broken)
    router.add_target(Target.agent(TOPICS, "peer"), sender=reply_from("peer"))
    routed = await router.request(InferenceRequest(model="m", request_id="same"), timeout=1.0)
    assert seen == ["same"]
    assert routed.reply.message.request_id == "same"
    assert routed.attempts == ("me", "peer")
    assert router.state("me").failed == 1


async def test_no_sender_and_no_requester_is_a_config_error() -> None:
    router = Router(None, [Target.agent(TOPICS, "a")])
    with pytest.raises(ConfigError, match="no sender"):
        await router.request(InferenceRequest(model="m"), timeout=1.0)


async def test_empty_router_has_no_route() -> None:
    with pytest.raises(NoRouteError, match="no targets"):
        await Router(None).request(InferenceRequest(model="m"), timeout=1.0)


def test_heartbeat_queue_depth_and_status_update_the_agent_targets() -> None:
    router = Router(None, [Target.agent(TOPICS, "a"), Target.split(TOPICS, "a")])
    beat = Heartbeat(
        agent_id="a",
        seq=1,
        resources=ResourceFigures(cpu_percent=1, memory_used_bytes=1, memory_total_bytes=2),
        queue_depth={Priority.HIGH: 2, Priority.NORMAL: 3},
    )
    router.apply_heartbeat(beat)
    assert [router.state(t).queue_depth for t in ("a", "split.a")] == [5, 5]
    router.apply_status(AgentStatus(agent_id="a", state=AgentState.OFFLINE))
    assert router.state("split.a").health is Health.OFFLINE
    router.apply_status(AgentStatus(agent_id="a", state=AgentState.ONLINE))
    assert router.state("a").health is Health.ADMITTED


def test_a_target_id_cannot_be_reused_for_another_target() -> None:
    router = Router(None, [Target.agent(TOPICS, "a")])
    with pytest.raises(ConfigError, match="already used"):
        router.add_target(Target(id="a", kind=TargetKind.PEER, topic="elsewhere"))


async def test_requests_go_only_to_targets_that_say_they_serve_the_model() -> None:
    router = Router(None, config=RouterConfig(policy="round-robin"), rng=random.Random(3))
    for name in ("a1", "a2", "pool"):
        target = Target.pool(TOPICS, name) if name == "pool" else Target.agent(TOPICS, name)
        router.add_target(target, sender=reply_from(name))
    router.apply_status(
        AgentStatus(
            agent_id="a1", state=AgentState.ONLINE, models=[LoadedModel(name="m1", version=1)]
        )
    )
    router.apply_status(
        AgentStatus(
            agent_id="a2", state=AgentState.ONLINE, models=[LoadedModel(name="m2", version=4)]
        )
    )
    served = [
        (await router.request(InferenceRequest(model="m2"), timeout=1.0)).reply.message.served_by
        for _ in range(6)
    ]
    assert set(served) == {"a2", "pool"}  # a1 said it serves only m1; the pool did not say

    router.remove_target("pool.pool")
    with pytest.raises(NoRouteError, match="no live target serves model 'm3'"):
        await router.request(InferenceRequest(model="m3"), timeout=1.0)
