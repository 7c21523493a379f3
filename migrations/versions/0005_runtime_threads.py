"""runtime threads: every runtime thread a session was bound to, and why a binding ended

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'runtime_threads',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('session_id', sa.Integer(), nullable=False),
        sa.Column('runtime', sa.String(length=32), nullable=False),
        sa.Column('thread_id', sa.String(length=255), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('ended_at', sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(['session_id'], ['sessions.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('runtime_threads', schema=None) as batch_op:
        batch_op.create_index('ix_runtime_threads_session_id', ['session_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('runtime_threads', schema=None) as batch_op:
        batch_op.drop_index('ix_runtime_threads_session_id')
    op.drop_table('runtime_threads')
