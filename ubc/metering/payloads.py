"""Payload schemas of metered model calls (both signed by the ledger key)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from ubc.rules.payload import MAX_AMOUNT, Address, Amount, KeyHash, Payload, Uuid

ModelId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")]
Count = Annotated[int, Field(ge=0, le=MAX_AMOUNT)]
# A gateway hold is the only leg of the ledger request ``hold:<call id>``.
_UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
HoldId = Annotated[str, StringConstraints(pattern=rf"^hold:{_UUID_RE}:0$")]


class Usage(Payload):
    """One metered model call (ledger key): posts the call's hold for ``cost``."""

    account: Address
    key_hash: KeyHash
    request_id: Uuid
    model: ModelId
    input_tokens: Count
    output_tokens: Count
    held: Amount
    cost: Count


class HoldExpire(Payload):
    """A gateway hold that timed out unbilled (ledger key): released, nothing posted."""

    hold_id: HoldId
