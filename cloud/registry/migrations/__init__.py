"""Alembic migrations of the registry (run by :func:`edgefed.cloud.registry.db.migrate`)."""
