"""Tables of causes and their stewards (derived from journaled cause.* entries)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, ForeignKey, String, Text
from sqlmodel import Field, SQLModel

from ubc.dbtypes import UTCDateTime


class Cause(SQLModel, table=True):
    """A cause registered by the operator; its accounts are ``cause:<slug>``, one per asset."""

    __tablename__ = "causes"

    slug: str = Field(sa_column=Column(String(64), primary_key=True))
    name: str = Field(sa_column=Column(String(80), nullable=False))
    description: str = Field(sa_column=Column(Text, nullable=False))
    # The latest cause.register or cause.update envelope.
    envelope_id: str = Field(sa_column=Column(String(36), nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class CauseSteward(SQLModel, table=True):
    """A member who may spend a cause's funds and grant API keys on its account."""

    __tablename__ = "cause_stewards"

    slug: str = Field(sa_column=Column(String(64), ForeignKey("causes.slug"), primary_key=True))
    handle: str = Field(
        sa_column=Column(String(32), ForeignKey("members.handle"), primary_key=True, index=True)
    )
