"""A worker pool's ``autoscale:`` section in a scenario file: the controller's autoscaler
settings, checked as strictly as the rest of the file (file:line errors), mapped onto the
fleet the harness starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefed.simulation.mapping import fleet_spec
from edgefed.simulation.prepare import PreparedModel
from edgefed.simulation.scenario import ScenarioError, load_scenario

SCENARIO = """\
name: scaled
duration_s: 60
sites:
  lab: {}
fleet:
  - {name: nuc, device: x86-nuc, site: lab}
models:
  - {name: enc, builtin: tiny}
cloud:
  workers:
    - pool: default
      count: 1
      autoscale:
        mode: reactive
        min_replicas: 1
        max_replicas: 4
        interval_s: 5
        slo_p95_ms: 80
        scale_down_stabilization_s: 30
workload:
  rate_per_s: 4
  entry: gateway
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    return str(info.value)


def test_an_autoscale_section_reaches_the_fleets_pool(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, SCENARIO))
    source = tmp_path / "enc"
    source.mkdir()
    (source / "model.onnx").write_bytes(b"")
    (source / "config.json").write_text("{}")
    prepared = {
        "enc": PreparedModel(
            name="enc",
            task="feature-extraction",
            kind="tiny",
            source=source,
            target="x86-avx2",
            hf_dir=None,
            layers=None,
            cached=True,
        )
    }

    (pool,) = fleet_spec(scenario, prepared).pools

    assert pool.workers == 1
    assert pool.autoscale is not None
    assert pool.autoscale.max_replicas == 4
    assert pool.autoscale.slo_p95_ms == 80
    assert pool.autoscale.target_queue_per_replica == 4.0  # the controller's default


def test_a_typo_in_autoscale_names_the_file_the_line_and_the_field(tmp_path: Path) -> None:
    text = SCENARIO.replace("slo_p95_ms: 80", "slo_p59_ms: 80")

    msg = error_of(tmp_path, text)

    line = line_of(text, "slo_p59_ms")
    assert f"s.yaml:{line}: cloud.workers[0].autoscale.slo_p59_ms: unknown field" in msg


def test_min_above_max_is_refused_at_the_autoscale_section(tmp_path: Path) -> None:
    text = SCENARIO.replace("min_replicas: 1", "min_replicas: 6")

    msg = error_of(tmp_path, text)

    assert "cloud.workers[0].autoscale" in msg
    assert "min_replicas (6) is above max_replicas (4)" in msg


def test_an_autoscaled_pool_of_no_workers_is_refused(tmp_path: Path) -> None:
    text = SCENARIO.replace("count: 1", "count: 0").replace("min_replicas: 1", "min_replicas: 0")

    msg = error_of(tmp_path, text)

    assert f"s.yaml:{line_of(text, 'pool: default')}" in msg
    assert "an autoscaled pool of count 0 needs min_replicas >= 1" in msg
