"""The controller (``edgefed cloud serve``'s ``controller()``, in process) with
``[controller.autoscaler.POOL]`` and no Kubernetes: it monitors the pool's workers and shows its
decisions at ``GET /api/v1/autoscaler`` as recommendations (nothing to resize with). Real
mosquitto, a real in-process worker, the real control API."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefed.cloud.serve import controller
from edgefed.cloud.settings import load_cloud_settings
from edgefed.common.artifact import SigningKey
from edgefed.common.broker import PrivateBroker
from tests.cloud.worker.test_worker_pool import store, worker_settings, workers
from tests.conftest import fast_settings

__all__ = ["store"]  # the module-scoped fixture of the worker tests: tiny signed artifacts

pytestmark = pytest.mark.timeout(120)


async def test_the_controller_recommends_sizes_for_an_autoscaled_pool_without_kubernetes(
    broker: PrivateBroker,
    fleet: str,
    store: tuple[Path, SigningKey],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings = load_cloud_settings(
        broker_url=broker.url,
        fleet=fleet,
        mqtt=fast_settings(broker.url, fleet).mqtt.model_dump(),
        controller={
            "data_dir": tmp_path / "ctl",
            "port": 0,
            "autoscaler": {"gpu-a": {"min_replicas": 2, "max_replicas": 4, "interval_s": 0.3}},
        },
    )
    worker = worker_settings(broker, fleet, store[0], load_report_s=0.1, metrics_port=None)
    body: dict[str, Any] = {}
    async with controller(settings) as running, workers(worker, 1) as (state,):
        token = running.state.admin_token_file.read_text().strip()
        async with httpx.AsyncClient(
            base_url=running.url, headers={"Authorization": f"Bearer {token}"}, trust_env=False
        ) as http:
            deadline = time.monotonic() + 30
            while True:
                body = (await http.get("/api/v1/autoscaler")).json()
                sample = body["pools"][0]["sample"] if body.get("pools") else None
                if sample is not None and sample["ready_replicas"] == 1:
                    break
                assert time.monotonic() < deadline, f"the worker never showed up: {body}"
                await asyncio.sleep(0.1)
    assert body["enabled"] is True
    assert body["applying"] is False
    (pool,) = body["pools"]
    assert pool["pool"] == "gpu-a"
    assert pool["current_replicas"] is None
    assert pool["decisions"][0]["replicas"] == 2  # min_replicas, recommended
    assert state.worker_id
    assert "there is no scaler" in caplog.text
