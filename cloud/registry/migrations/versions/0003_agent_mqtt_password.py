"""Per-agent MQTT credentials: ``agents.mqtt_password_hash``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

Written by hand to match ``edgefed.cloud.registry.models.Agent`` (the migrations test compares
them): the mosquitto ``$7$`` hash of the password the agent got at join (NULL when the
controller issued none: broker authentication off, or an agent that joined before).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the agents' MQTT password hash."""
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("mqtt_password_hash", sa.String(length=160), nullable=True))


def downgrade() -> None:
    """Drop it again."""
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("mqtt_password_hash")
