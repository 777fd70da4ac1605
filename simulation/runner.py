"""The scenario runner behind ``edgefed simulate`` and ``edgefed demo``: prepare the models,
start the fleet, deploy v1, then run the workload, the faults, the rollouts and the sampling on
one clock, drain, and write the report.

One clock: ``t = 0`` is the moment the fleet is up and serving v1; every planned time of the
scenario (requests, faults, rollouts) is an offset from it, and every recorded time too.

**Open loop**: each request is its own task, started at its time whatever the fleet's state;
none waits for another's answer. Each ends answered or with an explicit error code:
``timeout`` (no answer within its deadline -- or within :data:`NO_DEADLINE_TIMEOUT_S` when it
has none), the error reply's code (``unavailable``, ``overloaded``, ...), ``unreachable`` (the
gateway could not be reached: the controller is down), ``interrupted`` (Ctrl-C before the
answer). After the timeline the runner waits for every request still in flight, so none is
lost. Entry at agents goes to the agent's local endpoint (see :mod:`edgefed.simulation.mapping`);
a killed agent's local requests therefore time out, as a device's own applications would.

Ctrl-C (or SIGTERM) stops the run: the fleet shuts down in order and the report of what ran so
far is written, marked interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from edgefed import __version__
from edgefed.common.devices import load_profile
from edgefed.common.errors import EdgefedError, RemoteError, RequestTimeout
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.schemas import AgentState, Heartbeat, InferenceRequest, decode
from edgefed.simulation.federation_data import FederationData, prepare_federation_data
from edgefed.simulation.fleet import Fleet
from edgefed.simulation.mapping import fleet_spec
from edgefed.simulation.prepare import PreparedModel, prepare_models
from edgefed.simulation.report import ReportFiles, write_report
from edgefed.simulation.results import (
    FaultRecord,
    FederationInfo,
    FederationRound,
    Placement,
    RequestOutcome,
    RolloutEvent,
    RunMeta,
    RunResults,
    SplitPlanRecord,
    TelemetrySample,
)
from edgefed.simulation.scenario import RolloutSpec, Scenario
from edgefed.simulation.scenario_faults import (
    CutLink,
    Fault,
    KillAgent,
    KillController,
    RestartAgent,
    RestartBroker,
    RestoreLink,
    SlowAgent,
)
from edgefed.simulation.workload import RequestSpec, build_schedule

__all__ = ["NO_DEADLINE_TIMEOUT_S", "RunOptions", "override", "run_scenario"]

NO_DEADLINE_TIMEOUT_S = 30.0
"""How long a request without a deadline is waited for before it counts as ``timeout``."""

_SAMPLE_S = 1.0
FEDERATION_GRACE_S = 300.0
"""How long the federated phase may run past the timeline before it is stopped."""
_TERMINAL = {"completed", "aborted", "rolled_back"}


@dataclass
class RunOptions:
    out_dir: Path
    cache_dir: Path | None = None
    force_tiny: bool | None = None
    """``None``: as the ``EDGEFED_SIM_TINY`` variable says."""
    mode: str | None = None
    """Override the scenario's mode (``processes`` / ``in-process``)."""
    console: Console | None = None
    fleet_root: Path | None = None
    """Where the fleet keeps state and logs (default: a temporary folder, removed after)."""


def override(
    scenario: Scenario, *, duration_s: float | None = None, rate_per_s: float | None = None
) -> Scenario:
    """The scenario with another duration (its whole timeline -- faults, rollouts, bursts,
    soaks, slowdowns, the diurnal period -- scaled to fit) and/or another base rate."""
    data = scenario.model_dump(mode="python")
    if rate_per_s is not None:
        data["workload"]["rate_per_s"] = rate_per_s
    if duration_s is not None and duration_s != scenario.duration_s:
        f = duration_s / scenario.duration_s
        data["duration_s"] = duration_s
        for fault in data["faults"]:
            fault["at_s"] *= f
            for key in ("duration_s", "down_s"):
                if fault.get(key) is not None:
                    fault[key] *= f
        for rollout in data["rollouts"]:
            rollout["at_s"] *= f
            rollout["soak_s"] *= f
        if data.get("federation") is not None:
            data["federation"]["start_at_s"] *= f
        for burst in data["workload"]["bursts"]:
            burst["at_s"] *= f
            burst["duration_s"] *= f
        diurnal = data["workload"].get("diurnal")
        if diurnal is not None:
            diurnal["phase_s"] *= f
            if diurnal.get("period_s") is not None:
                diurnal["period_s"] *= f
    return Scenario.model_validate(data)


