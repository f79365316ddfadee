"""What the write path answers (``ubc/envelopes/routes.py``): the receipt of an accepted
envelope, ``{seq, id, type, effects}``, and the results of a batch. Pure pydantic: the
routes write these bodies themselves, the models document them (``responses=``)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from ubc.schemas import ErrorBody, Schema, absent

__all__ = ["BatchResult", "BatchResults", "Effect", "Receipt"]


class Effect(Schema):
    """One ledger transfer an accepted envelope made, as in its journal entry."""

    transfer_id: str
    kind: str
    debit: str
    credit: str
    asset: str
    amount: int
    phase: str = Field(description="posted, pending, post or void")
    # Absent (never null) unless the transfer resolves a pending one.
    pending_id: Annotated[str, absent("the pending transfer a post or void resolves")]


class Receipt(Schema):
    """The answer to an accepted envelope; ``seq`` is its journal entry."""

    seq: int
    id: str = Field(description="the payload's id")
    type: str = Field(description="the payload type name, e.g. transfer")
    effects: list[Effect] = Field(description="[] for a change of state")
    # Absent (never null) except for epoch.open and epoch.close.
    summary: Annotated[dict[str, Any], absent("epoch.open and epoch.close: the entry's summary")]


class BatchResult(Schema):
    index: int
    status: int = Field(description="what POST /api/envelopes would have answered")
    body: Receipt | ErrorBody


class BatchResults(Schema):
    """``POST /api/envelopes/batch``: one result per envelope, in order."""

    results: list[BatchResult]
