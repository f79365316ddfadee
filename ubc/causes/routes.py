"""HTTP reads of causes (public) and of a donor's receipts (bearer, as for history)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from ubc.causes import service
from ubc.deps import Reader, ReadSession, require_read

router = APIRouter(tags=["causes"])


@router.get("/api/causes", summary="Every cause: stewards, donations, donors, compute spent")
def list_causes(session: ReadSession) -> dict[str, Any]:
    return {"causes": service.list_causes(session)}


@router.get("/api/causes/{slug}", summary="One cause")
def get_cause(slug: str, session: ReadSession) -> dict[str, Any]:
    return service.get_cause(session, slug)


@router.get(
    "/api/accounts/{address}/donations",
    summary="Donation receipts of an account, newest first (its owner, operator, auditors)",
)
def get_donations(
    address: str,
    session: ReadSession,
    reader: Reader,
    cursor: Annotated[str | None, Query(description="from the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    require_read(reader, address)
    items, next_cursor = service.donations(session, address, limit=limit, cursor=cursor)
    return {"address": address, "donations": items, "next_cursor": next_cursor}
