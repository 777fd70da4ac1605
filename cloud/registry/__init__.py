"""The controller's registry: SQLAlchemy 2 models, Alembic migrations, sessions and queries.
SQLite file by default, PostgreSQL by URL."""
