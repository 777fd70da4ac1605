"""What a fleet is made of: the input of :class:`edgefed.simulation.fleet.Fleet`.

Deliberately small and explicit, so that a scenario file (or a test) maps onto it field by
field: agents with a device profile and a site, one link profile per site, cloud worker pools,
and the models to publish and deploy (exported ONNX folders, signed here with the controller's
own key).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgefed.cloud.orchestration.signals import AutoscalerSettings
from edgefed.common.devices import UnknownDeviceProfile, load_profile
from edgefed.common.schemas import Identifier
from edgefed.simulation.linkproxy import LinkProfile

Task = Literal["feature-extraction", "text-classification", "text-generation"]
Mode = Literal["processes", "in-process"]


class AgentSpec(BaseModel):
    """One emulated device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Identifier
    """The harness's handle for the agent (the controller assigns the agent id at join)."""
    device: str = "reference"
    """A device profile (:mod:`edgefed.common.devices`); its speed factor slows the agent."""
    site: Identifier = "default"
    """Agents of a site share a link profile (each still has a proxy of its own)."""
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        try:
            load_profile(value)
        except UnknownDeviceProfile as exc:  # its message names the known profiles
            raise ValueError(exc.message) from None
        return value


class PoolSpec(BaseModel):
    """Cloud workers that share one pool's requests."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Identifier = "default"
    workers: int = Field(default=1, ge=0, le=64)
    models: list[Identifier] | None = None
    """Model names the workers serve (None: every model of the fleet)."""
    autoscale: AutoscalerSettings | None = None
    """Resize the pool with the controller's autoscaler (run by the harness, starting and
    stopping worker processes); ``workers`` is then the starting size."""


class ModelSpec(BaseModel):
    """A model published (signed with the controller's key) and deployed at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Identifier
    source: Path
    """An exported model folder: ``model.onnx``, ``config.json`` and the tokenizer files (any
    manifest in it is replaced: the fleet's controller signs its own artifacts)."""
    task: Task = "feature-extraction"
    version: int = Field(default=1, ge=1)
    target: Identifier = "x86-avx2"
    deploy: bool = True
    """Deploy to every agent at start-up (all at once)."""
    split_points: list[int] = Field(default_factory=list)
    """Split points to publish for the first version (``edgefed split publish``: head and tail
    pairs, the reference profile); the pools serving the model also serve the tails."""
    split_source: Path | None = None
    """The Hugging Face model directory the split pairs are cut from (needed with
    ``split_points``: the exported ONNX folder cannot be re-cut)."""

    @model_validator(mode="after")
    def _split_needs_source(self) -> ModelSpec:
        if self.split_points and self.split_source is None:
            raise ValueError("split_points need split_source (the Hugging Face model directory)")
        return self

    @field_validator("source")
    @classmethod
    def _exported_folder(cls, value: Path) -> Path:
        if not (value / "model.onnx").is_file():
            raise ValueError(f"{value} holds no model.onnx: not an exported model folder")
        if not (value / "config.json").is_file():
            raise ValueError(f"{value} holds no config.json: not an exported model folder")
        return value.resolve()


class FleetSpec(BaseModel):
    """A whole fleet on one machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fleet: Identifier = Field(default_factory=lambda: f"sim-{secrets.token_hex(3)}")
    """The MQTT topic prefix and the controller's fleet name."""
    mode: Mode = "processes"
    """``processes``: every agent is an ``edgefed edge run`` process; ``in-process``: agents
    are :class:`edgefed.edge.agent.Agent` objects on the harness's event loop (large fleets)."""
    agents: list[AgentSpec] = Field(default_factory=list, max_length=10_000)
    links: dict[str, LinkProfile] = Field(default_factory=dict)
    """Site name -> the link between its agents and the cloud (missing: an unshaped link)."""
    pools: list[PoolSpec] = Field(default_factory=list)
    models: list[ModelSpec] = Field(default_factory=list)
    heartbeat_s: float = Field(default=1.0, gt=0)
    telemetry_s: float = Field(default=2.0, gt=0)
    seed: int | None = None
    """Seeds the link proxies' jitter and loss."""
    local_endpoints: bool = False
    """Agents also serve local applications on a broker on their device (one loopback
    mosquitto stands in for every device's, not behind any link proxy);
    :meth:`Fleet.local_request` sends there, as an application on the device would."""
    offload: dict[str, Any] = Field(default_factory=dict)
    """The agents' ``offload`` settings (:class:`edgefed.edge.config.OffloadConfig` fields)."""
    controller: dict[str, Any] = Field(default_factory=dict)
    """Controller settings (``[controller]`` keys such as ``routing_policy`` or ``split``),
    handed to ``edgefed cloud serve`` as ``EDGEFED_CONTROLLER__KEY`` variables."""

    @model_validator(mode="after")
    def _consistent(self) -> FleetSpec:
        names = [a.name for a in self.agents]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"agent names must be unique: {', '.join(dupes)} repeat")
        sites = {a.site for a in self.agents}
        unknown_links = sorted(set(self.links) - sites)
        if unknown_links:
            raise ValueError(f"links name sites no agent is at: {', '.join(unknown_links)}")
        models = [m.name for m in self.models]
        if len(set(models)) != len(models):
            raise ValueError("model names must be unique")
        pools = [p.name for p in self.pools]
        if len(set(pools)) != len(pools):
            raise ValueError("pool names must be unique")
        for pool in self.pools:
            missing = sorted(set(pool.models or []) - set(models))
            if missing:
                raise ValueError(f"pool {pool.name} serves unknown models: {', '.join(missing)}")
            if pool.workers and not (pool.models if pool.models is not None else models):
                raise ValueError(f"pool {pool.name} has workers but no model to serve")
        return self

    def link(self, site: str) -> LinkProfile:
        return self.links.get(site, LinkProfile())

    def pool_models(self, pool: PoolSpec) -> list[str]:
        """The models a pool's workers serve: its whole models, then the split tails of those
        models (``<model>.k<k>.tail``)."""
        names = list(pool.models) if pool.models is not None else [m.name for m in self.models]
        tails = [
            f"{m.name}.k{k}.tail" for m in self.models if m.name in names for k in m.split_points
        ]
        return names + tails
