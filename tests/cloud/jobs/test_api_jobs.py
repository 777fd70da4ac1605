"""Compression jobs through the control API of a real controller app (SQLite registry in a
temporary data directory) whose job supervisor runs as an asyncio task, starting real worker
processes: a job is watched from queued to succeeded and its signed version appears in the
model's versions; a quality gate that refuses every target fails the job with its reason; a
running job is cancelled and leaves nothing behind; bad requests are refused before anything
is queued."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefed.cloud.api.app import create_app
from edgefed.cloud.jobs.supervisor import JobSupervisor, _alive
from edgefed.cloud.keys import load_or_create_signing_key
from edgefed.cloud.registry.db import make_engine, make_sessionmaker
from edgefed.cloud.services import Services
from edgefed.cloud.settings import load_cloud_settings
from edgefed.common.artifact import load_verify_key, verify

from .conftest import FAST_JOB, LONG_DISTILL, run_as_task, wait_for

FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class Controller:
    client: TestClient
    headers: dict[str, str]
    data_dir: Path
    store: Path

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.client.post(f"/api/v1{path}", json=body, headers=self.headers)

    def get(self, path: str) -> Any:
        return self.client.get(f"/api/v1{path}", headers=self.headers)

    def job(self, job_id: int) -> dict[str, Any]:
        response = self.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def register(self, name: str, teacher: Path) -> None:
        response = self.post(
            "/models",
            {"name": name, "task": "feature-extraction", "teacher_dir": str(teacher)},
        )
        assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    data_dir = tmp_path_factory.mktemp("controller")
    settings = load_cloud_settings(
        broker_url="mqtt://127.0.0.1:1883", fleet="jobtest", controller={"data_dir": data_dir}
    )
    ctl = settings.controller
    load_or_create_signing_key(ctl.resolved_signing_key)
    engine = make_engine(ctl.resolved_database_url)
    supervisor = JobSupervisor(
        make_sessionmaker(engine),
        database_url=ctl.resolved_database_url,
        store=ctl.resolved_artifact_store,
        signing_key=ctl.resolved_signing_key,
        workers=2,
        log_dir=data_dir / "logs",
        poll_s=0.2,
    )
    app = create_app(settings, services=Services(jobs=supervisor))
    with TestClient(app) as client:  # the lifespan migrates the registry, writes admin.token
        token = (data_dir / "admin.token").read_text().strip()
        with run_as_task(supervisor):
            yield Controller(
                client,
                {"Authorization": f"Bearer {token}"},
                data_dir,
                ctl.resolved_artifact_store,
            )
        leftover = [
            j
            for j in client.get(
                "/api/v1/jobs?status=running", headers={"Authorization": f"Bearer {token}"}
            ).json()
        ]
    for job in leftover:  # a failed test must not leave workers behind
        if job["worker_pid"] and _alive(job["worker_pid"], job["id"]):
            os.kill(job["worker_pid"], signal.SIGKILL)
    engine.dispose()


def test_a_job_runs_with_progress_and_publishes_a_signed_version(
    controller: Controller, teacher_dir: Path
) -> None:
    controller.register("tiny-enc", teacher_dir)

    created = controller.post("/jobs/compression", {"model": "tiny-enc", **FAST_JOB})
    strict = controller.post(
        "/jobs/compression",
        {
            "model": "tiny-enc",
            **FAST_JOB,
            "targets": ["fp32", "x86-avx2"],
            "gate": {"minimums": {"cosine_mean": 1.5}},
        },
    )

    assert created.status_code == 202, created.text
    assert strict.status_code == 202, strict.text
    job = created.json()
    assert job["status"] == "queued"
    assert job["kind"] == "compression"
    assert job["spec"]["task"] == "feature-extraction"
    assert job["spec"]["teacher_dir"] == str(teacher_dir.resolve())
    seen: list[dict[str, Any]] = []

    def poll() -> dict[str, Any]:
        seen.append(controller.job(job["id"]))
        return seen[-1]

    done = wait_for(poll, lambda j: j["status"] in FINISHED)
    log = (controller.data_dir / "logs" / f"job-{job['id']}.log").read_text()
    assert done["status"] == "succeeded", (done["error"], log)
    running = [j for j in seen if j["status"] == "running"]
    assert running, "the job was never seen running"
    assert any(j["progress"].get("step") and j["worker_pid"] for j in running)
    assert all(j["progress"].get("version") in (None, 1) for j in running)
    assert done["worker_pid"] is None
    assert done["error"] is None
    assert done["attempts"] == 1
    assert done["progress"]["step"] == "done"
    assert done["progress"]["distill_step"] >= 1
    assert done["result"]["version"] == 1
    assert done["result"]["published"] == ["x86-avx2"]
    assert done["result"]["distillation"]["steps"] == 12
    assert done["finished_at"] >= done["started_at"] >= done["created_at"]

    detail = controller.get("/models/tiny-enc").json()
    assert detail["versions"] == [1]
    (version,) = detail["version_details"]
    assert version["job_id"] == job["id"]
    (artifact,) = version["artifacts"]
    assert artifact["target"] == "x86-avx2"
    assert artifact["metrics"]["quality.cosine_mean"] == pytest.approx(
        done["result"]["reports"]["x86-avx2"]["quality.cosine_mean"]
    )
    assert "latency.speedup_b1" in artifact["metrics"]
    assert artifact["url"].endswith("/api/v1/artifacts/tiny-enc/v1/x86-avx2")
    controller_key = load_verify_key(controller.data_dir / "signing.pub")
    manifest = verify(controller.store / "tiny-enc" / "v1" / "x86-avx2", controller_key)
    assert (manifest.name, manifest.version, manifest.target) == ("tiny-enc", 1, "x86-avx2")

    # The second job (same model, queued alongside) was refused by its gate on every target.
    refused = wait_for(
        lambda: controller.job(strict.json()["id"]), lambda j: j["status"] in FINISHED
    )
    assert refused["status"] == "failed"
    assert refused["error"].startswith("every target was refused by the quality gate: fp32:")
    assert "fp32: below the quality gate: cosine_mean" in refused["error"]
    assert "x86-avx2: below the quality gate: cosine_mean" in refused["error"]
    assert "< 1.5000" in refused["error"]
    assert refused["result"]["published"] == []
    assert set(refused["result"]["refused"]) == {"fp32", "x86-avx2"}
    assert "quality.cosine_mean" in refused["result"]["reports"]["fp32"]
    assert refused["result"]["version"] == 2
    assert controller.get("/models/tiny-enc").json()["versions"] == [1]
    assert not (controller.store / "tiny-enc" / "v2").exists()


def test_a_running_job_is_cancelled_and_leaves_nothing_behind(
    controller: Controller, teacher_dir: Path
) -> None:
    controller.register("tiny-cancel", teacher_dir)
    created = controller.post(
        "/jobs/compression",
        {
            "model": "tiny-cancel",
            **FAST_JOB,
            "targets": ["fp32"],
            "distill": {**LONG_DISTILL, "time_budget_s": 300},
        },
    )
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    running = wait_for(
        lambda: controller.job(job_id),
        lambda j: j["status"] in FINISHED or j["progress"].get("distill_step", 0) >= 1,
    )
    assert running["status"] == "running", running
    pid = running["worker_pid"]
    assert pid is not None
    assert _alive(pid, job_id)

    answer = controller.post(f"/jobs/{job_id}/cancel", {})

    assert answer.status_code == 202, answer.text
    assert answer.json()["cancel_requested"] is True
    done = wait_for(lambda: controller.job(job_id), lambda j: j["status"] in FINISHED)
    assert done["status"] == "cancelled", done
    assert done["error"] == "cancelled on request"
    assert done["worker_pid"] is None
    assert done["finished_at"] is not None
    wait_for(lambda: _alive(pid, job_id), lambda alive: not alive, timeout_s=15)
    assert controller.get("/models/tiny-cancel").json()["versions"] == []
    assert not (controller.store / "tiny-cancel").exists()
    assert not [p for p in (controller.store / ".work").glob("tiny-cancel-*")]
    again = controller.post(f"/jobs/{job_id}/cancel", {})
    assert again.status_code == 409
    assert "already finished (cancelled)" in again.json()["detail"]


def test_bad_requests_are_refused_and_nothing_is_queued(
    controller: Controller, teacher_dir: Path, own_teacher: Path
) -> None:
    controller.register("tiny-bad", teacher_dir)
    controller.register("tiny-gone", own_teacher)
    for child in own_teacher.iterdir():
        child.unlink()
    own_teacher.rmdir()
    before = controller.get("/jobs?limit=1000").json()
    base = {"model": "tiny-bad", **FAST_JOB}
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({**base, "model": "nope"}, 404, "no model named 'nope'"),
        ({**base, "targets": ["quantum-9000"]}, 422, "unknown targets quantum-9000"),
        ({**base, "model": "tiny-gone"}, 422, "no longer exists"),
        ({**base, "student": {"depth": 9}}, 422, "more than the teacher's 4 layers"),
        ({**base, "student": {"layers": [0, 7]}}, 422, "layers [7] are outside"),
        ({**base, "student": {"layers": [2, 1]}}, 422, "strictly increasing"),
        ({**base, "student": {"layers": []}}, 422, "at least one layer"),
        ({**base, "student": {"depth": 2, "layers": [0]}}, 422, "either layers or depth"),
        ({**base, "student": {"depth": 0}}, 422, "depth"),
        ({**base, "distill": {"batch_size": 0}}, 422, "batch_size"),
        ({**base, "distill": {"lr": 0.1}}, 422, "lr"),
        ({**base, "targets": []}, 422, "targets"),
        ({**base, "gate": {"minimums": {"cosine_mean": "high"}}}, 422, "cosine_mean"),
        ({**base, "data": "/no/such/file.jsonl"}, 422, "must be an absolute path that exists"),
        ({**base, "data": "relative.txt"}, 422, "must be an absolute path"),
    ]
    for body, code, message in cases:
        response = controller.post("/jobs/compression", body)
        assert response.status_code == code, (body, response.text)
        assert message in response.json()["detail"], (body, response.text)
    assert controller.get("/jobs?limit=1000").json() == before
    assert controller.get("/jobs/999999").status_code == 404
    assert controller.post("/jobs/999999/cancel", {}).status_code == 404
