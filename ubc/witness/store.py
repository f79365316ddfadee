"""The witness's state: the latest cosigned checkpoint of each origin.

One table, ``witness_checkpoints`` (origin, size, root hash, the signed checkpoint as
received, updated_at), in SQLite or PostgreSQL through SQLAlchemy Core. It has its own
``MetaData``: it is not part of the ledger's schema (Alembic's migrations never see it),
and it is created when the witness starts if it is missing, so a witness may share a
database with a ledger or have one of its own.

Updates are a compare-and-swap on the stored size: of two requests that saw the same
size, exactly one wins (tlog-witness requires the check of the old size and the update
to be atomic).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

__all__ = ["StoredCheckpoint", "WitnessStore", "witness_metadata", "witness_checkpoints"]

witness_metadata = MetaData()
"""The witness's own schema; deliberately not ``ubc.models.metadata``."""

witness_checkpoints = Table(
    "witness_checkpoints",
    witness_metadata,
    Column("origin", String(1024), primary_key=True),
    # Tree sizes are uint64; BIGINT is signed, which is 2**63 - 1 leaves: the protocol
    # refuses larger sizes before they reach the table.
    Column("size", BigInteger, nullable=False),
    Column("root_hash", LargeBinary(32), nullable=False),
    Column("checkpoint", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

MAX_STORED_SIZE = 2**63 - 1


@dataclass(frozen=True)
class StoredCheckpoint:
    origin: str
    size: int
    root_hash: bytes
    checkpoint: str
    updated_at: datetime


class WitnessStore:
    """Reads and compare-and-swaps the latest checkpoint per origin."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        return self._engine

    def create(self) -> None:
        """Create the table if it is missing (nothing else of the database is touched)."""
        witness_metadata.create_all(self._engine, checkfirst=True)

    def get(self, origin: str) -> StoredCheckpoint | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(witness_checkpoints).where(witness_checkpoints.c.origin == origin)
            ).first()
        if row is None:
            return None
        return StoredCheckpoint(
            origin=row.origin,
            size=int(row.size),
            root_hash=bytes(row.root_hash),
            checkpoint=row.checkpoint,
            updated_at=row.updated_at,
        )

    def size(self, origin: str) -> int:
        """The stored size of ``origin``, 0 if the witness never cosigned one of it."""
        stored = self.get(origin)
        return 0 if stored is None else stored.size

    def swap(
        self,
        origin: str,
        old_size: int,
        *,
        size: int,
        root_hash: bytes,
        checkpoint: str,
        now: datetime | None = None,
    ) -> bool:
        """Store the checkpoint if the stored size of ``origin`` is still ``old_size``
        (no row counts as size 0). True if stored, False if another request got there
        first."""
        if not 0 <= size <= MAX_STORED_SIZE:
            raise ValueError(f"size {size} does not fit the table")
        values = {
            "size": size,
            "root_hash": root_hash,
            "checkpoint": checkpoint,
            "updated_at": now or datetime.now(UTC),
        }
        with self._engine.begin() as conn:
            result = conn.execute(
                update(witness_checkpoints)
                .where(
                    witness_checkpoints.c.origin == origin,
                    witness_checkpoints.c.size == old_size,
                )
                .values(**values)
            )
            if result.rowcount == 1:
                return True
            if old_size != 0:
                return False
        # No row of size 0 was there: the first checkpoint of this origin, unless another
        # request inserted it meanwhile (the primary key refuses the second).
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(witness_checkpoints).values(origin=origin, **values))
        except IntegrityError:
            return False
        return True
