"""A scenario as a fleet: :class:`~edgefed.simulation.scenario.Scenario` plus its prepared models
become the :class:`~edgefed.simulation.fleet_spec.FleetSpec` the harness starts.

* agents: one per fleet group member, named ``<group>-<i>`` (the scenario's ids), with the
  group's device profile, site and labels;
* links: each site's uplink profile (every agent there gets proxies of its own with it);
* pools: the scenario's worker pools (the pool's device profile is not emulated: cloud workers
  run at this host's speed, which ``cloud-cpu`` stands for), with their ``autoscale`` settings;
* models: the prepared ONNX folders (:mod:`edgefed.simulation.prepare`), served for the target
  :func:`~edgefed.simulation.prepare.serving_target` chose;
* ``routing.split: auto``: split pairs at :func:`split_points` of each model are published
  (``edgefed split publish``), the pools serve the tails, and the controller's split placement
  (``[controller.split]``) is on for every model, planning from the links agents measure;
* ``workload.entry: agents``: requests enter at the agents' local endpoints (one loopback
  mosquitto stands in for the devices' brokers), where each agent's router places them on
  itself, a pool or split, with the scenario's policy; ``entry: gateway``: at the controller's
  ``POST /api/v1/infer``, routed with the same policy.
"""

from __future__ import annotations

from typing import Any

from edgefed.simulation.fleet_spec import AgentSpec, FleetSpec, ModelSpec, PoolSpec
from edgefed.simulation.prepare import PreparedModel
from edgefed.simulation.scenario import Scenario

__all__ = ["fleet_spec", "split_points"]


def split_points(layers: int | None) -> list[int]:
    """A couple of split points for a model of ``layers`` layers (a third and two thirds of the
    way, deduplicated); none for a model with fewer than 2 layers or of unknown depth."""
    if layers is None or layers < 2:
        return []
    return sorted({max(1, layers // 3), max(1, (2 * layers) // 3)} - {layers})


def fleet_spec(
    scenario: Scenario,
    models: dict[str, PreparedModel],
    *,
    fleet: str | None = None,
    mode: str | None = None,
) -> FleetSpec:
    """The fleet of ``scenario`` (``mode`` overrides the scenario's)."""
    split = scenario.routing.split == "auto"
    pools = [
        PoolSpec(name=w.pool, workers=w.count, autoscale=w.autoscale)
        for w in scenario.cloud.workers
    ]
    serving_pools = [p.name for p in pools if p.workers > 0]
    model_specs = []
    for m in scenario.models:
        prepared = models[m.name]
        points = split_points(prepared.layers) if split and prepared.hf_dir is not None else []
        model_specs.append(
            ModelSpec(
                name=m.name,
                source=prepared.source,
                task=m.task,
                target=prepared.target,
                split_points=points if serving_pools else [],
                split_source=prepared.hf_dir if points and serving_pools else None,
            )
        )
    controller: dict[str, Any] = {
        "routing_policy": scenario.routing.policy,
        "gateway_pools": serving_pools or ["default"],
    }
    placed = [m for m in model_specs if m.split_points]
    if placed:
        controller["split"] = {
            "enabled": True,
            "models": {m.name: {"pool": serving_pools[0]} for m in placed},
        }
    sites = {g.site for g in scenario.fleet}
    data: dict[str, Any] = {
        "mode": mode or scenario.mode,
        "agents": [
            AgentSpec(name=agent, device=group.device, site=group.site, labels=group.labels)
            for agent, group in scenario.agents()
        ],
        "links": {name: site.uplink for name, site in scenario.sites.items() if name in sites},
        "pools": pools,
        "models": model_specs,
        "seed": scenario.seed,
        "local_endpoints": scenario.workload.entry == "agents",
        "offload": {
            "enabled": bool(serving_pools),
            "pools": serving_pools,
            "policy": scenario.routing.policy,
            "retries": scenario.routing.retries,
            "hedge": scenario.routing.hedge,
        },
        "controller": controller,
    }
    if fleet is not None:
        data["fleet"] = fleet
    return FleetSpec(**data)
