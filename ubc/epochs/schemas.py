"""What the epochs' read routes answer (``ubc/epochs/routes.py``): epochs and the
utilization report. Pure pydantic, for ``response_model=``."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from ubc.schemas import Schema

__all__ = ["Epoch", "EpochList", "UtilizationReport", "UtilizationRow"]


class Epoch(Schema):
    """An epoch; ``applied`` of ``members`` shows progress while it is ``opening``."""

    epoch: int
    asset: str
    allocations: dict[str, int] = Field(description="amount per tier")
    carryover_cap: int | None
    starts_at: str
    ends_at: str
    status: str = Field(description="opening, open, closing or closed")
    opened_at: str
    closed_at: str | None
    members: int
    applied: int
    issued: int
    expired_members: int
    expired: int
    close_cursor: str | None = Field(
        default=None,
        description="while closing: the last member address its expiry steps have covered",
    )


class EpochList(Schema):
    """``GET /api/epochs``: oldest first."""

    epochs: list[Epoch]


class UtilizationRow(Schema):
    """One member's row of the report (or the totals, with address ``total``)."""

    address: str
    allocated: int
    used: int
    sent: int
    received: int
    donated: int
    sold: int
    bought: int
    expired: int
    utilization: str | None = Field(
        description="used / allocated in percent, two decimals; null when nothing was allocated"
    )
    allocated_usd: str = Field(description="a decimal string")
    used_usd: str = Field(description="a decimal string")


class UtilizationReport(Schema):
    """``GET /api/reports/utilization``: a page of members of an epoch, in address order
    (operator and auditors)."""

    model_config = ConfigDict(populate_by_name=True)

    epoch: int
    asset: str
    status: str
    cu_price_usd: str
    from_: str = Field(alias="from", description="the window's start")
    to: str = Field(description="the window's end (now while the epoch is open)")
    members: list[UtilizationRow] = Field(description="this page's members, in address order")
    totals: UtilizationRow | None = Field(
        description="the sums of every member's row of the epoch, on the first page (no "
        "cursor); null on the pages after it"
    )
    below: str | None = Field(description="the threshold asked for, if any")
    below_members: list[str] = Field(
        description="the addresses of this page's members whose utilization is under it"
    )
    next_cursor: str | None = Field(
        description="the last address of this page, to pass as cursor for the next; null on "
        "the last page"
    )
