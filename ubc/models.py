"""Every table of ubc, imported in one place so that ``SQLModel.metadata`` is complete."""

from sqlmodel import SQLModel

from ubc.envelopes.models import LedgerConfigRow
from ubc.epochs.models import Epoch, EpochAllocation, EpochExpiry
from ubc.gateway.models import ApiKeySpend, GatewayHold, UsageRecord
from ubc.journal.models import JournalEntry, JournalHead, MerkleNode
from ubc.ledger.models import Account, Asset, Posting, Request, Transfer
from ubc.members.models import ApiKey, ExternalRef, Member, MemberKey

metadata = SQLModel.metadata

__all__ = [
    "Account",
    "ApiKey",
    "ApiKeySpend",
    "Epoch",
    "EpochAllocation",
    "EpochExpiry",
    "Asset",
    "ExternalRef",
    "GatewayHold",
    "JournalEntry",
    "JournalHead",
    "LedgerConfigRow",
    "Member",
    "MemberKey",
    "MerkleNode",
    "Posting",
    "Request",
    "Transfer",
    "UsageRecord",
    "metadata",
]
