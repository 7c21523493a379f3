"""conversation leases: which replica runs a conversation

With several replicas on one PostgreSQL database, a conversation's turns, queue and deliveries
belong to one replica at a time: the one holding its lease (bridge/pipeline/ownership.py). A
lease runs out unless renewed, so the conversations of a replica that died pass to another.
On SQLite (one process) the table stays empty.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conversation_leases",
        sa.Column("conversation_key", sa.String(255), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("conversation_key", name="pk_conversation_leases"),
    )


def downgrade() -> None:
    op.drop_table("conversation_leases")
