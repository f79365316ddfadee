"""Tables of allocation epochs: the epoch and the allocations it snapshots."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, String, Text
from sqlmodel import Field, SQLModel

from ubc.dbtypes import UTCDateTime


class Epoch(SQLModel, table=True):
    """An epoch: ``opening`` while its allocations are applied in batches, then ``open``,
    then ``closing`` while its expiry steps run, then ``closed``."""

    __tablename__ = "epochs"

    number: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    asset: str = Field(sa_column=Column(String(16), nullable=False))
    allocations: str = Field(sa_column=Column(Text, nullable=False))
    carryover_cap: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    starts_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    ends_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    status: str = Field(sa_column=Column(String(16), nullable=False))
    open_envelope_id: str = Field(sa_column=Column(String(36), nullable=False))
    close_envelope_id: str | None = Field(default=None, sa_column=Column(String(36), nullable=True))
    opened_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    closed_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    members: int = Field(sa_column=Column(BigInteger, nullable=False))
    applied: int = Field(sa_column=Column(BigInteger, nullable=False))
    issued: int = Field(sa_column=Column(BigInteger, nullable=False))
    expired_members: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    expired: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    # The epoch's window in posting order: postings with first_posting < id ≤ last_posting.
    # Marked in the transactions that journal open and close, so a transfer belongs to the
    # epoch exactly when the journal puts it between them.
    first_posting: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    last_posting: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    # While opening: the last handle whose allocation is fixed ("" before the first; None
    # once every one is), and how many allocations are fixed.
    fix_cursor: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    fixed: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    # While closing: the last member address a step has expired ("" before the first).
    close_cursor: str | None = Field(default=None, sa_column=Column(String(80), nullable=True))


class EpochAllocation(SQLModel, table=True):
    """The members an epoch allocates to, fixed when it opens; ``leg`` orders them by handle
    and names their transfer ``<epoch.open id>:<leg>``."""

    __tablename__ = "epoch_allocations"
    __table_args__ = (Index("ix_epoch_allocations_account", "account_id"),)

    epoch: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    leg: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    account_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    tier: str = Field(sa_column=Column(String(32), nullable=False))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))


class EpochExpiry(SQLModel, table=True):
    """What an epoch's close expired per member account, legs ordered by address."""

    __tablename__ = "epoch_expiries"

    epoch: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    leg: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    account_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))


class EpochCloseStep(SQLModel, table=True):
    """One ``epoch.expire`` step of a close: its legs are ``first_leg <= leg < first_leg +
    legs`` of ``epoch_expiries``, their transfers ``<step id>:<leg - first_leg>``."""

    __tablename__ = "epoch_close_steps"

    envelope_id: str = Field(sa_column=Column(String(36), primary_key=True))
    epoch: int = Field(sa_column=Column(BigInteger, nullable=False))
    first_leg: int = Field(sa_column=Column(BigInteger, nullable=False))
    legs: int = Field(sa_column=Column(BigInteger, nullable=False))
    through: str = Field(sa_column=Column(String(80), nullable=False))


class EpochFix(SQLModel, table=True):
    """A member's state when an opening epoch's entry was journaled, kept when the member
    changes (or first appears: ``status`` None) before its allocation is fixed."""

    __tablename__ = "epoch_fixes"

    epoch: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    handle: str = Field(sa_column=Column(String(32), primary_key=True))
    status: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))
    tier: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
