"""routines: per-routine schedule state and run receipts

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'routine_state',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('last_due_at', sa.Float(), nullable=False),
        sa.Column('next_due_at', sa.Float(), nullable=True),
        sa.Column('enabled', sa.Integer(), nullable=True),
        sa.Column('updated_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )
    op.create_table(
        'routine_runs',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('routine', sa.String(length=64), nullable=False),
        sa.Column('due_at', sa.Float(), nullable=False),
        sa.Column('manual', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('owner', sa.String(length=128), nullable=True),
        sa.Column('started_at', sa.Float(), nullable=True),
        sa.Column('finished_at', sa.Float(), nullable=True),
        sa.Column('lease_until', sa.Float(), nullable=True),
        sa.Column('output', sa.Text(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('delivered_to', sa.Text(), nullable=True),
        sa.Column('note', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('routine', 'due_at', name='uq_routine_runs_due'),
    )
    with op.batch_alter_table('routine_runs', schema=None) as batch_op:
        batch_op.create_index('ix_routine_runs_status', ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('routine_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_routine_runs_status')
    op.drop_table('routine_runs')
    op.drop_table('routine_state')
