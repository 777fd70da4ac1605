"""The federation's closed loop on a real registry: a finished run becomes a compression job
(distillation off, the federated model as teacher), then a canary deployment that follows the
model's latest deployment. The compression job itself is the worker's (tested with the real
pipeline in tests/cloud/jobs and end to end in tests/cloud/federation); here its outcome is
written into the job row as the worker writes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from edgefed.cloud.federation.closed_loop import LoopSettings, advance
from edgefed.cloud.registry.models import (
    AgentPhase,
    Deployment,
    DeploymentAgent,
    DeploymentStatus,
    Job,
    JobStatus,
    Model,
)

from .conftest import MODEL, TARGET, Cloud

SETTINGS = LoopSettings(canary_count=1, soak_s=5)


def fl_model_dir(tmp_path: Path) -> Path:
    model_dir = tmp_path / "run" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    return model_dir


def step(cloud: Cloud, loop: dict[str, Any], model_dir: Path, **progress: Any) -> dict[str, Any]:
    with cloud.sessions() as s:
        state = advance(
            s,
            loop,
            model_name=MODEL,
            model_dir=model_dir,
            progress=progress,
            settings=SETTINGS,
            fleet=cloud.settings.fleet,
            actor="federation:1",
        )
        s.commit()
    return state


def finish_job(cloud: Cloud, job_id: int, version: int | None, *, ok: bool = True) -> None:
    """What the compression worker writes when it is done (and registers the version)."""
    if ok and version is not None:
        cloud.publish_version(version)
    with cloud.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        if ok:
            job.status = JobStatus.SUCCEEDED
            job.result = {"version": version, "published": [TARGET], "refused": {}}
        else:
            job.status = JobStatus.FAILED
            job.error = "ONNX export does not match torch"
        s.commit()


def deployed_v1(cloud: Cloud, *agents: str) -> None:
    for agent_id in agents:
        cloud.enrol(agent_id, site="a")
    with cloud.sessions() as s:
        model = s.scalars(select(Model).where(Model.name == MODEL)).one()
        s.add(
            Deployment(
                model_id=model.id,
                version=1,
                target=TARGET,
                selector={"labels": {"site": "a"}},
                strategy={"kind": "all_at_once"},
                status=DeploymentStatus.COMPLETED,
                agents=[
                    DeploymentAgent(agent_id=a, canary=False, phase=AgentPhase.LOADED)
                    for a in agents
                ],
            )
        )
        s.commit()


def test_a_run_becomes_a_compression_job_then_a_canary_of_the_new_version(
    cloud: Cloud, tmp_path: Path
) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    deployed_v1(cloud, "a1", "a2", "a3")
    model_dir = fl_model_dir(tmp_path)

    loop = step(
        cloud, {}, model_dir, initial_eval_accuracy=0.5, rounds=[{"round": 2, "eval_accuracy": 0.6}]
    )
    assert loop["stage"] == "compressing"
    with cloud.sessions() as s:
        job = s.get(Job, loop["job_id"])
        assert job is not None
        assert job.status == JobStatus.QUEUED
        assert job.spec["distill"]["enabled"] is False
        assert job.spec["teacher_dir"] == str(model_dir)
        assert job.spec["targets"] == [TARGET]
        assert job.spec["model"] == MODEL

    assert step(cloud, loop, model_dir) == loop  # the job is still queued: nothing moves

    finish_job(cloud, loop["job_id"], 2)
    loop = step(cloud, loop, model_dir)
    assert loop["stage"] == "rolling-out"
    assert loop["version"] == 2
    dep = cloud.deployment(loop["deployment_id"])
    assert dep.version == 2
    assert dep.status == DeploymentStatus.PENDING
    assert dep.strategy["kind"] == "canary"
    assert dep.strategy["canary_count"] == 1
    assert dep.selector == {"labels": {"site": "a"}}
    assert sorted(a.agent_id for a in dep.agents) == ["a1", "a2", "a3"]
    assert step(cloud, loop, model_dir) == loop  # done: the rollout engine owns the rest


def test_a_model_never_deployed_is_registered_without_a_rollout(
    cloud: Cloud, tmp_path: Path
) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    model_dir = fl_model_dir(tmp_path)
    loop = step(cloud, {}, model_dir)
    finish_job(cloud, loop["job_id"], 2)
    loop = step(cloud, loop, model_dir)
    assert loop["stage"] == "registered"
    assert "never deployed" in loop["reason"]
    assert cloud.count(Deployment) == 0
    assert 2 in cloud.versions()


def test_a_model_that_got_worse_is_not_promoted(cloud: Cloud, tmp_path: Path) -> None:
    cloud.add_model()
    loop = step(
        cloud,
        {},
        fl_model_dir(tmp_path),
        initial_eval_accuracy=0.81,
        rounds=[{"round": 1, "eval_accuracy": 0.7}, {"round": 2, "eval_accuracy": 0.62}],
    )
    assert loop["stage"] == "not-promoted"
    assert "0.8100" in loop["reason"]
    assert "0.6200" in loop["reason"]
    assert cloud.count(Job) == 0


def test_a_failed_compression_ends_the_loop_with_its_reason(cloud: Cloud, tmp_path: Path) -> None:
    cloud.add_model()
    model_dir = fl_model_dir(tmp_path)
    loop = step(cloud, {}, model_dir)
    finish_job(cloud, loop["job_id"], None, ok=False)
    loop = step(cloud, loop, model_dir)
    assert loop["stage"] == "failed"
    assert "does not match torch" in loop["reason"]
    assert cloud.count(Deployment) == 0


def test_a_run_without_a_model_directory_fails_the_loop(cloud: Cloud, tmp_path: Path) -> None:
    cloud.add_model()
    loop = step(cloud, {}, tmp_path / "nothing-here")
    assert loop["stage"] == "failed"
    assert "no model" in loop["reason"]
    assert cloud.count(Job) == 0
