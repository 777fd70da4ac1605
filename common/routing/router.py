"""The router: sends each inference request to the best target, with deadlines, failover and
optional hedging. Used by the cloud gateway and by agents deciding whether to offload.

``await router.request(req, timeout=2.0)``:

1. The deadline is the earliest of the request's own ``deadline`` (Unix seconds), the
   ``deadline`` / ``timeout`` arguments and the default timeout; the request travels with it, and
   each attempt is published with an MQTT v5 message expiry of the time it may use, so a broker
   never delivers it after nobody waits any more.
2. A request that cannot meet its deadline anywhere is refused at once, never queued:
   :class:`DeadlineUnreachable` when the deadline has passed or every live target's latency
   estimate exceeds the time left, :class:`NoRouteError` when no target is live.
3. The policy (:mod:`edgefed.common.routing.policies`) picks a target among the live ones.
4. On a timeout, or an error reply that is the target's fault (``internal``, ``unavailable``,
   ``overloaded``, ``timeout``; ``not-found`` when the model is not loaded there), or when its
   agent goes offline with the request in flight, the same request -- same ``request_id``, which
   responders de-duplicate -- is sent once more to another target. Errors that are the caller's
   fault (malformed input, unsupported version, unauthorised) are raised at once.
5. With hedging on, when the first target has not answered after its hedging delay (its recent
   p95 by default) the same request goes to a second target too; the first answer wins.

A deadline that passes while waiting is reported as :class:`RequestTimeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgefed.common.errors import (
    ConfigError,
    EdgefedError,
    ErrorCode,
    PayloadError,
    RemoteError,
    RequestTimeout,
)
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.routing.config import RouterConfig
from edgefed.common.routing.errors import DeadlineUnreachable, NoRouteError, TargetLost
from edgefed.common.routing.policies import Policy, make_policy
from edgefed.common.routing.targets import Health, Target, TargetState
from edgefed.common.rpc import FAILS_OVER, Requester
from edgefed.common.schemas import (
    AgentState,
    AgentStatus,
    Decoded,
    Heartbeat,
    InferenceReply,
    InferenceRequest,
    decode,
)
from edgefed.common.topics import Topics

log = logging.getLogger(__name__)

Tensors = Mapping[str, np.ndarray]
Sender = Callable[
    [Target, InferenceRequest, Tensors | None, float], Awaitable[Decoded[InferenceReply]]
]
"""Sends one attempt: ``await sender(target, request, tensors, timeout_s)``; raises
:class:`RequestTimeout` when ``timeout_s`` passes and a :class:`RemoteError` for an error reply."""

TARGET_FAULTS = frozenset(
    {ErrorCode.INTERNAL, ErrorCode.UNAVAILABLE, ErrorCode.OVERLOADED, ErrorCode.TIMEOUT}
)
"""Error-reply codes that say the target failed, not the request: retried elsewhere and counted
towards ejection."""
ELSEWHERE = frozenset({ErrorCode.NOT_FOUND})
"""Error-reply codes that another target may not have (the model is not loaded here): retried
elsewhere but not held against the target's health."""


@dataclass(frozen=True, slots=True)
class Routed:
    """A routed answer: the reply, who gave it, and every target tried (in order)."""

    reply: Decoded[InferenceReply]
    target: Target
    attempts: tuple[str, ...]
    hedged: bool
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class TargetSnapshot:
    """What the router knows of one target (for metrics and the CLI)."""

    id: str
    kind: str
    health: str
    outstanding: int
    queue_depth: int
    estimate_ms: float | None
    sent: int
    succeeded: int
    failed: int


