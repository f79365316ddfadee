"""Payload schemas of allocation epochs."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from ubc.rules.payload import MAX_AMOUNT, Amount, AssetCode, Payload, Timestamp

Tier = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")]


class EpochOpen(Payload):
    """Allocate each active member of a listed tier its amount from ``system:issuance``."""

    epoch: Annotated[int, Field(ge=1, le=MAX_AMOUNT)]
    asset: AssetCode
    allocations: Annotated[dict[Tier, Amount], Field(min_length=1, max_length=64)]
    carryover_cap: Annotated[int, Field(ge=0, le=MAX_AMOUNT)] | None = None
    starts_at: Timestamp
    ends_at: Timestamp


class EpochClose(Payload):
    """Expire what each member can still spend above the epoch's carryover cap."""

    epoch: Annotated[int, Field(ge=1, le=MAX_AMOUNT)]
