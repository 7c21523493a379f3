"""inbox: one unique dedupe key per event instead of two

An event used to be unique on its event key and, separately, on its message key, so every
platform message put two entries at random places into two unique indexes, two more pages
written per message. Now `dedupe_key` is the message key when the event has one (the same
message runs once, whatever event ids carry it; a redelivery has the same message key) and the
event key otherwise; `event_key` stays, unindexed, for the record. `message_key` goes (it is the
dedupe key, and the payload keeps the platform's message id).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inbound_events") as batch_op:
        batch_op.add_column(sa.Column("dedupe_key", sa.String(255), nullable=True))
    op.execute("UPDATE inbound_events SET dedupe_key = COALESCE(message_key, event_key)")
    with op.batch_alter_table("inbound_events") as batch_op:
        batch_op.alter_column("dedupe_key", existing_type=sa.String(255), nullable=False)
        batch_op.create_unique_constraint("uq_inbound_events_dedupe_key", ["dedupe_key"])
        batch_op.drop_constraint("uq_inbound_events_event_key", type_="unique")
        batch_op.drop_constraint("uq_inbound_events_message_key", type_="unique")
        batch_op.drop_column("message_key")


def downgrade() -> None:
    with op.batch_alter_table("inbound_events") as batch_op:
        batch_op.add_column(sa.Column("message_key", sa.String(255), nullable=True))
    op.execute("UPDATE inbound_events SET message_key = dedupe_key WHERE dedupe_key <> event_key")
    with op.batch_alter_table("inbound_events") as batch_op:
        batch_op.drop_constraint("uq_inbound_events_dedupe_key", type_="unique")
        batch_op.create_unique_constraint("uq_inbound_events_event_key", ["event_key"])
        batch_op.create_unique_constraint("uq_inbound_events_message_key", ["message_key"])
        batch_op.drop_column("dedupe_key")
