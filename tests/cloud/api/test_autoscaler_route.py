"""GET /api/v1/autoscaler: a reader sees each autoscaled pool's last sample, decisions (newest
first, with reasons) and vertical hints; a controller without autoscaling says so. The service
behind it is the real one, fed worker load reports by hand (no broker needed here)."""

from __future__ import annotations

import asyncio

from edgefed.cloud.orchestration.pool_monitor import PoolMonitor
from edgefed.cloud.orchestration.service import AutoscaleService
from edgefed.cloud.orchestration.signals import AutoscalerSettings
from edgefed.common.mqtt import MqttClient
from edgefed.common.schemas import WorkerLoad
from edgefed.common.settings import load_settings
from edgefed.common.topics import Topics
from tests.cloud.api.conftest import Api, bearer


def fed_service() -> AutoscaleService:
    client = MqttClient.from_settings(
        load_settings(broker_url="mqtt://127.0.0.1:1", fleet="f"), client_id="unused"
    )
    monitor = PoolMonitor(client, Topics("f"))
    for i in range(30):  # enough usage samples for a vertical hint
        monitor.add(
            WorkerLoad(
                worker_id="w1",
                pool="gpu",
                seq=i,
                interval_s=60.0,
                arrivals=600,
                completed=600,
                queue_depth=30,
                p95_ms=450.0,
                cpu_cores=0.8 + i / 100,
                rss_bytes=300_000_000,
                ready=True,
            )
        )
    settings = AutoscalerSettings(min_replicas=1, max_replicas=5, slo_p95_ms=150.0)
    return AutoscaleService({"gpu": settings}, monitor, None)


def test_a_reader_sees_the_pools_decisions_with_their_reasons_and_hints(api: Api) -> None:
    service = fed_service()
    asyncio.run(service.step("gpu"))
    api.app.state.services.autoscaler = service
    _, reader = api.token("reader")

    r = api.client.get("/api/v1/autoscaler", headers=bearer(reader))

    assert r.status_code == 200, r.text
    body = r.json()
    assert body["enabled"] is True
    assert body["applying"] is False  # no scaler: recommend-only
    (pool,) = body["pools"]
    assert pool["pool"] == "gpu"
    assert pool["mode"] == "reactive"
    assert pool["current_replicas"] is None
    assert pool["sample"]["ready_replicas"] == 1
    assert pool["sample"]["queue_depth"] == 30
    assert pool["sample"]["p95_ms"] == 450.0
    (decision,) = pool["decisions"]
    assert decision["replicas"] == 5  # queue and p95 both far above target, capped at max
    assert decision["reason"]
    assert decision["inputs"]["queue_depth"] == 30.0
    assert pool["resources"]["cpu_request"].endswith("m")
    assert pool["resources"]["memory_request"].endswith("Mi")


def test_a_pool_filter_and_a_controller_without_autoscaling(api: Api) -> None:
    _, reader = api.token("reader")
    off = api.client.get("/api/v1/autoscaler", headers=bearer(reader))
    api.app.state.services.autoscaler = fed_service()

    other = api.client.get("/api/v1/autoscaler?pool=cpu", headers=bearer(reader))
    bad = api.client.get("/api/v1/autoscaler?pool=no/such", headers=bearer(reader))

    assert off.json() == {"enabled": False, "applying": False, "pools": []}
    assert other.json()["pools"] == []
    assert bad.status_code == 422
