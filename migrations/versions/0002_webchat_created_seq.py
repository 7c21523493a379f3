"""web chat: keep each message's first seq, the order a chat shows messages in

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webchat_messages") as batch_op:
        batch_op.add_column(sa.Column("created_seq", sa.Integer(), nullable=True))
    op.execute("UPDATE webchat_messages SET created_seq = seq")
    with op.batch_alter_table("webchat_messages") as batch_op:
        batch_op.alter_column("created_seq", existing_type=sa.Integer(), nullable=False)
        batch_op.create_index("ix_webchat_messages_conversation_created_seq", ["conversation_id", "created_seq"])


def downgrade() -> None:
    with op.batch_alter_table("webchat_messages") as batch_op:
        batch_op.drop_index("ix_webchat_messages_conversation_created_seq")
        batch_op.drop_column("created_seq")
