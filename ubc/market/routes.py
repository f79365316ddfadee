"""HTTP of the market: the order book and offers (public), trades (bearer, as for
history), and withdrawals waiting for the operator's countersignature."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from ubc.db import run_unit_of_work
from ubc.deps import PrimaryReadSession, Reader, ReadSession, clock, json_body, require_read
from ubc.errors import Forbidden, NotFound
from ubc.market import service
from ubc.market.schemas import (
    Offer,
    OfferList,
    TradePage,
    WithdrawalList,
    WithdrawalRequest,
)
from ubc.rules.writing import Precheck
from ubc.schemas import error_responses

router = APIRouter(tags=["market"])


@router.get(
    "/api/market/offers",
    summary="Open offers, best unit price first",
    response_model=OfferList,
    response_model_exclude_unset=True,
    responses=error_responses(422),
)
def list_offers(
    request: Request,
    session: ReadSession,
    sell_asset: str | None = None,
    price_asset: str | None = None,
    seller: str | None = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_LIST)] = 100,
) -> dict[str, Any]:
    now = clock(request).now()
    offers = service.open_offers(
        session,
        now=now,
        sell_asset=sell_asset,
        price_asset=price_asset,
        seller=seller,
        limit=limit,
    )
    return {"offers": [o.to_json(now) for o in offers]}


@router.get(
    "/api/market/offers/{offer_id}",
    summary="One offer, open or closed",
    response_model=Offer,
    response_model_exclude_unset=True,
    responses=error_responses(404),
)
def get_offer(request: Request, offer_id: str, session: ReadSession) -> dict[str, Any]:
    return service.get_offer(session, offer_id).to_json(clock(request).now())


@router.get(
    "/api/market/trades",
    summary="Fills an account bought or sold, newest first",
    response_model=TradePage,
    response_model_exclude_unset=True,
    responses=error_responses(401, 403, 422, notes={400: "a malformed cursor"}),
)
def list_trades(
    session: ReadSession,
    reader: Reader,
    account: str | None = None,
    cursor: Annotated[str | None, Query(description="from the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_LIST)] = 100,
) -> dict[str, Any]:
    if account is None:
        if not reader.sees_everything:
            raise Forbidden("name the account whose trades to read (?account=member:...)")
    else:
        require_read(reader, account)
    items, next_cursor = service.trades(session, account=account, limit=limit, before=cursor)
    return {"account": account, "trades": items, "next_cursor": next_cursor}


@router.post(
    "/api/withdrawals",
    summary="Leave a withdrawal signed by its owner for the operator to countersign",
    status_code=201,
    description="Body: the withdrawal envelope signed by the owner's current key, with "
    "`actor` = `from`. Answers 201 with the stored item, 200 if the same envelope was "
    "already stored.",
    # The route reads the body itself (strict JSON, like /api/envelopes): documented here.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}},
        }
    },
    response_model=WithdrawalRequest,
    responses={
        201: {"description": "stored, waiting for the operator's countersignature"},
        200: {"model": WithdrawalRequest, "description": "the same envelope again"},
        **error_responses(
            400,
            403,
            409,
            413,
            notes={
                403: "not signed by the current key of the account's owner, or actor is not from",
                409: "idempotency_conflict: the id or the external_ref is taken",
            },
        ),
    },
)
async def post_withdrawal(request: Request) -> JSONResponse:
    raw = await json_body(request)
    ctx = request.app.state.ctx
    # The write path's precheck, handed over by ubc.app (the market is below the write path).
    precheck: Precheck = request.app.state.precheck
    ledger_clock = clock(request)

    def work(session: Session) -> tuple[dict[str, Any], bool]:
        now = ledger_clock.now()
        return service.store_withdrawal(session, ctx, raw, now=now, precheck=precheck)

    item, new = await asyncio.to_thread(run_unit_of_work, request.app.state.sessions, work)
    return JSONResponse(item, status_code=201 if new else 200)


@router.get(
    "/api/withdrawals",
    summary="Withdrawals asked for (operator; a member: its own)",
    response_model=WithdrawalList,
    response_model_exclude_unset=True,
    responses=error_responses(401, 403, 422, notes={400: "an unknown status"}),
)
def list_withdrawals(
    session: PrimaryReadSession,  # withdrawals asked for are not journaled: see them at once
    reader: Reader,
    status: str | None = None,
    account: str | None = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_LIST)] = 100,
) -> dict[str, Any]:
    if account is None:
        if not reader.sees_everything:
            raise Forbidden("name your account (?account=member:...)")
    else:
        require_read(reader, account)
    return {
        "withdrawals": service.list_withdrawals(
            session, status=status, account=account, limit=limit
        )
    }


@router.get(
    "/api/withdrawals/{withdrawal_id}",
    summary="One withdrawal asked for",
    response_model=WithdrawalRequest,
    response_model_exclude_unset=True,
    responses=error_responses(
        401, 403, 404, notes={404: "unknown, or of an account the reader may not read"}
    ),
)
def get_withdrawal(
    withdrawal_id: str, session: PrimaryReadSession, reader: Reader
) -> dict[str, Any]:
    item = service.get_withdrawal(session, withdrawal_id)
    if not reader.may_read(item["account"]):
        # The same 404 as an unknown id: another member's withdrawal ids cannot be probed.
        raise NotFound(f"no withdrawal {withdrawal_id}", detail={"id": withdrawal_id})
    return item
