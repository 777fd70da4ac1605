"""The fleet's input refuses what cannot run, naming the field; emulated compute waits out
the device's factor; the watchdog stops what a dead harness left behind."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
from pydantic import ValidationError

from edgefed.common.serving.service import Batcher
from edgefed.simulation.fleet_spec import AgentSpec, FleetSpec, ModelSpec, PoolSpec
from edgefed.simulation.linkproxy import LinkProfile


def test_an_unknown_device_profile_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValidationError, match=r"agents\.0\.device[\s\S]*raspberry-pi-5"):
        FleetSpec.model_validate({"agents": [{"name": "a", "device": "pi-9000"}]})


def test_a_fleet_refuses_repeated_names_and_links_to_nowhere() -> None:
    with pytest.raises(ValidationError, match="unique: a repeat"):
        FleetSpec(agents=[AgentSpec(name="a"), AgentSpec(name="a")])
    with pytest.raises(ValidationError, match="sites no agent is at: mars"):
        FleetSpec(agents=[AgentSpec(name="a")], links={"mars": LinkProfile(delay_ms=600)})
    with pytest.raises(ValidationError, match="extra"):
        FleetSpec.model_validate({"agents": [], "agnets": []})


def test_a_pool_needs_models_and_a_model_needs_an_exported_folder(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="pool default has workers but no model"):
        FleetSpec(pools=[PoolSpec(workers=1)])
    with pytest.raises(ValidationError, match=r"holds no model\.onnx"):
        ModelSpec(name="m", source=tmp_path)


class SleepyModel:
    """A served model whose run takes a known, measured time."""

    name = "sleepy"
    version = 1

    def __init__(self) -> None:
        self.ran_s: list[float] = []

    def run_text_batch(
        self, batch: Sequence[tuple[Sequence[str], Mapping[str, Any]]]
    ) -> list[list[dict[str, Any]]]:
        started = time.monotonic()
        time.sleep(0.02)
        self.ran_s.append(time.monotonic() - started)
        return [[{"ok": True}] for _ in batch]

    def run_tensors(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


async def test_emulated_compute_runs_the_model_then_waits_out_the_factor() -> None:
    model = SleepyModel()
    async with Batcher(max_batch_size=1, slowdown=4.0) as batcher:
        result = await batcher.submit(model, texts=["x"])
    assert len(model.ran_s) == 1  # the model really ran, once
    assert result.compute_s >= 4.0 * model.ran_s[0] - 0.002  # timer granularity
    with pytest.raises(ValueError, match="slowdown"):
        Batcher(slowdown=0)


def test_the_watchdog_stops_registered_groups_when_its_pipe_closes() -> None:
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "edgefed.simulation.watchdog", "0.5"], stdin=subprocess.PIPE
    )
    assert watchdog.stdin is not None
    watchdog.stdin.write(f"+{sleeper.pid}\n+0\n".encode())  # 0 (its own group) is ignored
    watchdog.stdin.close()  # what a harness's death looks like from here
    assert watchdog.wait(30) == 0
    assert sleeper.wait(30) == -15  # SIGTERM
    assert psutil.pid_exists(watchdog.pid) is False
