"""Conversation sessions: the ``sessions`` table.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

Written by hand to match ``edgefed.cloud.registry.models.SessionRecord`` (the migrations test
compares them); the state is a plain VARCHAR like every enum of the registry, the context a
sealed (encrypted) record.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the sessions table."""
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum("active", "expired", "deleted", name="session_state", native_enum=False),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("context", sa.LargeBinary(), nullable=True),
        sa.Column("context_bytes", sa.Integer(), nullable=False),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.Column("pending_deletes", sa.JSON(), nullable=False),
        sa.Column("last_handoff", sa.JSON(), nullable=True),
        sa.Column("handoffs", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_sessions_owner", "sessions", ["owner"], unique=False)
    op.create_index("ix_sessions_state_expires", "sessions", ["state", "expires_at"], unique=False)


def downgrade() -> None:
    """Drop the sessions table."""
    op.drop_index("ix_sessions_state_expires", table_name="sessions")
    op.drop_index("ix_sessions_owner", table_name="sessions")
    op.drop_table("sessions")
