"""The agent's offload decision: requests from local applications for a model go through the
shared :class:`~edgefed.common.routing.Router` to the agent's own model, cloud worker pools or
split execution, as the model's :class:`~edgefed.edge.routeplan.RoutePlan` allows.

Targets and how requests reach them:

* **edge** -- in-process into the agent's :class:`InferenceService` (its batcher and queues),
  no MQTT hop;
* **cloud** -- ``workers/<pool>/infer`` over the cloud link (a shared subscription spreads them
  over the pool's workers);
* **split** -- in-process: the head ``<model>.k<k>.head`` runs here
  (:class:`~edgefed.common.serving.split.SplitExecutor`), the activation goes to the tail on
  the pool over the cloud link. Only activations leave the device.

The placement is the first choice and its ``expected_ms`` the prior estimate: the first-choice
target's peak-EWMA starts there, the others at ``offload.other_prior_factor`` times it, and
measured round trips take over (``offload.policy``, latency-aware by default: a target that
became slow loses its traffic within a few requests; one that recovered wins it back as its
estimate decays). A new placement resets the estimates to its priors. Cloud and split targets
are offline while the cloud link is down, so requests stay local then. Failover, retries with
the same request id, deadlines and hedging are the router's.

**No loops.** Only requests from the *local* link are routed. Requests arriving on the *cloud*
link (from the gateway or a peer's router, which already chose this agent) are served here: by
the full model, or through split execution when only the head is here -- never sent on to a
pool as whole requests. A tail request goes to a worker pool, and pools never forward, so no
request can come back to an agent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefed.common.errors import (
    EdgefedError,
    ErrorCode,
    RemoteError,
    RemotePermanentError,
    RemoteTemporaryError,
    RequestTimeout,
    TemporaryError,
)
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.routing import Router, Target, TargetKind
from edgefed.common.routing.targets import Health
from edgefed.common.rpc import Requester
from edgefed.common.schemas import (
    Decoded,
    Encoded,
    InferenceReply,
    InferenceRequest,
    Placement,
    decode,
    encode,
)
from edgefed.common.serving.service import InferenceService, ModelTable
from edgefed.common.serving.split import SplitExecutor
from edgefed.common.topics import Topics
from edgefed.edge.config import OffloadConfig
from edgefed.edge.linkmeter import LinkMeter
from edgefed.edge.routeplan import Mode, RoutePlan, plan_route, split_base, split_target

log = logging.getLogger(__name__)

__all__ = ["Offloader"]

Tensors = Mapping[str, np.ndarray]
PlanListener = Callable[[str, RoutePlan | None], None]
"""``(model, plan)``; ``plan`` is ``None`` when the model is served as without offloading."""


@dataclass(slots=True)
class _Route:
    router: Router
    plan: RoutePlan


class Offloader:
    """Routes local applications' requests (see the module docstring).

    ``handle_local`` and ``handle_cloud`` are request handlers for ``rpc.serve`` on the local
    and the cloud link. ``on_plan`` hears of every change of a model's plan (metrics, telemetry),
    ``on_routed`` of the target kind of every routed request answered.
    """

    def __init__(
        self,
        *,
        config: OffloadConfig,
        agent_id: str,
        topics: Topics,
        table: ModelTable,
        service: InferenceService,
        link: LinkMeter,
        on_plan: PlanListener | None = None,
        on_routed: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.agent_id = agent_id
        self.topics = topics
        self.table = table
        self.service = service
        self.link = link
        self.on_plan = on_plan
        self.on_routed = on_routed
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not cryptography
        self._placements: dict[str, Placement] = {}
        self._routes: dict[str, _Route] = {}
        self._reported: dict[str, RoutePlan | None] = {}
        self._cloud: MqttClient | None = None
        self._requester: Requester | None = None
        self.routed: dict[str, int] = {}
        """Local requests answered per target kind (``local``, ``cloud-pool``, ``split``)."""

    # ------------------------------------------------------------------ state

    def attach_cloud(self, client: MqttClient) -> None:
        """The cloud link that pool and split targets use."""
        self._cloud = client
        self._requester = Requester(client, self.topics)

    @property
    def placements(self) -> dict[str, Placement]:
        return dict(self._placements)

    def set_placements(self, placements: Mapping[str, Placement]) -> None:
        """Apply new placements now (requests already routed finish where they went)."""
        self._placements = dict(placements)
        self.refresh()

    def plan(self, model: str) -> RoutePlan | None:
        """The plan in force for ``model`` now (``None``: served as without offloading)."""
        plan = plan_route(model, self._placements.get(model), self.config, self.table.names())
        if self._reported.get(model, None) != plan or model not in self._reported:
            self._reported[model] = plan
            self._announce(model, plan)
        return plan

    def refresh(self) -> None:
        """Re-plan every model with a placement or served here (after placements or models
        changed), so changes are reported when they happen, not at the next request."""
        names = set(self.table.names())
        models = set(self._placements) | {split_base(n) or n for n in names} | set(self._reported)
        for model in sorted(models):
            self.plan(model)

    def _announce(self, model: str, plan: RoutePlan | None) -> None:
        if plan is None:
            log.info("%s: served on the agent (no placement, offload off)", model)
            self._routes.pop(model, None)
        else:
            level = logging.WARNING if plan.note else logging.INFO
            log.log(level, "offload plan %s", plan.describe())
        if self.on_plan is not None:
            try:
                self.on_plan(model, plan)
            except Exception:  # reporting must not stop routing
                log.exception("reporting the plan of %s failed", model)

    # ------------------------------------------------------------------ handlers

    async def handle_local(
        self, req: Decoded[InferenceRequest], msg: Message
    ) -> InferenceReply | Encoded:
        """A request from a local application: routed when the model has a plan."""
        request = req.message
        plan = self.plan(request.model)
        if plan is None or plan.first is None:
            return await self.service.handle(req, msg)
        router = self._router_for(plan)
        self._sync_cloud_health(router)
        timeout = None if msg.deadline is None else msg.deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            timeout = 1e-6  # the router refuses it as past its deadline
        routed = await router.request(request, tensors=req.tensors or None, timeout=timeout)
        kind = str(routed.target.kind)
        self.routed[kind] = self.routed.get(kind, 0) + 1
        if self.on_routed is not None:
            self.on_routed(kind)
        reply = routed.reply
        return encode(reply.message, reply.tensors) if reply.tensors else reply.message

    async def handle_cloud(
        self, req: Decoded[InferenceRequest], msg: Message
    ) -> InferenceReply | Encoded:
        """A request from the cloud link: never re-offloaded (see "No loops")."""
        request = req.message
        if request.model not in self.table and request.texts is not None:
            placement = (
                self._placements.get(request.model) if self.config.follow_placements else None
            )
            split = split_target(request.model, placement, self.config, self.table.names())
            if split is not None:
                timeout = self.config.timeout_s
                if msg.deadline is not None:
                    timeout = max(1e-3, msg.deadline - time.monotonic())
                decoded = await self._split(*split, request, timeout)
                reply = decoded.message
                return encode(reply, decoded.tensors) if decoded.tensors else reply
        return await self.service.handle(req, msg)

    # ------------------------------------------------------------------ the router

    def _router_for(self, plan: RoutePlan) -> Router:
        route = self._routes.get(plan.model)
        if route is None:
            router = Router(None, config=self.config.router_config(), rng=self._rng)
            route = _Route(router, plan)
            self._routes[plan.model] = route
            self._sync_targets(route, plan, reseed=True)
        elif route.plan != plan:
            reseed = route.plan.placement != plan.placement or route.plan.first != plan.first
            self._sync_targets(route, plan, reseed=reseed)
        return route.router

    def _sync_targets(self, route: _Route, plan: RoutePlan, *, reseed: bool) -> None:
        router, before = route.router, route.plan
        wanted: dict[str, tuple[Target, Mode]] = {}
        if plan.local:
            wanted[self.agent_id] = (Target.agent(self.topics, self.agent_id, local=True), "edge")
        for pool in plan.pools:
            target = Target.pool(self.topics, pool)
            wanted[target.id] = (target, "cloud")
        if plan.head is not None:
            target = Target.split(self.topics, self.agent_id)
            wanted[target.id] = (target, "split")
        present = {t.id for t in router.targets}
        for target_id in present - set(wanted):
            router.remove_target(target_id)
        if before is not plan and (before.head, before.tail_pool) != (plan.head, plan.tail_pool):
            split_id = Target.split(self.topics, self.agent_id).id
            if split_id in present and split_id in wanted:
                router.remove_target(split_id)  # another head: its measurements do not carry over
        prior = (
            plan.placement.expected_ms
            if plan.placement is not None and plan.placement.expected_ms
            else self.config.prior_ms
        ) / 1000
        now = time.monotonic()
        current = {t.id for t in router.targets}
        for target_id, (target, mode) in wanted.items():
            new = target_id not in current
            if new:
                router.add_target(target, sender=self._sender(mode))
            if new or reseed:
                factor = 1.0 if mode == plan.first else self.config.other_prior_factor
                router.state(target_id).ewma.reset(prior * factor, now)
        route.plan = plan

    def _sender(self, mode: Mode) -> Any:
        return {"edge": self._send_local, "cloud": self._send_pool, "split": self._send_split}[mode]

    def _sync_cloud_health(self, router: Router) -> None:
        """Cloud and split targets are offline while the cloud link is down."""
        up = self._cloud is not None and self._cloud.connected
        for target in router.targets:
            if target.kind not in (TargetKind.CLOUD_POOL, TargetKind.SPLIT):
                continue
            state = router.state(target.id)
            if not up and state.health is not Health.OFFLINE:
                state.mark_offline()
            elif up and state.health is Health.OFFLINE:
                state.mark_online()

    # ------------------------------------------------------------------ senders

    async def _send_local(
        self, target: Target, request: InferenceRequest, tensors: Tensors | None, timeout: float
    ) -> Decoded[InferenceReply]:
        msg = Message(topic=target.topic, payload=b"", expiry_s=max(1, math.ceil(timeout)))
        try:
            async with asyncio.timeout(timeout):
                result = await self.service.handle(Decoded(request, dict(tensors or {})), msg)
        except TimeoutError:
            raise RequestTimeout(
                f"the agent's own {request.model} did not answer within {timeout:.3g} s",
                retry_after=0.0,
            ) from None
        except Exception as exc:  # the router fails over on what a remote error would say
            raise _as_remote(exc, request.request_id) from exc
        if isinstance(result, Encoded):
            return decode(result.payload, result.content_type, InferenceReply)
        return Decoded(result)

    async def _send_pool(
        self, target: Target, request: InferenceRequest, tensors: Tensors | None, timeout: float
    ) -> Decoded[InferenceReply]:
        plan = self._routes[request.model].plan if request.model in self._routes else None
        if plan is None or plan.keep_raw_input_on_device:  # never: no such target is made
            raise RemotePermanentError(
                f"{request.model}'s raw input stays on the device", code=ErrorCode.UNAUTHORIZED
            )
        requester = self._cloud_requester()
        try:
            async with asyncio.timeout(timeout):
                return await requester.request(
                    target.topic, request, InferenceReply, tensors=tensors, timeout=timeout
                )
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from {target.topic} within {timeout:.3g} s", retry_after=0.0
            ) from None

    async def _send_split(
        self, target: Target, request: InferenceRequest, tensors: Tensors | None, timeout: float
    ) -> Decoded[InferenceReply]:
        route = self._routes.get(request.model)
        if route is None or route.plan.head is None or route.plan.tail_pool is None:
            raise RemoteTemporaryError(
                f"no split head of {request.model} is loaded now", code=ErrorCode.NOT_FOUND
            )
        return await self._split(route.plan.head, route.plan.tail_pool, request, timeout)

    async def _split(
        self, head_name: str, pool: str, request: InferenceRequest, timeout: float
    ) -> Decoded[InferenceReply]:
        """Run ``request`` with the head here and the tail on ``pool``."""
        if request.texts is None:
            raise RemotePermanentError(
                "split execution takes texts, not tensors", code=ErrorCode.NOT_FOUND
            )
        requester = self._cloud_requester()
        topic = self.topics.worker_infer(pool)
        started = time.monotonic()

        async def send_tail(
            tail: InferenceRequest, activation: Mapping[str, np.ndarray]
        ) -> Decoded[InferenceReply]:
            sent_at = time.perf_counter()
            left = max(1e-3, timeout - (time.monotonic() - started))
            reply = await requester.request(
                topic, tail, InferenceReply, tensors=activation, timeout=left
            )
            remote_s = sum(reply.message.timings_ms.values()) / 1000
            nbytes = sum(int(t.nbytes) for t in activation.values())
            self.link.observe_transfer(nbytes, time.perf_counter() - sent_at, remote_s=remote_s)
            return reply

        try:
            head = self.table.get(head_name)
            executor = SplitExecutor(head, send_tail, wire_dtype=self.config.wire_dtype)
            async with asyncio.timeout(timeout):
                result = await executor.run(
                    request.texts,
                    request.parameters,
                    priority=request.priority,
                    deadline=request.deadline,
                )
        except TimeoutError:
            raise RequestTimeout(
                f"split {head_name} + pool {pool} did not answer within {timeout:.3g} s",
                retry_after=0.0,
            ) from None
        except (RemoteError, RequestTimeout):
            raise
        except Exception as exc:
            raise _as_remote(exc, request.request_id) from exc
        timings = {"head": round(result.head_ms, 3)}
        timings |= {f"tail_{k}": v for k, v in result.tail.timings_ms.items()}
        reply = InferenceReply(
            request_id=request.request_id,
            model=request.model,
            version=head.version,
            served_by=f"{self.agent_id}+{result.tail.served_by}",
            outputs={"results": result.results},
            timings_ms=timings,
        )
        if request.parameters.get("return") == "tensors" and head.task == "feature-extraction":
            embeddings = np.asarray([r["embedding"] for r in result.results], dtype=np.float32)
            return Decoded(reply.model_copy(update={"outputs": {}}), {"embeddings": embeddings})
        return Decoded(reply)

    def _cloud_requester(self) -> Requester:
        if self._requester is None or self._cloud is None or not self._cloud.connected:
            raise RemoteTemporaryError("the cloud link is down", code=ErrorCode.UNAVAILABLE)
        return self._requester


def _as_remote(exc: BaseException, request_id: str) -> RemoteError | RequestTimeout:
    """The error a target's error reply would have raised, so the router treats an in-process
    target like a remote one (fail over on its faults, raise the caller's at once)."""
    if isinstance(exc, RemoteError | RequestTimeout):
        return exc
    if isinstance(exc, EdgefedError):
        code = getattr(exc, "code", None)
        if isinstance(exc, TemporaryError):
            return RemoteTemporaryError(
                exc.message,
                code=code if isinstance(code, ErrorCode) else ErrorCode.UNAVAILABLE,
                request_id=request_id,
                retry_after=exc.retry_after,
            )
        return RemotePermanentError(
            exc.message,
            code=code if isinstance(code, ErrorCode) else ErrorCode.INTERNAL,
            request_id=request_id,
        )
    return RemoteTemporaryError(
        f"{type(exc).__name__}: {exc}", code=ErrorCode.INTERNAL, request_id=request_id
    )
