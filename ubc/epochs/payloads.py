"""Payload schemas of allocation epochs."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from ubc.rules.payload import MAX_AMOUNT, Amount, AssetCode, Payload, Timestamp

Tier = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")]
# A member address, or "" before the first one (the start of a close).
CloseCursor = Annotated[str, StringConstraints(pattern=r"^(|member:[a-z0-9][a-z0-9_-]{2,31})$")]


class EpochOpen(Payload):
    """Allocate each active member of a listed tier its amount from ``system:issuance``."""

    epoch: Annotated[int, Field(ge=1, le=MAX_AMOUNT)]
    asset: AssetCode
    allocations: Annotated[dict[Tier, Amount], Field(min_length=1, max_length=64)]
    carryover_cap: Annotated[int, Field(ge=0, le=MAX_AMOUNT)] | None = None
    starts_at: Timestamp
    ends_at: Timestamp


class EpochClose(Payload):
    """Close the epoch: expire what each member can still spend above its carryover cap,
    in ``epoch.expire`` steps that the ledger journals after this entry."""

    epoch: Annotated[int, Field(ge=1, le=MAX_AMOUNT)]


class EpochExpire(Payload):
    """One step of a close (ledger key): expire, at this entry's position, what each
    member account of the epoch's asset with an address in (``after``, ``through``], in
    code-point order, can spend above the cap. ``after`` is the previous step's
    ``through`` ("" for the first step); the step after which no member account is left
    beyond ``through`` closes the epoch."""

    epoch: Annotated[int, Field(ge=1, le=MAX_AMOUNT)]
    after: CloseCursor
    through: CloseCursor
