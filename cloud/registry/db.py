"""Engines, sessions and migrations of the registry.

SQLite (a file in the controller's data directory) is the default; PostgreSQL is used by URL
(``postgresql://`` is taken to mean the psycopg 3 driver). Nothing here runs at import: the
controller builds its engine in the app's lifespan.

SQLite notes: foreign keys are switched on for every connection, the journal is WAL (readers
never block the writer), and transactions really begin at ``BEGIN`` (pysqlite would otherwise
start them only at the first write, so a read-then-write request would not be isolated);
sessions made for writing begin with ``BEGIN IMMEDIATE``. A write that still cannot get the
lock fails with ``database is locked``, which the API answers with 503 and ``Retry-After`` --
never a half-written row.

Migrations are Alembic scripts shipped inside the package (``migrations/``); :func:`migrate`
runs them programmatically, without an ``alembic.ini``, so it works from a wheel.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import Session, sessionmaker

from edgefed.common.errors import PermanentError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
"""Alembic's script location: ``env.py`` and ``versions/`` inside this package."""

IMMEDIATE_OPTION = "edgefed_sqlite_immediate"
"""Execution option: on SQLite, take the write lock at BEGIN (see :func:`make_sessionmaker`)."""

SQLITE_BUSY_TIMEOUT_S = 15.0
"""How long an SQLite connection waits for the write lock before giving up."""


def normalize_url(url: str | URL) -> URL:
    """``url`` as SQLAlchemy should see it: ``postgresql://`` and ``postgres://`` use psycopg 3."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (see the module docstring).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(IMMEDIATE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """An engine for ``url``: SQLite file (WAL, foreign keys on) or PostgreSQL (psycopg 3).

    The parent folder of an SQLite file is created when missing.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
        )
        _sqlite_setup(engine)
        return engine
    return create_engine(parsed, echo=echo, pool_pre_ping=True)


def make_sessionmaker(engine: Engine, *, immediate: bool = False) -> sessionmaker[Session]:
    """Sessions on ``engine``; objects stay readable after commit (responses are built then).

    ``immediate``: for transactions that will write. On SQLite they take the write lock at
    ``BEGIN IMMEDIATE`` (waiting for it up to the busy timeout), so a transaction that reads
    first and writes later never fails because another one committed in between; writers are
    serialised, as SQLite serialises them anyway. Ignored on PostgreSQL.
    """
    bind = engine.execution_options(**{IMMEDIATE_OPTION: True}) if immediate else engine
    return sessionmaker(bind=bind, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: committed when the block ends normally, rolled back when it raises."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(connection: Connection | None = None, url: str | URL | None = None) -> Config:
    """Alembic's configuration built in code (no ``alembic.ini``): the packaged scripts, and
    either an open ``connection`` or a database ``url``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        rendered = normalize_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


class MigrationError(PermanentError):
    """The database cannot be brought to this version's schema (the message says why)."""

    exit_code = 78  # EX_CONFIG


def migrate(url: str | URL | Engine, revision: str = "head") -> None:
    """Bring the database at ``url`` (or behind an engine) to ``revision`` (Alembic upgrade).

    Idempotent: a database already at ``revision`` is left alone. A database at a revision
    this version of edgefed does not ship (written by a newer edgefed) raises
    :class:`MigrationError` and is not touched.
    """
    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config(connection)
            known = {s.revision for s in ScriptDirectory.from_config(config).walk_revisions()}
            current = MigrationContext.configure(connection).get_current_heads()
            unknown = sorted(set(current) - known)
            if unknown:
                raise MigrationError(
                    f"the registry database is at revision {', '.join(unknown)}, which this "
                    f"version of edgefed does not know (it ships {', '.join(sorted(known))}); "
                    "it was probably written by a newer edgefed: upgrade edgefed, or point it "
                    "at another database"
                )
            command.upgrade(config, revision)
    finally:
        if engine is not url:
            engine.dispose()
    log.info("registry migrated to %s", revision)


def head_revision() -> str:
    """The newest migration shipped with this version of edgefed."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package ships migrations
        raise RuntimeError(f"no Alembic migrations in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def as_utc(value: datetime | None) -> datetime | None:
    """A timestamp read back from the database as an aware UTC datetime (SQLite drops zones)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
