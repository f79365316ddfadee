"""The ledger's configuration in force: the payload of the latest genesis or config entry."""

from __future__ import annotations

from sqlalchemy import Column, String, Text
from sqlmodel import Field, SQLModel

from ubc.dbtypes import BigIntPK


class LedgerConfigRow(SQLModel, table=True):
    """One row per journal entry that set the configuration; the highest ``id`` is in force.

    ``body`` is that payload's JSON (prices per model, market fee, CU price), so the rules
    read the prices of their own moment in the journal, live and in an auditor's replay.
    """

    __tablename__ = "ledger_config"

    id: int | None = Field(default=None, sa_column=Column(BigIntPK, primary_key=True))
    envelope_id: str = Field(sa_column=Column(String(36), nullable=False, unique=True))
    body: str = Field(sa_column=Column(Text, nullable=False))
