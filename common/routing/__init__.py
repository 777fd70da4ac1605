"""Routing of inference requests among the local agent, peer agents, cloud worker pools and
split execution: one module for the cloud gateway and the agents' offload decision.

    router = Router(requester, [Target.agent(topics, "a1"), Target.pool(topics, "gpu")],
                    config=RouterConfig(policy="latency"), rng=random.Random(7))
    await router.watch(client, topics)          # status / last wills / heartbeats
    routed = await router.request(InferenceRequest(model="m", texts=["hi"]), timeout=2.0)
"""

from edgefed.common.routing.config import POLICY_NAMES, RouterConfig
from edgefed.common.routing.errors import (
    DeadlineUnreachable,
    NoRouteError,
    RoutingError,
    TargetLost,
)
from edgefed.common.routing.estimates import PeakEwma, RecentLatencies
from edgefed.common.routing.policies import (
    LatencyAware,
    LeastOutstanding,
    Policy,
    Random,
    RoundRobin,
    make_policy,
)
from edgefed.common.routing.router import (
    ELSEWHERE,
    TARGET_FAULTS,
    Routed,
    Router,
    Sender,
    TargetSnapshot,
)
from edgefed.common.routing.targets import Health, Target, TargetKind, TargetState

__all__ = [
    "ELSEWHERE",
    "POLICY_NAMES",
    "TARGET_FAULTS",
    "DeadlineUnreachable",
    "Health",
    "LatencyAware",
    "LeastOutstanding",
    "NoRouteError",
    "PeakEwma",
    "Policy",
    "Random",
    "RecentLatencies",
    "RoundRobin",
    "Routed",
    "Router",
    "RouterConfig",
    "RoutingError",
    "Sender",
    "Target",
    "TargetKind",
    "TargetLost",
    "TargetSnapshot",
    "TargetState",
    "make_policy",
]
