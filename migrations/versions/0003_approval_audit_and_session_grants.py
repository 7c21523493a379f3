"""approval audit and session grants

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('approval_audit',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('approval_id', sa.String(length=64), nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.Column('event', sa.String(length=24), nullable=False),
    sa.Column('actor', sa.String(length=255), nullable=True),
    sa.Column('conversation_key', sa.String(length=255), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_approval_audit'))
    )
    with op.batch_alter_table('approval_audit', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_approval_audit_approval_id'), ['approval_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_approval_audit_at'), ['at'], unique=False)

    with op.batch_alter_table('approvals', schema=None) as batch_op:
        batch_op.add_column(sa.Column('match_key', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('inbound_event_id', sa.Integer(), nullable=True))
        batch_op.create_index('ix_approvals_session_match', ['session_id', 'match_key'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('approvals', schema=None) as batch_op:
        batch_op.drop_index('ix_approvals_session_match')
        batch_op.drop_column('inbound_event_id')
        batch_op.drop_column('match_key')

    with op.batch_alter_table('approval_audit', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_approval_audit_at'))
        batch_op.drop_index(batch_op.f('ix_approval_audit_approval_id'))

    op.drop_table('approval_audit')
