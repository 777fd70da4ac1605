"""The job spec is one contract: what the API accepts and stores is what the worker turns into
the pipeline's config, field for field; a row that does not fit it fails readably."""

from __future__ import annotations

from pathlib import Path

from edgefed.cloud.api.schemas import CompressionJobSpec, DistillIn, GateIn, StudentIn
from edgefed.cloud.compress.config import DistillSettings, GateThresholds, StudentSpec
from edgefed.cloud.jobs.worker import compression_config, job_work_dir, run_job
from edgefed.cloud.registry.models import Job, JobStatus

from .conftest import FAST_JOB, Registry


def test_the_api_job_fields_are_pipeline_fields_with_the_same_defaults() -> None:
    for api, pipeline in ((DistillIn, DistillSettings), (StudentIn, StudentSpec)):
        for name, field in api.model_fields.items():
            assert name in pipeline.model_fields, (
                f"{api.__name__}.{name} is unknown to the pipeline"
            )
            assert field.get_default() == pipeline.model_fields[name].get_default(), name
    assert set(GateIn.model_fields) == set(GateThresholds.model_fields)


def test_a_stored_spec_becomes_the_pipeline_config(tmp_path: Path) -> None:
    spec = CompressionJobSpec.model_validate(
        {
            "model": "enc",
            "task": "feature-extraction",
            "teacher_dir": "/models/enc",
            **FAST_JOB,
            "targets": ["x86-avx2", "fp32"],
            "student": {"layers": [0, 3]},
        }
    )
    stored = spec.model_dump(mode="json")
    again = CompressionJobSpec.model_validate(stored)
    assert again == spec

    config = compression_config(
        again, job_id=7, version=3, store=tmp_path, signing_key=tmp_path / "k"
    )

    assert config.teacher_dir == Path("/models/enc")
    assert config.name == "enc"
    assert config.version == 3
    assert config.targets == ("x86-avx2", "fp32")
    assert config.student == StudentSpec(layers=(0, 3))
    assert config.distill.max_steps == FAST_JOB["distill"]["max_steps"]
    assert config.distill.checkpoint_every == FAST_JOB["distill"]["checkpoint_every"]
    assert config.distill.checkpoint_dir == job_work_dir(tmp_path, "enc", 7) / "checkpoints"
    assert config.gate == GateThresholds(minimums={"cosine_mean": -1.0})
    assert (config.eval_examples, config.latency_repeats, config.max_examples) == (16, 3, 80)
    assert config.signing_key == tmp_path / "k"
    assert config.out_dir == tmp_path


def test_a_job_row_that_does_not_fit_the_spec_fails_with_the_reason(registry: Registry) -> None:
    with registry.sessions.begin() as session:
        job = Job(
            kind="compression",
            status=JobStatus.RUNNING,
            spec={"model": "enc", "targets": ["fp32"], "student": {"width": 3}},
            progress={},
            attempts=1,
            cancel_requested=False,
        )
        session.add(job)
        session.flush()
        job_id = job.id

    code = run_job(registry.sessions, job_id, registry.store, registry.signing_key)

    assert code == 1
    row = registry.job(job_id)
    assert row.status == JobStatus.FAILED
    assert row.error is not None
    assert row.error.startswith("the job's spec is not valid")
    assert "student.width" in row.error
    assert "teacher_dir" in row.error
