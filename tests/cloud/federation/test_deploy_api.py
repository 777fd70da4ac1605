"""``/api/v1/federation`` and ``edgefed fl``: runs are validated before anything is queued (clear
422s, 404 for an unknown model), audited, listed, read with their progress per round, stopped
(409 once finished); the CLI talks to a real served controller. No Flower here: the rows are
what the federation service picks up (``test_deploy_engine.py`` runs them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from edgefed.cli import app as cli_app
from edgefed.cloud.api.app import create_app
from edgefed.cloud.federation.service import run_config
from edgefed.cloud.registry.models import AuditRecord, FederationRun, FederationRunStatus
from edgefed.cloud.settings import load_cloud_settings
from tests.cloud.api.conftest import ServedApp, bearer, loopback_socket


def model_dir(folder: Path, *, tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str, Path]]:
    root = tmp_path_factory.mktemp("fedapi")
    settings = load_cloud_settings(
        broker_url="mqtt://127.0.0.1:1883", fleet="fedapi", controller={"data_dir": root / "c"}
    )
    with TestClient(create_app(settings)) as client:
        token = (root / "c" / "admin.token").read_text().strip()
        teacher = model_dir(root / "teacher")
        r = client.post(
            "/api/v1/models",
            json={"name": "tiny", "task": "text-classification", "teacher_dir": str(teacher)},
            headers=bearer(token),
        )
        assert r.status_code == 201, r.text
        yield client, token, root


def post(client: TestClient, token: str, **body: Any) -> Any:
    return client.post(
        "/api/v1/federation/runs", json={"model": "tiny", **body}, headers=bearer(token)
    )


def test_a_run_is_queued_with_its_settings_and_audited(
    ctl: tuple[TestClient, str, Path],
) -> None:
    client, token, root = ctl
    eval_data = root / "eval.jsonl"
    eval_data.write_text('{"text": "a", "label": 0}\n')
    r = post(
        client,
        token,
        strategy="krum",
        rounds=2,
        min_nodes=5,
        krum_byzantine=1,
        eval_data=str(eval_data),
        training={"lr": 0.001, "train_mode": "head", "local_steps": 3},
        validation={"max_update_norm": 10.0, "min_valid_updates": 3},
        dp={"noise_multiplier": 0.5, "clipping_norm": 2.0},
    )
    assert r.status_code == 202, r.text
    run = r.json()
    assert run["status"] == "queued"
    assert run["model"] == "tiny"
    assert run["spec"]["model_dir"] == str((root / "teacher").resolve())
    config = run_config(run["spec"])
    assert config["num-rounds"] == 2
    assert config["min-train-nodes"] == 5
    assert config["strategy"] == "krum"
    assert config["krum-byzantine"] == 1
    assert config["train-mode"] == "head"
    assert config["lr"] == 0.001
    assert config["max-update-norm"] == 10.0
    assert config["min-valid-updates"] == 3
    assert config["dp-noise-multiplier"] == 0.5
    assert config["dp-clipping-norm"] == 2.0
    assert config["eval-data"] == str(eval_data.resolve())
    assert "model" not in config
    assert "root-data" not in config

    listed = client.get("/api/v1/federation/runs", headers=bearer(token)).json()
    assert run["id"] in [x["id"] for x in listed]
    one = client.get(f"/api/v1/federation/runs/{run['id']}", headers=bearer(token))
    assert one.status_code == 200
    assert one.json()["spec"]["strategy"] == "krum"
    state = client.app.state.controller  # type: ignore[attr-defined]
    with state.sessions() as session:
        actions = [a.resource for a in session.scalars(select(AuditRecord))]
    assert f"federation-run:{run['id']}" in actions


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "nope"}, 404, "no model named 'nope'"),
        ({"strategy": "fedsomething"}, 422, "strategy"),
        ({"strategy": "fltrust"}, 422, "fltrust needs root_data"),
        ({"strategy": "fedprox"}, 422, "proximal_mu"),
        ({"strategy": "krum", "min_nodes": 3, "krum_byzantine": 1}, 422, "at least 5"),
        ({"rounds": 0}, 422, "rounds"),
        ({"training": {"lr": "nan"}}, 422, "lr"),
        ({"training": {"train_mode": "everything"}}, 422, "train_mode"),
        ({"validation": {"min_valid_updates": 3}, "min_nodes": 2}, 422, "no round could pass"),
        ({"eval_data": "/no/such/file.jsonl"}, 422, "eval_data '/no/such/file.jsonl'"),
        ({"model_dir": "relative/dir"}, 422, "absolute path of an HF model directory"),
        ({"surprise": 1}, 422, "surprise"),
    ],
)
def test_bad_runs_are_refused_with_a_clear_reason_and_nothing_queued(
    ctl: tuple[TestClient, str, Path], body: dict[str, Any], status: int, words: str
) -> None:
    client, token, _ = ctl
    state = client.app.state.controller  # type: ignore[attr-defined]
    with state.sessions() as session:
        before = len(session.scalars(select(FederationRun)).all())
    r = client.post(
        "/api/v1/federation/runs", json={"model": "tiny", **body}, headers=bearer(token)
    )
    assert r.status_code == status, r.text
    assert words in r.text
    with state.sessions() as session:
        assert len(session.scalars(select(FederationRun)).all()) == before


def test_a_model_dir_without_tokenizer_is_refused(ctl: tuple[TestClient, str, Path]) -> None:
    client, token, root = ctl
    bare = model_dir(root / "bare", tokenizer=False)
    r = post(client, token, model_dir=str(bare))
    assert r.status_code == 422
    assert "tokenizer.json" in r.text


def test_stop_a_queued_run_then_409_and_404_and_reader_cannot_start(
    ctl: tuple[TestClient, str, Path],
) -> None:
    client, token, _ = ctl
    run_id = post(client, token).json()["id"]
    r = client.post(f"/api/v1/federation/runs/{run_id}/stop", headers=bearer(token))
    assert r.status_code == 202
    assert r.json()["status"] == "stopped"
    assert r.json()["error"].startswith("stopped by")
    again = client.post(f"/api/v1/federation/runs/{run_id}/stop", headers=bearer(token))
    assert again.status_code == 409
    assert "already finished (stopped)" in again.text
    missing = client.get("/api/v1/federation/runs/999999", headers=bearer(token))
    assert missing.status_code == 404
    assert "no federated run with id 999999" in missing.text

    made = client.post(
        "/api/v1/tokens", json={"name": "r", "scopes": ["reader"]}, headers=bearer(token)
    ).json()["token"]
    assert post(client, made).status_code == 403
    assert client.get("/api/v1/federation/runs", headers=bearer(made)).status_code == 200


def test_cli_start_status_stop_against_a_served_controller(tmp_path: Path) -> None:
    sock = loopback_socket()
    port = sock.getsockname()[1]
    data_dir = tmp_path / "c"
    settings = load_cloud_settings(
        broker_url="mqtt://127.0.0.1:1883",
        fleet="fedcli",
        controller={"data_dir": data_dir, "port": port},
    )
    teacher = model_dir(tmp_path / "teacher")
    runner = CliRunner()
    with ServedApp(create_app(settings), sock) as served:
        token = (data_dir / "admin.token").read_text().strip()
        import httpx

        httpx.post(
            f"{served.url}/api/v1/models",
            json={"name": "tiny", "task": "text-classification", "teacher_dir": str(teacher)},
            headers=bearer(token),
        ).raise_for_status()
        env = {"EDGEFED_CONTROLLER_URL": served.url, "EDGEFED_TOKEN": token}
        started = runner.invoke(
            cli_app,
            ["fl", "start", "--model", "tiny", "--strategy", "fedmedian", "--rounds", "2"],
            env=env,
        )
        assert started.exit_code == 0, started.output
        run_id = int(started.stdout.strip().splitlines()[0])

        # progress as the service copies it from the ServerApp
        state = served.server.config.app.state.controller  # type: ignore[attr-defined]
        with state.write_sessions.begin() as session:
            run = session.get(FederationRun, run_id)
            run.status = FederationRunStatus.RUNNING
            run.progress = {
                "status": "running",
                "num_rounds": 2,
                "rounds": [
                    {
                        "round": 1,
                        "accepted": 2,
                        "rejected": [{"node_id": 77, "reason": "update has NaN in w"}],
                        "train_loss": 0.5,
                        "eval_loss": 0.6,
                        "eval_accuracy": 0.75,
                        "seconds": 3.0,
                    }
                ],
            }
        shown = runner.invoke(cli_app, ["fl", "status", str(run_id)], env=env)
        assert shown.exit_code == 0, shown.output
        assert "running" in shown.stdout
        assert "fedmedian" in shown.stdout
        assert "update has NaN in w" in shown.stdout
        assert "0.7500" in shown.stdout
        listed = runner.invoke(cli_app, ["fl", "status"], env=env)
        assert listed.exit_code == 0
        assert "1/2" in listed.stdout

        stopped = runner.invoke(cli_app, ["fl", "stop", str(run_id)], env=env)
        assert stopped.exit_code == 0
        assert "stop requested" in stopped.stdout
        refused = runner.invoke(cli_app, ["fl", "start", "--model", "nope"], env=env)
        assert refused.exit_code != 0
        assert "no model named 'nope'" in str(refused.exception)
