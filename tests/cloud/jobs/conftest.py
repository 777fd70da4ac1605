"""Fixtures for compression jobs: a tiny 4-layer BERT teacher (built from a config, seconds), a
controller registry (real SQLite file, migrated) with its signing key and artifact store, and
helpers to run the real job supervisor (which starts real worker processes)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from edgefed.cloud.api.schemas import CompressionJobSpec
from edgefed.cloud.jobs.supervisor import JobSupervisor
from edgefed.cloud.keys import load_or_create_signing_key
from edgefed.cloud.registry.db import make_engine, make_sessionmaker, migrate
from edgefed.cloud.registry.models import Job, JobStatus, Model
from tests.compress.tiny_teachers import save_model

FINISHED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}

#: Fast enough for tests: a few distillation steps on 80 examples of the built-in corpus, a
#: small validation set, few latency repeats, and a gate a tiny random model always passes.
FAST_JOB: dict[str, Any] = {
    "targets": ["x86-avx2"],
    "student": {"depth": 2},
    "distill": {
        "max_steps": 12,
        "batch_size": 8,
        "max_length": 32,
        "eval_every": 6,
        "patience": 3,
        "checkpoint_every": 6,
    },
    "gate": {"minimums": {"cosine_mean": -1.0}},
    "max_examples": 80,
    "eval_examples": 16,
    "latency_repeats": 3,
}

#: Distillation that runs until it is stopped (or for at most ``time_budget_s`` of training).
LONG_DISTILL: dict[str, Any] = {
    "max_steps": 1_000_000,
    "batch_size": 8,
    "max_length": 32,
    "eval_every": 5,
    "patience": 1000,
    "checkpoint_every": 2,
}


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 4-layer BERT sentence encoder with the real MiniLM tokenizer (do not modify)."""
    return save_model("bert", tmp_path_factory.mktemp("teacher") / "tiny-bert")


@pytest.fixture
def own_teacher(teacher_dir: Path, tmp_path: Path) -> Path:
    """A copy of the teacher this test may delete."""
    return Path(shutil.copytree(teacher_dir, tmp_path / "own-teacher"))


@dataclass
class Registry:
    """A controller's registry, store and signing key on disk, without the API."""

    url: str
    engine: Engine
    sessions: sessionmaker[Session]
    store: Path
    signing_key: Path
    log_dir: Path

    def supervisor(self, **kw: Any) -> JobSupervisor:
        return JobSupervisor(
            self.sessions,
            database_url=self.url,
            store=self.store,
            signing_key=self.signing_key,
            log_dir=self.log_dir,
            **{"poll_s": 0.1, **kw},
        )

    def add_model(self, name: str, teacher: Path, task: str = "feature-extraction") -> None:
        with self.sessions.begin() as session:
            session.add(Model(name=name, task=task, teacher_dir=str(teacher)))

    def add_job(
        self, model: str, teacher: Path, *, cancel_requested: bool = False, **overrides: Any
    ) -> int:
        """A queued compression job, its spec written as the API writes it."""
        body = {**FAST_JOB, **overrides}
        spec = CompressionJobSpec(
            model=model, task="feature-extraction", teacher_dir=str(teacher), **body
        )
        with self.sessions.begin() as session:
            job = Job(
                kind="compression",
                status=JobStatus.QUEUED,
                spec=spec.model_dump(mode="json"),
                progress={},
                attempts=0,
                cancel_requested=cancel_requested,
            )
            session.add(job)
            session.flush()
            return job.id

    def job(self, job_id: int) -> Job:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def log(self, job_id: int) -> str:
        path = self.log_dir / f"job-{job_id}.log"
        return path.read_text(errors="replace") if path.exists() else "(no log)"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    url = f"sqlite:///{tmp_path / 'controller.db'}"
    engine = make_engine(url)
    migrate(engine)
    key = tmp_path / "signing.key"
    load_or_create_signing_key(key)
    store = tmp_path / "artifacts"
    store.mkdir()
    # Write transactions take SQLite's lock at BEGIN, as the controller's do.
    sessions = make_sessionmaker(engine, immediate=True)
    yield Registry(url, engine, sessions, store, key, tmp_path / "logs")
    engine.dispose()


def wait_for(
    what: Callable[[], Any], condition: Callable[[Any], bool], *, timeout_s: float = 90.0
) -> Any:
    """Poll ``what()`` until ``condition`` holds for its value; the last value otherwise fails."""
    deadline = time.monotonic() + timeout_s
    value = what()
    while not condition(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached; last value: {value!r}")
        time.sleep(0.1)
        value = what()
    return value


def tick_until_finished(
    supervisor: JobSupervisor, registry: Registry, job_id: int, *, timeout_s: float = 90.0
) -> Job:
    """Drive ``supervisor`` (as its run loop would) until the job has finished."""

    def step() -> Job:
        supervisor.tick()
        return registry.job(job_id)

    job: Job = wait_for(step, lambda j: j.status in FINISHED, timeout_s=timeout_s)
    return job


@contextlib.contextmanager
def run_as_task(supervisor: JobSupervisor) -> Iterator[None]:
    """``supervisor.run()`` as an asyncio task on an event loop of its own thread (as
    ``edgefed cloud serve`` runs it), cancelled at the end."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    tasks: list[asyncio.Task[None]] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        tasks.append(loop.create_task(supervisor.run()))
        started.set()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(tasks[0])
        loop.close()

    thread = threading.Thread(target=main, name="job-supervisor", daemon=True)
    thread.start()
    started.wait()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(tasks[0].cancel)
        thread.join(30)
        assert not thread.is_alive()
