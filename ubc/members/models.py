"""Tables of members, their signing keys and their API-key grants."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, Column, ForeignKey, Index, String, Text
from sqlmodel import Field, SQLModel

from ubc.dbtypes import UTCDateTime


class Member(SQLModel, table=True):
    __tablename__ = "members"
    # On PostgreSQL the handle is COLLATE "C" in this index (migration 0006): members by
    # handle in code-point order, as an epoch's open fixes its allocations in steps.
    __table_args__ = (Index("ix_members_handle_c", "handle"),)

    handle: str = Field(sa_column=Column(String(32), primary_key=True))
    # pending (registered, awaiting member.admit), active or suspended
    status: str = Field(sa_column=Column(String(16), nullable=False))
    tier: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    display_name: str | None = Field(default=None, sa_column=Column(String(80), nullable=True))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class MemberKey(SQLModel, table=True):
    """Every key a member ever had; only the one with ``current`` may sign new envelopes."""

    __tablename__ = "member_keys"

    keyid: str = Field(sa_column=Column(String(16), primary_key=True))
    handle: str = Field(
        sa_column=Column(String(32), ForeignKey("members.handle"), nullable=False, index=True)
    )
    public_key: str = Field(sa_column=Column(String(44), nullable=False))
    current: bool = Field(sa_column=Column(Boolean, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class ApiKey(SQLModel, table=True):
    """An API-key grant; the server keeps only the SHA-256 of the secret."""

    __tablename__ = "api_keys"

    key_hash: str = Field(sa_column=Column(String(64), primary_key=True))
    account: str = Field(sa_column=Column(String(80), nullable=False, index=True))
    label: str = Field(sa_column=Column(String(64), nullable=False))
    scopes: str = Field(sa_column=Column(String(32), nullable=False))
    spend_cap_per_epoch: int | None = Field(
        default=None, sa_column=Column(BigInteger, nullable=True)
    )
    models: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    expires_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    rpm: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    tpm: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    granted_by: str = Field(sa_column=Column(String(80), nullable=False))
    revoked: bool = Field(default=False, sa_column=Column(Boolean, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class ExternalRef(SQLModel, table=True):
    """Deposits and withdrawals are idempotent on their external reference."""

    __tablename__ = "external_refs"

    ref: str = Field(sa_column=Column(String(128), primary_key=True))
    envelope_id: str = Field(sa_column=Column(String(36), nullable=False))
