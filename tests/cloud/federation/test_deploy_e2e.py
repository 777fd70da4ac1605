"""The real deployment engine on loopback, end to end: a run started through
``POST /api/v1/federation/runs`` is submitted by the federation service with ``flwr run`` to the
controller's SuperLink, two agent-side SuperNodes train a tiny BERT classifier on their own
JSONL data with the real edgefed ClientApp, the real ServerApp aggregates (FedAvg, update
validation, server-side evaluation) for 2 rounds, the run ends ``succeeded`` with the
aggregated HF model directory in its out-dir, and the closed loop turns it into a new signed,
registered version through a real compression job (export + quantize, no distillation, the
quality gate) run by the controller's job supervisor in its worker process.

Each Flower message starts a fresh ClientApp process that imports torch, so this is slow
(about a minute); the waits are generous and nothing is timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from edgefed.cloud.api.app import create_app
from edgefed.cloud.federation.closed_loop import LoopSettings
from edgefed.cloud.federation.runs import FlowerRunner
from edgefed.cloud.federation.service import FederationService, Promotion
from edgefed.cloud.federation.superlink import SuperLinkSupervisor
from edgefed.cloud.jobs.supervisor import JobSupervisor
from edgefed.cloud.registry.models import ModelVersion
from edgefed.cloud.settings import load_cloud_settings
from edgefed.common.artifact import verify
from edgefed.edge.config import TrainingConfig
from edgefed.edge.training.supernode import SuperNodeSupervisor
from tests.cloud.api.conftest import bearer
from tests.cloud.federation.test_deploy_engine import Ticker, activated, wait_for
from tests.training import tiny

pytestmark = pytest.mark.integration
DONE = ("registered", "rolling-out", "not-promoted", "failed")


def write_jsonl(path: Path, n: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps({"text": e.text, "label": e.label}) + "\n"
            for e in tiny.colour_examples(n, seed=seed)
        )
    )
    return path


@pytest.mark.timeout(420)
def test_a_federated_run_through_the_api_ends_with_a_new_model(tmp_path: Path) -> None:
    model_dir = tiny.save("text-classification", tmp_path / "student")
    eval_data = write_jsonl(tmp_path / "eval.jsonl", 16, seed=99)
    settings = load_cloud_settings(
        broker_url="mqtt://127.0.0.1:1883",
        fleet="fede2e",
        controller={"data_dir": tmp_path / "ctl", "federation": {"enabled": True, "port": 0}},
    )
    fed = settings.controller.federation
    superlink = SuperLinkSupervisor(fed, settings.controller.data_dir)
    nodes: list[SuperNodeSupervisor] = []
    with TestClient(create_app(settings)) as client:
        token = (tmp_path / "ctl" / "admin.token").read_text().strip()
        state = client.app.state.controller  # type: ignore[attr-defined]
        try:
            superlink.start()
            for i in range(2):
                write_jsonl(tmp_path / f"agent{i}" / "data" / "train.jsonl", 12, seed=i)
                cfg = TrainingConfig(
                    enabled=True,
                    data_dir=tmp_path / f"agent{i}" / "data",
                    superlink=superlink.address,
                    insecure=True,
                )
                node = SuperNodeSupervisor(cfg, tmp_path / f"agent{i}")
                node.start()
                nodes.append(node)
            wait_for("both SuperNodes to be activated", lambda: activated(superlink) >= 2)
            jobs = JobSupervisor(
                state.write_sessions,
                database_url=settings.controller.resolved_database_url,
                store=state.artifact_store,
                signing_key=settings.controller.resolved_signing_key,
                workers=1,
                log_dir=tmp_path / "ctl" / "jobs",
                poll_s=0.3,
            )
            service = FederationService(
                state.write_sessions,
                runner=FlowerRunner(superlink.env),
                data_dir=settings.controller.data_dir,
                superlink=superlink,
                lookup_s=10.0,
                promotion=Promotion(
                    LoopSettings(eval_examples=16, latency_repeats=3),
                    settings.fleet,
                    jobs=jobs,
                ),
            )
            client.app.state.services.federation = service  # type: ignore[attr-defined]
            r = client.post(
                "/api/v1/models",
                json={"name": "tiny", "task": "text-classification", "teacher_dir": str(model_dir)},
                headers=bearer(token),
            )
            assert r.status_code == 201, r.text
            with Ticker(service), Ticker(jobs):
                r = client.post(
                    "/api/v1/federation/runs",
                    json={
                        "model": "tiny",
                        "strategy": "fedavg",
                        "rounds": 2,
                        "min_nodes": 2,
                        "eval_data": str(eval_data),
                        "training": {"lr": 0.01, "local_steps": 2, "batch_size": 4},
                        "validation": {"min_valid_updates": 2},
                    },
                    headers=bearer(token),
                )
                assert r.status_code == 202, r.text
                run_id = r.json()["id"]

                def finished() -> bool:
                    got = client.get(f"/api/v1/federation/runs/{run_id}", headers=bearer(token))
                    body = got.json()
                    if body["status"] in ("queued", "running"):
                        return False
                    return body["status"] != "succeeded" or body["loop"].get("stage") in DONE

                wait_for("the federated run and its closed loop", finished, timeout=360)
            run = client.get(f"/api/v1/federation/runs/{run_id}", headers=bearer(token)).json()
        finally:
            for node in nodes:
                node.stop()
            superlink.stop()
    assert run["status"] == "succeeded", (run["error"], run["progress"])
    rounds = run["progress"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["accepted"] == 2 and r["rejected"] == [] for r in rounds)
    assert all(r["eval_accuracy"] is not None for r in rounds)
    out_model = Path(run["result"]["model_dir"])
    assert out_model == tmp_path / "ctl" / "federation" / "runs" / str(run_id) / "model"
    assert (out_model / "config.json").is_file()
    assert (out_model / "tokenizer.json").is_file()
    # The closed loop: the model was never deployed, so the new version is registered (signed,
    # through the quality gate) and waits for a deployment.
    loop = run["loop"]
    assert loop["stage"] == "registered", loop
    assert loop["version"] == 1
    assert "never deployed" in loop["reason"]
    with state.sessions() as session:
        version = session.scalars(select(ModelVersion).where(ModelVersion.version == 1)).one()
        assert [a.target for a in version.artifacts] == ["x86-avx2"]
        artifact_dir = state.artifact_store / version.artifacts[0].path
    verify(artifact_dir, state.signing_key.verify_key)
