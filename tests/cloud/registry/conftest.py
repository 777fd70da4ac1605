"""Databases for the registry's tests: a fresh SQLite file always, and a fresh PostgreSQL
database when ``EDGEFED_TEST_POSTGRES_URL`` names a server (e.g.
``postgresql://postgres@127.0.0.1/test``; the user must be allowed to create databases)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

POSTGRES_ENV = "EDGEFED_TEST_POSTGRES_URL"


def _postgres_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server at ``server_url``; dropped afterwards."""
    server = make_url(server_url).set(drivername="postgresql")
    name = f"edgefed_test_{uuid.uuid4().hex[:12]}"
    admin_dsn = server.render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgresql",
            marks=pytest.mark.skipif(
                not os.environ.get(POSTGRES_ENV),
                reason=f"set {POSTGRES_ENV} to a PostgreSQL server to run this case",
            ),
        ),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of a fresh, empty database of each supported kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    yield from _postgres_database(os.environ[POSTGRES_ENV])
