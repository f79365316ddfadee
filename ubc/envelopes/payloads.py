"""Payload schemas of every envelope type (DESIGN section 4, a public contract), in one
place for the write path and its callers.

The schemas live with their domains (``ubc/<domain>/payloads.py``), the strict machinery
they share in the rules kernel (``ubc.rules.payload``); this module re-exports both and
validates a payload by its type name through the registry.
"""

from __future__ import annotations

from typing import Any

from ubc.causes.payloads import CauseRegister, CauseUpdate
from ubc.envelopes.registry import REGISTRY
from ubc.epochs.payloads import EpochClose, EpochOpen
from ubc.ledger.payloads import (
    AssetSpec,
    Deposit,
    LedgerConfig,
    LedgerGenesis,
    ModelPrice,
    TransferPayload,
    Withdrawal,
)
from ubc.market.payloads import OfferCancel, OfferCreate, OfferExpire, OfferFill
from ubc.members.payloads import (
    ApiKeyGrant,
    ApiKeyRevoke,
    KeyRotate,
    MemberAdmit,
    MemberRegister,
    MemberUpdate,
)
from ubc.metering.payloads import HoldExpire, Usage
from ubc.rules.payload import (
    ACTOR_PATTERN,
    ADDRESS_PATTERN,
    HANDLE_PATTERN,
    MAX_AMOUNT,
    MAX_PAYLOAD_BYTES,
    SLUG_PATTERN,
    Payload,
    check_text,
    format_timestamp,
    parse_timestamp,
    payload_json,
    refused_character,
    validate,
)

#: Every payload type's schema by type name.
PAYLOAD_MODELS: dict[str, type[Payload]] = dict(REGISTRY.models)


def validate_payload(type_name: str, body: dict[str, Any]) -> Payload:
    """Validate a parsed payload against its type's schema; ValueError with a clear message."""
    model = PAYLOAD_MODELS.get(type_name)
    if model is None:
        raise ValueError(f"unknown payload type {type_name!r}")
    return validate(model, body)


__all__ = [
    "ACTOR_PATTERN",
    "ADDRESS_PATTERN",
    "HANDLE_PATTERN",
    "MAX_AMOUNT",
    "MAX_PAYLOAD_BYTES",
    "PAYLOAD_MODELS",
    "SLUG_PATTERN",
    "ApiKeyGrant",
    "ApiKeyRevoke",
    "AssetSpec",
    "CauseRegister",
    "CauseUpdate",
    "Deposit",
    "EpochClose",
    "EpochOpen",
    "HoldExpire",
    "KeyRotate",
    "LedgerConfig",
    "LedgerGenesis",
    "MemberAdmit",
    "MemberRegister",
    "MemberUpdate",
    "ModelPrice",
    "OfferCancel",
    "OfferCreate",
    "OfferExpire",
    "OfferFill",
    "Payload",
    "TransferPayload",
    "Usage",
    "Withdrawal",
    "check_text",
    "format_timestamp",
    "parse_timestamp",
    "payload_json",
    "refused_character",
    "validate_payload",
]
