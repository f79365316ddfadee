"""Every table of ubc, imported in one place so that ``SQLModel.metadata`` is complete."""

from sqlmodel import SQLModel

from ubc.epochs.models import Epoch, EpochAllocation, EpochExpiry
from ubc.journal.models import JournalEntry, JournalHead, MerkleNode
from ubc.ledger.models import Account, Asset, Posting, Request, Transfer
from ubc.members.models import ApiKey, ExternalRef, Member, MemberKey

metadata = SQLModel.metadata

__all__ = [
    "Account",
    "ApiKey",
    "Epoch",
    "EpochAllocation",
    "EpochExpiry",
    "Asset",
    "ExternalRef",
    "JournalEntry",
    "JournalHead",
    "Member",
    "MemberKey",
    "MerkleNode",
    "Posting",
    "Request",
    "Transfer",
    "metadata",
]
