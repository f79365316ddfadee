"""the ledger's witnesses: cosignatures collected, each witness's status, the rounds

Revision ID: 0007_witness_cosignatures
Revises: 0006
Create Date: 2026-12-03 17:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import ubc.dbtypes

revision: str = "0007_witness_cosignatures"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "journal_cosignatures",
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("witness", sa.String(length=1024), nullable=False),
        sa.Column("checkpoint", sa.Text(), nullable=False),
        sa.Column("line", sa.Text(), nullable=False),
        sa.Column("timestamp", sa.BigInteger(), nullable=False),
        sa.Column("created_at", ubc.dbtypes.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("size", "witness"),
    )
    op.create_table(
        "journal_witnesses",
        sa.Column("witness", sa.String(length=1024), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("cosigned_size", sa.BigInteger(), nullable=True),
        sa.Column("attempted_at", ubc.dbtypes.UTCDateTime(timezone=True), nullable=True),
        sa.Column("succeeded_at", ubc.dbtypes.UTCDateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("witness"),
    )
    op.create_table(
        "journal_witness_rounds",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("started_at", ubc.dbtypes.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("journal_witness_rounds")
    op.drop_table("journal_witnesses")
    op.drop_table("journal_cosignatures")