class Router:
    """Chooses among targets by policy; see the module docstring."""

    def __init__(
        self,
        requester: Requester | None,
        targets: Iterable[Target] = (),
        *,
        config: RouterConfig | None = None,
        policy: Policy | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``requester`` sends over MQTT (``None`` when every target has its own sender);
        ``policy`` overrides ``config.policy``; ``rng`` seeds it for reproducible runs."""
        self.requester = requester
        self.config = config or RouterConfig()
        self.policy: Policy = policy or make_policy(self.config.policy, rng)
        self._clock = clock
        self._states: dict[str, TargetState] = {}
        self._senders: dict[str, Sender] = {}
        self._inflight: dict[str, set[asyncio.Task[Decoded[InferenceReply]]]] = {}
        self._order = 0
        self._watch_topics: Topics | None = None
        self._watch_adds = False
        for target in targets:
            self.add_target(target)

    # ------------------------------------------------------------------ targets

    def add_target(self, target: Target, *, sender: Sender | None = None) -> None:
        """Add a target (or replace its sender); ``sender`` replaces MQTT for it, e.g. an agent
        running its local target in-process."""
        if target.id in self._states and self._states[target.id].target != target:
            raise ConfigError(f"target id {target.id!r} is already used by another target")
        if target.id not in self._states:
            self._states[target.id] = TargetState(target, self._order, self.config)
            self._order += 1
        if sender is not None:
            self._senders[target.id] = sender

    def remove_target(self, target_id: str) -> None:
        """Forget a target; its requests in flight fail over elsewhere."""
        self._cancel_inflight(target_id)
        self._states.pop(target_id, None)
        self._senders.pop(target_id, None)

    @property
    def targets(self) -> list[Target]:
        return [s.target for s in self._states.values()]

    def state(self, target_id: str) -> TargetState:
        try:
            return self._states[target_id]
        except KeyError:
            raise ConfigError(f"no target {target_id!r} in this router") from None

    def snapshot(self) -> list[TargetSnapshot]:
        now = self._clock()
        out = []
        for s in self._states.values():
            estimate = s.estimate(now)
            out.append(
                TargetSnapshot(
                    id=s.id,
                    kind=str(s.target.kind),
                    health=str(s.health),
                    outstanding=s.outstanding,
                    queue_depth=s.load(now) - s.outstanding,
                    estimate_ms=None if estimate is None else estimate * 1000,
                    sent=s.sent,
                    succeeded=s.succeeded,
                    failed=s.failed,
                )
            )
        return out

    # ------------------------------------------------------------------ fleet awareness

    async def watch(self, client: MqttClient, topics: Topics, *, add_agents: bool = False) -> None:
        """Follow agent status (retained, backed by last wills) and heartbeats of the fleet:
        offline or draining agents are ejected (their in-flight requests fail over), online ones
        re-admitted, advertised queue depths count in the cost. With ``add_agents`` every agent
        that says it is online becomes a peer target."""
        self._watch_topics = topics
        self._watch_adds = add_agents
        await client.subscribe(topics.all_agent_status(), self._on_status_message)
        await client.subscribe(topics.all_heartbeats(), self._on_heartbeat_message, qos=0)

    async def _on_status_message(self, message: Message) -> None:
        if not message.payload:
            return  # a cleared retained status
        try:
            status = decode(message.payload, message.content_type, AgentStatus).message
        except PayloadError as exc:
            log.debug("ignored agent status on %s: %s", message.topic, exc)
            return
        self.apply_status(status)

    async def _on_heartbeat_message(self, message: Message) -> None:
        try:
            beat = decode(message.payload, message.content_type, Heartbeat).message
        except PayloadError:
            return  # agents also publish RTT probes ("{}") on this topic
        self.apply_heartbeat(beat)

    def apply_status(self, status: AgentStatus) -> None:
        """Update the targets of ``status.agent_id`` from its status."""
        matching = [s for s in self._states.values() if s.target.agent_id == status.agent_id]
        if status.state is AgentState.ONLINE:
            if not matching and self._watch_adds and self._watch_topics is not None:
                self.add_target(Target.agent(self._watch_topics, status.agent_id))
            for s in matching:
                if s.health is not Health.ADMITTED:
                    log.info("target %s is back online", s.id)
                s.mark_online()
                s.models = frozenset(m.name for m in status.models) or None
            return
        for s in matching:
            if s.health is not Health.OFFLINE:
                log.info("target %s is %s (%s): ejected", s.id, status.state, status.reason)
            s.mark_offline()
            self._cancel_inflight(s.id)

    def apply_heartbeat(self, beat: Heartbeat) -> None:
        depth = sum(beat.queue_depth.values())
        now = self._clock()
        for s in self._states.values():
            if s.target.agent_id == beat.agent_id:
                s.advertise_queue(depth, now)
                s.models = frozenset(m.name for m in beat.models) or None

    # ------------------------------------------------------------------ choosing

    def choose(
        self,
        *,
        remaining_s: float | None = None,
        exclude: Sequence[str] = (),
        model: str | None = None,
    ) -> TargetState:
        """The target the policy picks now among the live ones not in ``exclude`` that serve
        ``model`` (as far as they said) and can answer within ``remaining_s`` by their estimate
        (unmeasured ones can)."""
        now = self._clock()
        live = [s for s in self._states.values() if s.id not in exclude and s.selectable(now)]
        if not live:
            raise NoRouteError(self._no_route_reason(exclude), retry_after=self._next_probe(now))
        serving = [s for s in live if s.serves(model)]
        if not serving:
            raise NoRouteError(
                f"no route: no live target serves model {model!r} "
                f"(live: {', '.join(s.id for s in live)})"
            )
        live = serving
        if remaining_s is not None:
            feasible = [s for s in live if (e := s.estimate(now)) is None or e <= remaining_s]
            if not feasible:
                best = min(e for s in live if (e := s.estimate(now)) is not None)
                raise DeadlineUnreachable(
                    f"no target can answer within the {remaining_s * 1000:.1f} ms left before "
                    f"the deadline (the fastest estimate is {best * 1000:.1f} ms)"
                )
            live = feasible
        return self.policy.choose(live, now)

    def _no_route_reason(self, exclude: Sequence[str]) -> str:
        if not self._states:
            return "no route: the router has no targets"
        parts = []
        for s in self._states.values():
            why = "already tried" if s.id in exclude else str(s.health)
            if s.health is Health.EJECTED and s.probing:
                why = "ejected, probe in flight"
            parts.append(f"{s.id} {why}")
        return "no route: no live target (" + ", ".join(parts) + ")"

    def _next_probe(self, now: float) -> float | None:
        due = [s.retry_at - now for s in self._states.values() if s.health is Health.EJECTED]
        return max(0.0, min(due)) if due else None

    # ------------------------------------------------------------------ requests

    async def request(
        self,
        request: InferenceRequest,
        *,
        tensors: Tensors | None = None,
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> Routed:
        """Route ``request`` (see the module docstring). ``deadline`` is absolute (Unix
        seconds, like ``InferenceRequest.deadline``), ``timeout`` relative (seconds)."""
        started_wall = time.time()
        started = self._clock()
        if timeout is not None and not timeout > 0:
            raise DeadlineUnreachable(f"timeout must be > 0 s (got {timeout!r})")
        default = self.config.default_timeout_s or (
            self.requester.default_timeout if self.requester is not None else 30.0
        )
        limits = [request.deadline, deadline, started_wall + (timeout or default)]
        if timeout is None and (request.deadline is not None or deadline is not None):
            limits.pop()  # an explicit deadline is not cut short by the default timeout
        effective = min(x for x in limits if x is not None)
        if effective <= started_wall:
            raise DeadlineUnreachable(
                f"request {request.request_id} is already past its deadline "
                f"(by {(started_wall - effective) * 1000:.1f} ms): refused"
            )
        if request.deadline != effective:
            request = request.model_copy(update={"deadline": effective})
        first = self.choose(remaining_s=effective - started_wall, model=request.model)

        attempts: list[str] = []
        running: dict[asyncio.Task[Decoded[InferenceReply]], TargetState] = {}
        retries_left = self.config.retries
        hedges_left = 1 if self.config.hedge else 0
        hedged = False
        last_error: EdgefedError | None = None

        def launch(state: TargetState, final: bool) -> None:
            remaining = effective - time.time()
            budget = remaining if final else remaining * self.config.first_attempt_share
            if self.config.attempt_timeout_s is not None:
                budget = min(budget, self.config.attempt_timeout_s)
            attempts.append(state.id)
            task = asyncio.ensure_future(self._attempt(state, request, tensors, budget))
            running[task] = state

        launch(first, final=retries_left == 0)
        hedge_at = self._hedge_time(first)
        try:
            while running:
                wait_s: float | None = None
                if hedges_left and hedge_at is not None:
                    wait_s = max(0.0, hedge_at - self._clock())
                done, _ = await asyncio.wait(
                    running, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    hedges_left = 0
                    remaining = effective - time.time()
                    with contextlib.suppress(NoRouteError, DeadlineUnreachable):
                        launch(
                            self.choose(
                                remaining_s=remaining, exclude=attempts, model=request.model
                            ),
                            final=True,
                        )
                        hedged = True
                    continue
                for task in done:
                    state = running.pop(task)
                    if task.cancelled():
                        last_error = TargetLost(
                            f"target {state.id} went offline with request "
                            f"{request.request_id} in flight"
                        )
                        continue
                    exc = task.exception()
                    if exc is None:
                        return Routed(
                            reply=task.result(),
                            target=state.target,
                            attempts=tuple(attempts),
                            hedged=hedged,
                            elapsed_s=self._clock() - started,
                        )
                    if not _fails_over(exc):
                        raise _as_timeout(exc) if _is_expired(exc) else exc
                    assert isinstance(exc, EdgefedError)
                    last_error = exc
                if running or retries_left == 0:
                    continue
                remaining = effective - time.time()
                if remaining <= 0:
                    break
                retries_left -= 1
                try:
                    nxt = self.choose(remaining_s=remaining, exclude=attempts, model=request.model)
                except (NoRouteError, DeadlineUnreachable) as exc:
                    log.info("request %s: no other target to retry on: %s", request.request_id, exc)
                    break
                log.info(
                    "request %s: retrying on %s after %s",
                    request.request_id,
                    nxt.id,
                    type(last_error).__name__,
                )
                launch(nxt, final=retries_left == 0)
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        if effective - time.time() <= 0 or isinstance(last_error, RequestTimeout):
            raise RequestTimeout(
                f"request {request.request_id} got no answer before its deadline "
                f"(tried {', '.join(attempts)})",
                retry_after=0.0,
            ) from last_error
        assert last_error is not None
        raise last_error

    def _hedge_time(self, state: TargetState) -> float | None:
        if not self.config.hedge:
            return None
        now = self._clock()
        delay = state.hedge_delay(now)
        return None if delay is None else now + delay

    async def _attempt(
        self,
        state: TargetState,
        request: InferenceRequest,
        tensors: Tensors | None,
        timeout: float,
    ) -> Decoded[InferenceReply]:
        task = asyncio.current_task()
        assert task is not None
        inflight = self._inflight.setdefault(state.id, set())
        inflight.add(task)
        sender = self._senders.get(state.id, self._send_mqtt)
        state.started()
        sent_at = self._clock()
        outcome = "released"
        try:
            reply = await sender(state.target, request, tensors, timeout)
            state.succeeded_after(self._clock() - sent_at, self._clock())
            outcome = "ok"
            return reply
        except RequestTimeout:
            state.failed_after(self._clock() - sent_at, self._clock())
            outcome = "failed"
            raise
        except RemoteError as exc:
            if exc.code in TARGET_FAULTS:
                state.failed_after(None, self._clock())
                outcome = "failed"
            raise
        finally:
            if outcome == "released":
                state.released()
            state.finished()
            inflight.discard(task)

    async def _send_mqtt(
        self,
        target: Target,
        request: InferenceRequest,
        tensors: Tensors | None,
        timeout: float,
    ) -> Decoded[InferenceReply]:
        if self.requester is None:
            raise ConfigError(f"target {target.id} has no sender and the router no requester")
        return await self.requester.request(
            target.topic,
            request,
            InferenceReply,
            tensors=tensors,
            timeout=timeout,
            user_properties=self._fails_over_on_will(target),
        )

    def _fails_over_on_will(self, target: Target) -> tuple[tuple[str, str], ...]:
        """Tell an agent that this router sends the request elsewhere when the agent's last
        will arrives, so that a copy the broker re-delivers to it later is not run twice."""
        return (FAILS_OVER,) if target.agent_id is not None and self._watch_topics else ()

    def _cancel_inflight(self, target_id: str) -> None:
        for task in list(self._inflight.get(target_id, ())):
            task.cancel()


def _fails_over(exc: BaseException) -> bool:
    if isinstance(exc, RequestTimeout):
        return True
    if isinstance(exc, RemoteError):
        return exc.code in TARGET_FAULTS or exc.code in ELSEWHERE
    return False


def _is_expired(exc: BaseException) -> bool:
    return isinstance(exc, RemoteError) and exc.code is ErrorCode.EXPIRED


def _as_timeout(exc: BaseException) -> BaseException:
    if not _is_expired(exc):
        return exc
    assert isinstance(exc, RemoteError)
    return RequestTimeout(
        f"request {exc.request_id} expired before it was served: {exc.remote_message}",
        retry_after=0.0,
    )
