"""web chat: drop the (conversation_id, created_seq) index

No query reads it (pages order by created_seq themselves, after reading by seq), and every
message insert paid for it: one more index page written per message, at a random place.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-22
"""
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_webchat_messages_conversation_created_seq", table_name="webchat_messages")


def downgrade() -> None:
    op.create_index("ix_webchat_messages_conversation_created_seq", "webchat_messages",
                    ["conversation_id", "created_seq"])
