"""journal head keeps the Merkle frontier of the tree it names

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 14:50:00

The group commit reads the frontier (the hashes of the perfect subtrees on the tree's
right border) with the head's lock instead of looking its nodes up in ``merkle_nodes``:
one statement less in the serialized part of every write. NULL until the next append
(existing journals): the writer then reads the nodes, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("journal_head", schema=None) as batch_op:
        batch_op.add_column(sa.Column("frontier", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("journal_head", schema=None) as batch_op:
        batch_op.drop_column("frontier")