@dataclass
class _Run:
    """What one run is recording."""

    scenario: Scenario
    fleet: Fleet
    t0: float
    policy: str
    requests: list[RequestOutcome] = field(default_factory=list)
    telemetry: list[TelemetrySample] = field(default_factory=list)
    rollouts: list[RolloutEvent] = field(default_factory=list)
    splits: list[SplitPlanRecord] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    heartbeats: dict[str, Heartbeat] = field(default_factory=dict)
    federation: list[FederationRound] = field(default_factory=list)
    federation_info: FederationInfo | None = None
    done: int = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def sleep_until(self, t_s: float) -> None:
        delay = t_s - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


class _PeakMemory:
    """Peak resident memory of this process and every process it started (sampled)."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.peak = 0

    def rss(self, pid: int | None = None) -> int | None:
        try:
            return int(psutil.Process(pid).memory_info().rss) if pid else None
        except psutil.Error:
            return None

    def sample(self) -> int:
        total = 0
        with contextlib.suppress(psutil.Error):
            procs = [self.me, *self.me.children(recursive=True)]
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += int(p.memory_info().rss)
        self.peak = max(self.peak, total)
        return total


# --------------------------------------------------------------------------- requests


def _placement(served_by: str, entry: str | None, agent_ids: dict[str, str]) -> Placement:
    if "+" in served_by:
        return "split"
    if served_by in agent_ids:
        return "edge" if agent_ids[served_by] == entry else "peer"
    return "cloud"


async def _send(run: _Run, spec: RequestSpec, http: httpx.AsyncClient) -> None:
    """One request from send to its end; always records exactly one outcome."""
    agent_names = {a.agent_id: a.name for a in run.fleet.agents.values()}
    t_sent = run.now()
    timeout = spec.deadline_ms / 1000 if spec.deadline_ms is not None else NO_DEADLINE_TIMEOUT_S
    result: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        if spec.entry_agent is None:
            result = await _via_gateway(spec, http, timeout)
        else:
            request = InferenceRequest(
                request_id=spec.request_id,
                model=spec.model,
                texts=[spec.text],
                priority=spec.priority,
                deadline=time.time() + timeout,
            )
            try:
                reply = await run.fleet.local_request(spec.entry_agent, request, timeout_s=timeout)
            except RequestTimeout:
                result = {"error": "timeout"}
            except RemoteError as exc:
                result = {"error": str(exc.code)}
            except EdgefedError as exc:
                result = {"error": type(exc).__name__}
            else:
                served = reply.message.served_by
                result = {
                    "target": agent_names.get(served, served),
                    "placement": _placement(served, spec.entry_agent, agent_names),
                    "version": reply.message.version,
                }
    except asyncio.CancelledError:
        result = {"error": "interrupted"}
        raise
    finally:
        elapsed_ms = (time.perf_counter() - started) * 1000
        if "error" not in result and "version" not in result:
            result = {"error": "interrupted"}
        run.requests.append(
            RequestOutcome(
                request_id=spec.request_id,
                t_sent_s=t_sent,
                model=spec.model,
                policy=run.policy,
                priority=spec.priority,
                entry=spec.entry_agent,
                target=result.get("target"),
                placement=result.get("placement"),
                version=result.get("version"),
                latency_ms=elapsed_ms,
                error=result.get("error"),
                deadline_ms=spec.deadline_ms,
                attempts=int(result.get("attempts", 1)),
            )
        )
        run.done += 1


_HTTP_ERRORS = {
    404: "not_found",
    422: "malformed",
    429: "overloaded",
    503: "unavailable",
    504: "timeout",
}


async def _via_gateway(
    spec: RequestSpec, http: httpx.AsyncClient, timeout: float
) -> dict[str, Any]:
    body = {
        "model": spec.model,
        "texts": [spec.text],
        "priority": spec.priority.value,
        "timeout_s": timeout,
        "request_id": spec.request_id,
    }
    try:
        # The client waits a little longer than the deadline: the gateway's 504 is the answer.
        response = await http.post("/infer", json=body, timeout=timeout + 2.0)
    except httpx.TimeoutException:
        return {"error": "timeout"}
    except httpx.HTTPError:
        return {"error": "unreachable"}
    if response.status_code != 200:
        return {"error": _HTTP_ERRORS.get(response.status_code, f"http_{response.status_code}")}
    out = response.json()
    target = str(out.get("target", ""))
    placement: Placement = "cloud" if target.startswith("pool.") else "edge"
    return {
        "target": target,
        "placement": placement,
        "version": int(out["version"]),
        "attempts": max(1, len(out.get("attempts") or [])),
    }


async def _workload(
    run: _Run, schedule: list[RequestSpec], http: httpx.AsyncClient
) -> list[asyncio.Task[None]]:
    tasks: list[asyncio.Task[None]] = []
    try:
        for spec in schedule:
            await run.sleep_until(spec.t_offset_s)
            tasks.append(asyncio.create_task(_send(run, spec, http), name=spec.request_id))
    finally:
        if tasks:
            # Drain: every request sent waits for its own end (each bounded by its deadline).
            await asyncio.gather(*tasks, return_exceptions=True)
    return tasks


# --------------------------------------------------------------------------- faults


async def _apply(run: _Run, fault: Fault) -> str:
    fleet = run.fleet
    if isinstance(fault, KillAgent):
        if fault.signal == "SIGTERM":
            await fleet.stop_agent(fault.agent)
            return "stopped gracefully (SIGTERM)"
        await fleet.kill_agent(fault.agent)
        return "killed (SIGKILL)"
    if isinstance(fault, RestartAgent):
        await fleet.restart_agent(fault.agent, wait=False)
        return "started again"
    if isinstance(fault, CutLink | RestoreLink):
        target = fault.site or fault.agent
        assert target is not None
        if isinstance(fault, CutLink):
            fleet.cut_link(target)
            return "link cut"
        fleet.restore_link(target)
        return "link restored"
    if isinstance(fault, SlowAgent):
        base = load_profile(fleet.agent(fault.agent).spec.device).speed_factor
        await fleet.slow_agent(fault.agent, base * fault.factor)
        return f"{fault.factor:g}x slower than its profile"
    if isinstance(fault, RestartBroker):
        await fleet.restart_broker(fault.down_s)
        return f"broker down {fault.down_s:g} s"
    if isinstance(fault, KillController):
        await fleet.kill_controller()
        return "controller killed"
    await fleet.restart_controller()
    return "controller started again"


def _fault_target(fault: Fault) -> str:
    site = getattr(fault, "site", None)
    if site is not None:
        return f"site:{site}"
    agent = getattr(fault, "agent", None)
    if agent is not None:
        return str(agent)
    return "broker" if fault.kind == "restart_broker" else "controller"


async def _one_fault(run: _Run, fault: Fault, planned: float, kind: str | None = None) -> None:
    t = run.now()
    try:
        detail = await _apply(run, fault) if kind is None else await _end_slowdown(run, fault)
        ok = True
    except Exception as exc:  # noqa: BLE001 - recorded: a failed injection is a finding
        detail, ok = f"{type(exc).__name__}: {exc}", False
    run.faults.append(
        FaultRecord(
            t_s=t,
            kind=kind or fault.kind,
            target=_fault_target(fault),
            planned_at_s=planned,
            ok=ok,
            detail=detail,
        )
    )


async def _end_slowdown(run: _Run, fault: Fault) -> str:
    assert isinstance(fault, SlowAgent)
    name = fault.agent
    await run.fleet.slow_agent(name, load_profile(run.fleet.agent(name).spec.device).speed_factor)
    return "back to its profile's speed"


async def _faults(run: _Run) -> None:
    """Each fault at its time. A slowdown restarts a process agent (seconds), so it runs beside
    the timeline instead of delaying the faults after it."""
    beside: list[asyncio.Task[None]] = []

    async def slow(fault: SlowAgent) -> None:
        await _one_fault(run, fault, fault.at_s)
        if fault.duration_s is not None:
            end_at = fault.at_s + fault.duration_s
            await run.sleep_until(end_at)
            await _one_fault(run, fault, end_at, kind="slow_agent_end")

    try:
        for fault in sorted(run.scenario.faults, key=lambda f: f.at_s):
            await run.sleep_until(fault.at_s)
            if isinstance(fault, SlowAgent):
                beside.append(asyncio.create_task(slow(fault)))
            else:
                await _one_fault(run, fault, fault.at_s)
        if beside:
            await asyncio.gather(*beside)
    finally:
        for task in beside:
            task.cancel()


# --------------------------------------------------------------------------- rollouts


async def _rollouts(run: _Run, prepared: dict[str, PreparedModel]) -> None:
    watchers: list[asyncio.Task[None]] = []
    try:
        for rollout in sorted(run.scenario.rollouts, key=lambda r: r.at_s):
            await run.sleep_until(rollout.at_s)
            watchers.append(asyncio.create_task(_one_rollout(run, rollout)))
        if watchers:
            await asyncio.gather(*watchers)
    finally:
        for task in watchers:
            task.cancel()


async def _one_rollout(run: _Run, rollout: RolloutSpec) -> None:
    fleet, scenario = run.fleet, run.scenario
    model = scenario.model(rollout.model).name
    spec = next(m for m in fleet.spec.models if m.name == model)
    selected = scenario.rollout_agents(rollout)
    everyone = len(selected) == len(scenario.agent_ids())

    def event(phase: str, agents: list[str] | None = None, detail: str = "") -> None:
        run.rollouts.append(
            RolloutEvent(
                t_s=run.now(),
                model=model,
                version=rollout.version,
                phase=phase,
                agents=agents or [],
                detail=detail,
            )
        )

    try:
        await fleet.publish_model(spec, rollout.version)
        strategy: dict[str, Any] = {"kind": rollout.strategy, "soak_s": rollout.soak_s}
        if rollout.strategy == "canary":
            strategy["canary_count"] = rollout.canary_size
        dep = await fleet.deploy(
            model,
            rollout.version,
            agents=None if everyone else selected,
            strategy=strategy,
            wait=False,
        )
    except EdgefedError as exc:
        event("failed", detail=f"could not start: {exc}")
        return
    names = {a.agent_id: a.name for a in fleet.agents.values()}
    status, loaded = "", set[str]()
    while True:
        try:
            current = await fleet.api("GET", f"/deployments/{dep['id']}")
        except (EdgefedError, httpx.HTTPError):  # the controller may be down: try again
            await asyncio.sleep(0.5)
            continue
        if current["status"] != status:
            status = current["status"]
            canary = [
                names.get(a["agent_id"], a["agent_id"]) for a in current["agents"] if a["canary"]
            ]
            event(status, canary if status == "canary" else [], current.get("reason") or "")
        now_loaded = {a["agent_id"] for a in current["agents"] if a["phase"] == "loaded"}
        for agent_id in sorted(now_loaded - loaded):
            event("loaded", [names.get(agent_id, agent_id)])
        loaded |= now_loaded
        if status in _TERMINAL:
            return
        await asyncio.sleep(0.5)


# --------------------------------------------------------------------------- sampling


async def _watch_heartbeats(run: _Run) -> MqttClient:
    fleet = run.fleet
    client = MqttClient.from_settings(
        fleet.settings, client_id=f"sim-telemetry-{secrets.token_hex(3)}"
    )
    await client.__aenter__()

    async def on_heartbeat(message: Message) -> None:
        with contextlib.suppress(EdgefedError, ValueError):
            beat = decode(message.payload, message.content_type, Heartbeat).message
            run.heartbeats[beat.agent_id] = beat

    await client.subscribe(f"{fleet.topics.prefix}/agents/+/heartbeat", on_heartbeat)
    return client


def _sample(run: _Run, memory: _PeakMemory) -> None:
    t = run.now()
    memory.sample()
    in_process = run.fleet.spec.mode == "in-process"
    for agent in run.fleet.agents.values():
        beat = run.heartbeats.get(agent.agent_id)
        rss = memory.rss(agent.child.pid) if agent.child is not None and agent.running else None
        versions = [m.version for m in beat.models if m.role == "full"] if beat else []
        run.telemetry.append(
            TelemetrySample(
                t_s=t,
                agent=agent.name,
                online=agent.running
                and run.fleet.statuses.get(agent.agent_id) == AgentState.ONLINE,
                load=float(sum(beat.queue_depth.values())) if beat else 0.0,
                memory_bytes=rss if not in_process else None,
                cpu_percent=beat.resources.cpu_percent if beat else None,
                served_total=sum(
                    n for per_model in beat.requests.values() for n in per_model.values()
                )
                if beat
                else None,
                model_version=max(versions) if versions else None,
            )
        )


async def _sampler(run: _Run, memory: _PeakMemory, until: float) -> None:
    while run.now() < until:
        _sample(run, memory)
        await asyncio.sleep(_SAMPLE_S)


async def _split_plans(run: _Run) -> None:
    """The placements in force over time (a record whenever one changes)."""
    fleet = run.fleet
    names = {a.agent_id: a for a in fleet.agents.values()}
    seen: dict[tuple[str, str], tuple[Any, ...]] = {}
    while True:
        with contextlib.suppress(EdgefedError, httpx.HTTPError, KeyError, TypeError):
            for entry in await fleet.api("GET", "/split/placements"):
                agent = names.get(entry["agent_id"])
                for mp in entry["placements"]:
                    p, planned = mp["placement"], mp.get("planned") or {}
                    key = (entry["agent_id"], mp["model"])
                    value = (p["mode"], p.get("split_point"))
                    if seen.get(key) == value:
                        continue
                    seen[key] = value
                    run.splits.append(
                        SplitPlanRecord(
                            t_s=run.now(),
                            agent=agent.name if agent else entry["agent_id"],
                            model=mp["model"],
                            placement=p["mode"],
                            split_k=p.get("split_point"),
                            device=planned.get("device_profile")
                            or (agent.spec.device if agent else None),
                            site=agent.spec.site if agent else None,
                            bandwidth_mbps=planned.get("bandwidth_mbps"),
                            rtt_ms=planned.get("rtt_ms"),
                            estimated_ms=p.get("expected_ms") or planned.get("expected_ms"),
                            reason=p.get("reason") or "",
                        )
                    )
        await asyncio.sleep(2.0)


# --------------------------------------------------------------------------- federation


async def _federation(run: _Run, data: FederationData | None, work: Path) -> None:
    """The federated phase: from ``start_at_s``, rounds in a worker thread (the simulation
    engine's processes, or the in-process grid) while the workload goes on; every finished
    round is recorded as it lands."""
    from edgefed.simulation.federation_sim import (
        RoundFigures,
        federation_run_config,
        run_engine,
        run_in_process,
    )

    fed = run.scenario.federation
    if fed is None or data is None:
        return
    await run.sleep_until(fed.start_at_s)
    agents = len(run.scenario.agent_ids())
    n, per_round, f = fed.num_clients(agents), fed.per_round(agents), fed.num_byzantine(agents)
    config = federation_run_config(
        data,
        work / "federation",
        strategy=fed.strategy,
        rounds=fed.rounds,
        fraction_train=per_round / n,
        min_train_nodes=per_round,
        min_valid_updates=max(1, per_round // 2),
        local_steps=fed.local_steps,
        lr=fed.lr,
        proximal_mu=fed.proximal_mu,
        seed=run.scenario.seed,
        krum_byzantine=f if fed.strategy in ("krum", "multikrum", "bulyan") else 0,
    )
    engine = "simulation-engine" if fed.engine == "simulation" else "in-process"
    started = run.now()
    info = {"engine": engine, "strategy": fed.strategy, "clients": n, "alpha": fed.alpha}
    run.federation_info = FederationInfo(**info, byzantine=f, status="running", started_s=started)

    def on_round(r: RoundFigures) -> None:
        run.federation.append(
            FederationRound(
                round=r.round,
                t_s=run.now(),
                clients=r.accepted + len(r.rejected),
                accuracy=r.eval_accuracy,
                loss=r.eval_loss,
                accepted=r.accepted,
                rejected=[f"node {x.get('node_id')}: {x.get('reason')}" for x in r.rejected],
                train_loss=r.train_loss,
                seconds=r.seconds,
            )
        )

    stop = threading.Event()
    try:
        if fed.engine == "simulation":
            outcome = await asyncio.to_thread(
                run_engine, config, num_supernodes=n, actors=1, on_round=on_round, stop=stop
            )
        else:
            outcome = await asyncio.to_thread(
                run_in_process, config, num_clients=n, byzantine=range(f), on_round=on_round
            )
        status, error, initial = outcome.status, outcome.error, outcome.initial_accuracy
    except asyncio.CancelledError:
        stop.set()
        status, error, initial = "running", "stopped at the end of the run", None
        raise
    except EdgefedError as exc:
        status, error, initial = "failed", exc.message, None
    except Exception as exc:  # noqa: BLE001 - a failed phase is a finding; the run goes on
        status, error, initial = "failed", f"{type(exc).__name__}: {exc}", None
    finally:
        run.federation_info = FederationInfo(
            **info,
            byzantine=f,
            status=status,
            error=error,
            initial_accuracy=initial,
            started_s=started,
            wall_s=run.now() - started,
        )


# --------------------------------------------------------------------------- the run


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


async def _timeline(
    run: _Run,
    prepared: dict[str, PreparedModel],
    schedule: list[RequestSpec],
    http: httpx.AsyncClient,
    memory: _PeakMemory,
    console: Console,
    federation: FederationData | None = None,
    work: Path | None = None,
) -> None:
    duration = run.scenario.duration_s
    background = [
        asyncio.create_task(_sampler(run, memory, float("inf")), name="sampler"),
    ]
    if run.fleet.spec.controller.get("split"):
        background.append(asyncio.create_task(_split_plans(run), name="split-plans"))
    main = [
        asyncio.create_task(_workload(run, schedule, http), name="workload"),
        asyncio.create_task(_faults(run), name="faults"),
        asyncio.create_task(_rollouts(run, prepared), name="rollouts"),
    ]
    fed_task: asyncio.Task[None] | None = None
    if federation is not None and work is not None:
        fed_task = asyncio.create_task(_federation(run, federation, work), name="federation")
        main.append(fed_task)
    try:
        with _progress(console) as bar:
            task = bar.add_task("run", total=duration, info="")
            drain = bar.add_task("requests", total=max(1, len(schedule)), info="")
            while not all(t.done() for t in main[:1]):
                now = min(run.now(), duration)
                errors = sum(1 for r in run.requests if r.error is not None)
                bar.update(task, completed=now, info=f"{now:5.1f}/{duration:g} s")
                bar.update(
                    drain, completed=run.done, info=f"{run.done}/{len(schedule)}, {errors} errors"
                )
                await asyncio.wait(main[:1], timeout=0.5)
            bar.update(task, completed=duration)
            bar.update(drain, completed=run.done, info=f"{run.done}/{len(schedule)} ended")
        # Rollouts and faults still running past the timeline are given a little time, then the
        # report says where they stood.
        rest = [t for t in main[1:] if t is not fed_task]
        await asyncio.wait(rest, timeout=max(5.0, 0.2 * duration))
        if fed_task is not None and not fed_task.done():
            with console.status("waiting for the federated rounds to finish..."):
                await asyncio.wait([fed_task], timeout=FEDERATION_GRACE_S)
        for t in main:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        for t in main + background:
            t.cancel()
        await asyncio.gather(*main, *background, return_exceptions=True)
        _sample(run, memory)


async def run_scenario(scenario: Scenario, options: RunOptions) -> ReportFiles:
    """Run ``scenario`` end to end and write its report into ``options.out_dir``."""
    console = options.console or Console(stderr=True)
    started = time.monotonic()
    memory = _PeakMemory()
    notes = list(scenario.not_run_notes())
    with console.status("preparing models...") as status:
        prepared = await asyncio.to_thread(
            prepare_models,
            scenario,
            cache_dir=options.cache_dir,
            force_tiny=options.force_tiny,
            progress=lambda m: status.update(f"preparing models: {m}"),
        )
    federation: FederationData | None = None
    if scenario.federation is not None:
        fed = scenario.federation
        with console.status("preparing the federated data set...") as status:
            federation = await asyncio.to_thread(
                prepare_federation_data,
                clients=fed.num_clients(len(scenario.agent_ids())),
                alpha=fed.alpha,
                seed=scenario.seed,
                cache_dir=options.cache_dir,
                progress=lambda m: status.update(f"federated data: {m}"),
            )
        notes.extend(f"federation: {n}" for n in federation.notes)
        console.print(
            f"• federation: {federation.num_clients} clients over {len(federation.labels)} "
            f"chatterbot-corpus categories (alpha {fed.alpha:g})"
            + (" (cached)" if federation.cached else "")
        )
    for p in prepared.values():
        notes.extend(p.notes)
        console.print(f"• model {p.name}: {p.kind}, {p.target}" + (" (cached)" if p.cached else ""))
    spec = fleet_spec(scenario, prepared, mode=options.mode)
    if spec.models and any(m.split_points for m in spec.models):
        notes.append(
            "split: pairs published for v1 only ("
            + "; ".join(f"{m.name} k={m.split_points}" for m in spec.models if m.split_points)
            + "); agents on a later version keep their placement's prior"
        )
    entry = "agents' local endpoints" if spec.local_endpoints else "the HTTP gateway"
    notes.append(f"requests entered at {entry}")
    schedule = build_schedule(scenario)
    console.print(
        f"• fleet: {len(spec.agents)} agents ({spec.mode}), "
        f"{sum(p.workers for p in spec.pools)} cloud workers, {len(schedule)} requests planned "
        f"over {scenario.duration_s:g} s"
    )
    run: _Run | None = None
    interrupted = False
    try:
        with console.status("starting the fleet (broker, controller, workers, agents)..."):
            fleet_cm = Fleet(spec, root=options.fleet_root, keep=options.fleet_root is not None)
            fleet = await fleet_cm.__aenter__()
        try:
            run = _Run(scenario, fleet, time.monotonic(), scenario.routing.policy)
            beats = await _watch_heartbeats(run)
            try:
                async with httpx.AsyncClient(
                    base_url=f"{fleet.controller_url}/api/v1",
                    headers={"Authorization": f"Bearer {fleet.admin_token}"},
                ) as http:
                    run.t0 = time.monotonic()
                    with tempfile.TemporaryDirectory(prefix="edgefed-fl-") as fl_work:
                        await _timeline(
                            run,
                            prepared,
                            schedule,
                            http,
                            memory,
                            console,
                            federation,
                            Path(fl_work),
                        )
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(beats.aclose(), 5.0)
        finally:
            with console.status("stopping the fleet..."):
                await fleet_cm.__aexit__(None, None, None)
    except (asyncio.CancelledError, KeyboardInterrupt):
        interrupted = True
        notes.append("interrupted (Ctrl-C): the report covers what ran until then")
    finally:
        memory.sample()
    results = RunResults(
        meta=RunMeta(
            scenario=scenario.name,
            seed=scenario.seed,
            duration_s=scenario.duration_s,
            wall_s=time.monotonic() - started,
            peak_memory_bytes=memory.peak,
            agents=len(spec.agents),
            mode=spec.mode,
            policy=scenario.routing.policy,
            host=platform.node(),
            edgefed_version=__version__,
            notes=notes,
        ),
        requests=sorted(run.requests, key=lambda r: r.t_sent_s) if run else [],
        telemetry=run.telemetry if run else [],
        rollouts=run.rollouts if run else [],
        splits=run.splits if run else [],
        faults=sorted(run.faults, key=lambda f: f.t_s) if run else [],
        federation=run.federation if run else [],
        federation_info=run.federation_info if run else None,
    )
    files = write_report(results, options.out_dir, console=console)
    console.print(f"report: [bold]{files.html}[/bold] (figures in {files.json})")
    if interrupted:
        raise KeyboardInterrupt
    return files
