"""shared files: attachments every replica can read

With several replicas, each with its own data dir, the replica that receives a file is often not
the one that runs its turn. The receiving replica puts the file here too (channels/files.py),
and the turn's replica writes it to its own disk when it is missing there. On SQLite (one
process) the table stays empty.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shared_files",
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_shared_files"),
    )
    op.create_index("ix_shared_files_created_at", "shared_files", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_shared_files_created_at", table_name="shared_files")
    op.drop_table("shared_files")
