"""The router against the real mosquitto with in-process agents served by the real rpc.serve."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import (
    ErrorCode,
    PayloadError,
    RemotePermanentError,
    RequestTimeout,
)
from edgefed.common.mqtt import MqttClient
from edgefed.common.routing import (
    DeadlineUnreachable,
    Health,
    NoRouteError,
    Router,
    RouterConfig,
    Target,
)
from edgefed.common.rpc import Requester
from edgefed.common.schemas import AgentState, InferenceRequest
from edgefed.common.settings import Settings
from edgefed.common.topics import Topics
from tests.conftest import fast_settings

from .sim_agents import Overloaded, SimAgent

pytestmark = pytest.mark.integration

MakeRouter = Callable[..., Awaitable[tuple[Router, list[SimAgent]]]]


@pytest.fixture
async def make_router(
    broker: PrivateBroker, fleet: str, topics: Topics
) -> AsyncIterator[MakeRouter]:
    settings: Settings = fast_settings(broker.url, fleet)
    started: list[SimAgent] = []
    clients: list[MqttClient] = []

    async def make(
        n: int, *, delay_s: float = 0.002, watch: bool = True, **config: object
    ) -> tuple[Router, list[SimAgent]]:
        agents = [
            await SimAgent(f"a{i}", settings, topics, delay_s=delay_s).start() for i in range(n)
        ]
        started.extend(agents)
        client = MqttClient.from_settings(settings, client_id=f"{fleet}-router")
        await client.__aenter__()
        clients.append(client)
        router = Router(
            Requester(client, topics),
            [Target.agent(topics, a.agent_id) for a in agents],
            config=RouterConfig(**config),  # type: ignore[arg-type]
            rng=random.Random(7),
        )
        if watch:
            await router.watch(client, topics)
        return router, agents

    yield make
    for agent in started:
        agent.thaw()
        await agent.stop()
    for client in clients:
        await client.aclose()


def req(**kw: object) -> InferenceRequest:
    return InferenceRequest(model="m", texts=["x"], **kw)


async def run_closed_loop(router: Router, n: int, concurrency: int = 3) -> Counter[str]:
    """Send ``n`` requests, ``concurrency`` at a time; count who answered."""
    served: Counter[str] = Counter()
    queue = list(range(n))

    async def worker() -> None:
        while queue:
            queue.pop()
            routed = await router.request(req(), timeout=5.0)
            served[routed.target.id] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return served


async def test_a_reply_comes_back_through_the_router(make_router: MakeRouter) -> None:
    router, agents = await make_router(2, policy="round-robin")
    routed = await router.request(req(request_id="r-1"), timeout=5.0)
    assert routed.reply.message.request_id == "r-1"
    assert routed.reply.message.served_by == routed.target.id == "a0"
    assert routed.attempts == ("a0",)
    assert agents[0].executed == Counter({"r-1": 1})
    snap = {s.id: s for s in router.snapshot()}
    assert snap["a0"].succeeded == 1
    assert snap["a0"].outstanding == 0
    assert snap["a0"].estimate_ms is not None


async def test_router_stops_sending_to_a_target_10x_slower_and_comes_back(
    make_router: MakeRouter,
) -> None:
    router, agents = await make_router(3, delay_s=0.005, decay_s=1.0)
    slow = agents[1]
    warm = await run_closed_loop(router, 60)
    assert warm["a1"] > 5  # it had its share before

    slow.delay_s = 0.050  # 10x slower
    before = sum(slow.received.values())
    await run_closed_loop(router, 200)
    sent_while_slow = sum(slow.received.values()) - before
    assert sent_while_slow <= 10, f"slow target still got {sent_while_slow} of 200"

    slow.delay_s = 0.005  # recovered: the decayed estimate lets it be tried and re-admitted
    for _ in range(20):
        await asyncio.sleep(0.5)
        served = await run_closed_loop(router, 60)
        if served["a1"] >= 10:
            break
    assert served["a1"] >= 10, f"recovered target got only {served['a1']} of 60"


async def test_killed_agent_requests_fail_over_once_with_the_same_id(
    make_router: MakeRouter,
) -> None:
    router, agents = await make_router(3, policy="round-robin")
    doomed = agents[0]
    doomed.freeze()  # its requests wait inside it, unanswered
    ids = [f"k-{i}" for i in range(9)]
    tasks = [asyncio.create_task(router.request(req(request_id=i), timeout=20.0)) for i in ids]
    for _ in range(200):
        if len(doomed.received) == 3:
            break
        await asyncio.sleep(0.02)
    assert len(doomed.received) == 3
    await doomed.kill()  # last will: offline -> in-flight requests fail over at once

    results = await asyncio.gather(*tasks)
    assert [r.reply.message.request_id for r in results] == ids  # none lost
    executions = Counter[str]()
    for a in agents:
        executions.update(a.executed)
    assert executions == Counter(dict.fromkeys(ids, 1))  # none executed twice
    moved = [r for r in results if r.attempts[0] == "a0"]
    assert len(moved) == 3
    assert all(len(r.attempts) == 2 and r.target.id != "a0" for r in moved)
    for r in moved:  # the retry carried the same request id to the other agent
        assert r.reply.message.request_id in agents[int(r.target.id[1])].received
    assert router.state("a0").health is Health.OFFLINE
    assert (await run_closed_loop(router, 10))["a0"] == 0


async def test_agent_that_stops_answering_times_out_and_fails_over_without_double_execution(
    make_router: MakeRouter,
) -> None:
    router, agents = await make_router(
        2,
        policy="round-robin",
        eject_after_failures=1,
        probe_backoff_s=60.0,
        probe_backoff_max_s=60.0,
    )
    hung = agents[0]
    hung.freeze()
    deadline = time.time() + 1.0
    routed = await router.request(req(request_id="h-1"), deadline=deadline)
    assert routed.attempts == ("a0", "a1")
    assert routed.reply.message.served_by == "a1"
    assert hung.received["h-1"] == 1
    await asyncio.sleep(max(0.0, deadline - time.time()) + 0.05)
    hung.thaw()  # it wakes up after the deadline the request carries: it must not run it now
    await asyncio.sleep(0.2)
    assert hung.executed["h-1"] == 0
    assert agents[1].executed["h-1"] == 1
    assert router.state("a0").health is Health.EJECTED  # one timeout, threshold 1
    served = await run_closed_loop(router, 6)
    assert served == Counter({"a1": 6})


async def test_ejected_target_is_probed_back_after_its_backoff(make_router: MakeRouter) -> None:
    router, agents = await make_router(
        2, policy="round-robin", eject_after_failures=1, probe_backoff_s=0.3
    )
    agents[0].freeze()
    await router.request(req(), timeout=0.6)
    assert router.state("a0").health is Health.EJECTED
    agents[0].thaw()
    await asyncio.sleep(0.35)
    served = await run_closed_loop(router, 6, concurrency=1)
    assert served["a0"] >= 1
    assert router.state("a0").health is Health.ADMITTED


async def test_target_fault_error_reply_is_retried_elsewhere_but_bad_input_is_not(
    make_router: MakeRouter,
) -> None:
    router, agents = await make_router(2, policy="round-robin")
    agents[0].fail_with = Overloaded("queue full")
    routed = await router.request(req(request_id="o-1"), timeout=5.0)
    assert routed.attempts == ("a0", "a1")
    assert agents[0].received["o-1"] == agents[1].executed["o-1"] == 1

    agents[0].fail_with = PayloadError("text too long for the model")
    agents[1].fail_with = PayloadError("text too long for the model")
    with pytest.raises(RemotePermanentError, match="text too long") as info:
        await router.request(req(request_id="p-1"), timeout=5.0)
    assert info.value.code is ErrorCode.MALFORMED
    assert agents[0].received["p-1"] + agents[1].received["p-1"] == 1  # not retried


async def test_past_deadline_is_refused_at_once_not_queued(make_router: MakeRouter) -> None:
    router, agents = await make_router(2)
    with pytest.raises(DeadlineUnreachable, match="past its deadline"):
        await router.request(req(deadline=time.time() - 0.5))
    with pytest.raises(DeadlineUnreachable, match="past its deadline"):
        await router.request(req(), deadline=time.time() - 0.001)
    await asyncio.sleep(0.1)
    assert sum(len(a.received) for a in agents) == 0


async def test_deadline_below_every_estimate_is_refused_at_once(make_router: MakeRouter) -> None:
    router, agents = await make_router(2, delay_s=0.100)
    await run_closed_loop(router, 4, concurrency=2)  # both measured at >= 100 ms
    received = sum(sum(a.received.values()) for a in agents)
    with pytest.raises(DeadlineUnreachable, match="fastest estimate"):
        await router.request(req(), timeout=0.010)
    await asyncio.sleep(0.1)
    assert sum(sum(a.received.values()) for a in agents) == received


async def test_deadline_passing_while_waiting_is_a_timeout(make_router: MakeRouter) -> None:
    router, agents = await make_router(2, policy="round-robin")
    for a in agents:
        a.freeze()
    with pytest.raises(RequestTimeout, match="before its deadline"):
        await router.request(req(request_id="t-1"), timeout=0.4)
    assert [a.received["t-1"] for a in agents] == [1, 1]  # tried, retried, then timed out


async def test_no_live_target_is_refused_with_no_route(make_router: MakeRouter) -> None:
    router, agents = await make_router(2)
    for a in agents:
        await a.set_state(AgentState.DRAINING)
    for _ in range(100):
        if all(router.state(a.agent_id).health is Health.OFFLINE for a in agents):
            break
        await asyncio.sleep(0.02)
    with pytest.raises(NoRouteError, match="a0 offline, a1 offline"):
        await router.request(req(), timeout=2.0)
    await agents[1].set_state(AgentState.ONLINE)
    for _ in range(100):
        if router.state("a1").health is Health.ADMITTED:
            break
        await asyncio.sleep(0.02)
    assert (await router.request(req(), timeout=2.0)).target.id == "a1"


async def test_hedging_sends_the_same_request_to_a_second_target_and_takes_the_first_answer(
    make_router: MakeRouter,
) -> None:
    router, agents = await make_router(2, policy="round-robin", hedge=True, hedge_delay_s=0.05)
    agents[0].delay_s = 1.0
    routed = await router.request(req(request_id="hd-1"), timeout=5.0)
    assert routed.attempts == ("a0", "a1")
    assert routed.target.id == "a1"
    assert routed.hedged
    assert agents[0].received["hd-1"] == agents[1].received["hd-1"] == 1
    assert router.state("a0").outstanding == 0  # the losing attempt was released


async def test_watch_adds_agents_that_come_online(
    broker: PrivateBroker, fleet: str, topics: Topics
) -> None:
    settings = fast_settings(broker.url, fleet)
    async with MqttClient.from_settings(settings, client_id=f"{fleet}-gw") as client:
        router = Router(Requester(client, topics), rng=random.Random(1))
        await router.watch(client, topics, add_agents=True)
        agent = await SimAgent("late", settings, topics).start()
        try:
            for _ in range(100):
                if router.targets:
                    break
                await asyncio.sleep(0.02)
            assert [t.id for t in router.targets] == ["late"]
            assert (await router.request(req(), timeout=2.0)).target.id == "late"
        finally:
            await agent.stop()
