"""epochs open and close in steps: cursors, the close's steps, the open's member states

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 15:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("epochs") as batch:
        batch.add_column(sa.Column("fix_cursor", sa.String(length=32), nullable=True))
        batch.add_column(
            sa.Column("fixed", sa.BigInteger(), nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(sa.Column("close_cursor", sa.String(length=80), nullable=True))
    # Epochs opened before: their allocations were all fixed by their entry.
    op.execute("UPDATE epochs SET fixed = members")
    op.create_table(
        "epoch_fixes",
        sa.Column("epoch", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("handle", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("tier", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("epoch", "handle"),
    )
    op.create_table(
        "epoch_close_steps",
        sa.Column("envelope_id", sa.String(length=36), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("first_leg", sa.BigInteger(), nullable=False),
        sa.Column("legs", sa.BigInteger(), nullable=False),
        sa.Column("through", sa.String(length=80), nullable=False),
        sa.PrimaryKeyConstraint("envelope_id"),
    )
    # A close step reads the member accounts of an asset in an address range, an open's
    # step the members in a handle range, in code-point order (as the auditor sorts):
    # COLLATE "C" on PostgreSQL, whatever the database's collation; SQLite compares by
    # code point already.
    collate = ' COLLATE "C"' if op.get_bind().dialect.name == "postgresql" else ""
    op.execute(f"CREATE INDEX ix_accounts_asset_address_c ON accounts (asset, address{collate})")
    op.execute(f"CREATE INDEX ix_members_handle_c ON members (handle{collate})")


def downgrade() -> None:
    op.drop_index("ix_members_handle_c", table_name="members")
    op.drop_index("ix_accounts_asset_address_c", table_name="accounts")
    op.drop_table("epoch_close_steps")
    op.drop_table("epoch_fixes")
    with op.batch_alter_table("epochs") as batch:
        batch.drop_column("close_cursor")
        batch.drop_column("fixed")
        batch.drop_column("fix_cursor")
