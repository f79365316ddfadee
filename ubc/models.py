"""Every table of ubc, imported in one place so that ``SQLModel.metadata`` is complete."""

from sqlmodel import SQLModel

from ubc.causes.models import Cause, CauseSteward
from ubc.envelopes.models import LedgerConfigRow
from ubc.epochs.models import Epoch, EpochAllocation, EpochExpiry
from ubc.gateway.models import ApiKeySpend, GatewayHold, UsageRecord
from ubc.journal.cosignatures import JournalCosignature, JournalWitness, JournalWitnessRound
from ubc.journal.models import JournalEntry, JournalHead, MerkleNode
from ubc.ledger.models import Account, Asset, Posting, Request, Transfer
from ubc.market.models import Fill, Offer, WithdrawalRequest
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
    "Cause",
    "CauseSteward",
    "ExternalRef",
    "Fill",
    "GatewayHold",
    "JournalCosignature",
    "JournalEntry",
    "JournalHead",
    "JournalWitness",
    "JournalWitnessRound",
    "LedgerConfigRow",
    "Member",
    "MemberKey",
    "MerkleNode",
    "Offer",
    "Posting",
    "Request",
    "Transfer",
    "UsageRecord",
    "WithdrawalRequest",
    "metadata",
]
