"""Tables of the journal: entries (exact hashed bytes), Merkle nodes, the head."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Integer, LargeBinary, String, Text
from sqlmodel import Field, SQLModel

from ubc.dbtypes import UTCDateTime


class JournalEntry(SQLModel, table=True):
    __tablename__ = "journal_entries"

    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    envelope_id: str = Field(sa_column=Column(String(36), nullable=False, unique=True))
    type: str = Field(sa_column=Column(String(32), nullable=False))
    actor: str = Field(sa_column=Column(String(80), nullable=False))
    # Accounts this entry touches, space-separated: members may read their own entries.
    accounts: str = Field(sa_column=Column(Text, nullable=False))
    entry: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    committed_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class MerkleNode(SQLModel, table=True):
    """The hash of every complete subtree: (level, index) covers leaves [i·2^l, (i+1)·2^l)."""

    __tablename__ = "merkle_nodes"

    level: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    index: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))


class JournalHead(SQLModel, table=True):
    """One row: the journal's size and latest signed checkpoint; writers lock it per batch."""

    __tablename__ = "journal_head"

    id: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    checkpoint: str = Field(default="", sa_column=Column(Text, nullable=False))
    # The Merkle frontier of the tree of ``size`` leaves (``frontier_ids(size)``' hashes,
    # concatenated), read with the lock by the next append; NULL before one wrote it.
    frontier: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
