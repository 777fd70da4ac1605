"""The registry's Alembic migrations against real databases (an SQLite file; PostgreSQL when
EDGEFED_TEST_POSTGRES_URL is set): they build exactly the tables the code uses, run twice
without harm, refuse a database written by a newer edgefed, and the rows round-trip."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

from edgefed.cloud.registry.db import (
    MigrationError,
    as_utc,
    current_revision,
    head_revision,
    make_engine,
    make_sessionmaker,
    migrate,
    session_scope,
)
from edgefed.cloud.registry.models import (
    Agent,
    ApiToken,
    Artifact,
    AuditRecord,
    Base,
    Job,
    JobStatus,
    Model,
    ModelVersion,
)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def _differences(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def test_upgrade_to_head_gives_exactly_the_models_tables(engine: Engine) -> None:
    assert current_revision(engine) is None
    migrate(engine)
    assert current_revision(engine) == head_revision()
    assert _differences(engine) == []
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= tables


def test_migrating_twice_is_a_no_op_and_keeps_data(engine: Engine) -> None:
    migrate(engine)
    with session_scope(make_sessionmaker(engine)) as session:
        session.add(Model(name="kept", task="feature-extraction", teacher_dir="/t"))
    migrate(engine)
    assert current_revision(engine) == head_revision()
    assert _differences(engine) == []
    with session_scope(make_sessionmaker(engine)) as session:
        assert session.scalars(select(Model.name)).all() == ["kept"]


def test_a_database_from_a_newer_edgefed_is_refused_untouched(engine: Engine) -> None:
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(MigrationError, match=r"9999_future.*newer edgefed"):
        migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == (
            "9999_future"
        )


def test_registry_rows_round_trip(engine: Engine) -> None:
    migrate(engine)
    writes = make_sessionmaker(engine, immediate=True)
    expires = datetime.now(UTC) + timedelta(hours=1)
    with session_scope(writes) as session:
        model = Model(name="minilm", task="feature-extraction", teacher_dir="/models/minilm")
        session.add(model)
        session.flush()
        job = Job(kind="compression", status=JobStatus.QUEUED, spec={"targets": ["x86-avx2"]})
        session.add(job)
        session.flush()
        version = ModelVersion(model_id=model.id, version=1, job_id=job.id, note="first")
        session.add(version)
        session.flush()
        session.add(
            Artifact(
                version_id=version.id,
                target="x86-avx2",
                path="minilm/v1/x86-avx2",
                manifest_sha256="ab" * 32,
                size_bytes=5 * 2**32,  # beyond 32 bits: BigInteger
                metrics={"cosine": 0.93, "p50_ms": 4.5},
            )
        )
        session.add(
            Agent(id="agent-1", fleet="f", hostname="pi", labels={"site": "lab", "arch": "arm"})
        )
        session.flush()
        session.add(
            ApiToken(
                name="agent:agent-1",
                token_hash="cd" * 32,
                scopes=["agent"],
                agent_id="agent-1",
                expires_at=expires,
            )
        )
        session.add(AuditRecord(actor="a#1", action="POST /x", outcome=201, detail={"k": [1]}))

    with session_scope(make_sessionmaker(engine)) as session:
        model = session.scalars(select(Model).where(Model.name == "minilm")).one()
        (version,) = model.versions
        assert (version.version, version.note, version.job_id) == (1, "first", job.id)
        (artifact,) = version.artifacts
        assert artifact.size_bytes == 5 * 2**32
        assert artifact.metrics == {"cosine": 0.93, "p50_ms": 4.5}
        agent = session.get(Agent, "agent-1")
        assert agent is not None
        assert agent.labels == {"site": "lab", "arch": "arm"}
        assert agent.state == "unknown"
        assert agent.desired_generation == 0
        token = session.scalars(select(ApiToken)).one()
        assert token.scopes == ["agent"]
        stored = as_utc(token.expires_at)
        assert stored is not None
        assert abs((stored - expires).total_seconds()) < 1e-3
        job_row = session.get(Job, job.id)
        assert job_row is not None
        assert job_row.status is JobStatus.QUEUED

    # Constraints hold: a second v1 of the same model is refused, deleting the agent
    # deletes its token (ON DELETE CASCADE, foreign keys are on for SQLite too).
    with pytest.raises(IntegrityError), session_scope(writes) as session:
        session.add(ModelVersion(model_id=model.id, version=1))
    with session_scope(writes) as session:
        session.execute(text("DELETE FROM agents WHERE id = 'agent-1'"))
    with session_scope(make_sessionmaker(engine)) as session:
        assert session.scalars(select(ApiToken)).all() == []
