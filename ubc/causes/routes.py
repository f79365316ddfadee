"""HTTP reads of causes (public) and of a donor's receipts (bearer, as for history)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from ubc.causes import service
from ubc.causes.schemas import Cause, CauseList, DonationPage
from ubc.deps import Reader, ReadSession, require_read
from ubc.schemas import error_responses

router = APIRouter(tags=["causes"])


@router.get(
    "/api/causes",
    summary="Every cause: stewards, donations, donors, compute spent",
    response_model=CauseList,
    response_model_exclude_unset=True,
    responses=error_responses(),
)
def list_causes(session: ReadSession) -> dict[str, Any]:
    return {"causes": service.list_causes(session)}


@router.get(
    "/api/causes/{slug}",
    summary="One cause",
    response_model=Cause,
    response_model_exclude_unset=True,
    responses=error_responses(404),
)
def get_cause(slug: str, session: ReadSession) -> dict[str, Any]:
    return service.get_cause(session, slug)


@router.get(
    "/api/accounts/{address}/donations",
    summary="Donation receipts of an account, newest first (its owner, operator, auditors)",
    response_model=DonationPage,
    response_model_exclude_unset=True,
    responses=error_responses(
        401, 403, 404, 422, notes={400: "a malformed cursor", 404: "account_not_found"}
    ),
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
