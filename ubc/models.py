"""Every table of ubc, imported in one place so that ``SQLModel.metadata`` is complete."""

from sqlmodel import SQLModel

from ubc.ledger.models import Account, Asset, Posting, Request, Transfer

metadata = SQLModel.metadata

__all__ = ["Account", "Asset", "Posting", "Request", "Transfer", "metadata"]
