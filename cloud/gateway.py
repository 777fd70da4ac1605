"""The HTTP gateway's router: ``POST /api/v1/infer`` goes through the same routing module as the
agents' offload decision (:mod:`edgefed.common.routing`), over the controller's MQTT link.

Targets: every agent of the fleet that says it is online (followed through retained statuses,
last wills and heartbeats, which also tell which models each serves and its queue depth) and
the configured cloud worker pools.
"""

from __future__ import annotations

import logging
import random

from edgefed.cloud.settings import CloudSettings
from edgefed.common.mqtt import MqttClient
from edgefed.common.routing import Routed, Router, RouterConfig, Target, TargetSnapshot
from edgefed.common.rpc import Requester
from edgefed.common.schemas import InferenceRequest
from edgefed.common.topics import Topics

log = logging.getLogger(__name__)


class Gateway:
    """Implements :class:`edgefed.cloud.services.GatewayService`."""

    def __init__(self, router: Router) -> None:
        self.router = router

    @classmethod
    async def start(cls, client: MqttClient, settings: CloudSettings) -> Gateway:
        ctl = settings.controller
        topics = Topics(settings.fleet)
        router = Router(
            Requester(client, topics),
            [Target.pool(topics, pool) for pool in ctl.gateway_pools],
            config=RouterConfig(policy=ctl.routing_policy, default_timeout_s=ctl.gateway_timeout_s),
            rng=random.Random(),  # noqa: S311 - load spreading, not cryptography
        )
        await router.watch(client, topics, add_agents=True)
        log.info(
            "gateway routing with the %s policy to the fleet's agents and pools %s",
            ctl.routing_policy,
            ", ".join(ctl.gateway_pools) or "(none)",
        )
        return cls(router)

    async def infer(self, request: InferenceRequest, *, timeout: float | None) -> Routed:
        return await self.router.request(request, timeout=timeout)

    def targets(self) -> list[TargetSnapshot]:
        return self.router.snapshot()
