"""HTTP: epochs (public, with progress while one is being applied), and the utilization
report (operator and auditors)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from ubc.deps import Reader, ReadSession
from ubc.epochs import report
from ubc.epochs import service as epochs
from ubc.epochs.schemas import Epoch, EpochList, UtilizationReport
from ubc.errors import Forbidden
from ubc.rules.payload import MAX_AMOUNT
from ubc.schemas import error_responses

router = APIRouter(tags=["epochs"])


@router.get(
    "/api/epochs",
    summary="Every epoch, oldest first",
    response_model=EpochList,
    response_model_exclude_unset=True,
    responses=error_responses(),
)
def list_epochs(session: ReadSession) -> dict[str, Any]:
    return {"epochs": [e.to_json() for e in epochs.list_epochs(session)]}


@router.get(
    "/api/epochs/{number}",
    summary="One epoch; `applied` of `members` shows progress while it is `opening`",
    response_model=Epoch,
    response_model_exclude_unset=True,
    responses=error_responses(404, 422),
)
def get_epoch(
    number: Annotated[int, Path(ge=1, le=MAX_AMOUNT)], session: ReadSession
) -> dict[str, Any]:
    return epochs.get_epoch(session, number).to_json()


@router.get(
    "/api/reports/utilization",
    summary="Per member of an epoch: allocated, used, sent, received, donated, sold, "
    "bought, expired, utilization % and USD value (operator and auditors)",
    response_model=UtilizationReport,
    response_model_exclude_unset=True,
    responses=error_responses(401, 403, 404, 422, notes={404: "no such epoch"}),
)
def utilization_report(
    request: Request,
    session: ReadSession,
    reader: Reader,
    epoch: Annotated[int, Query(ge=1, le=MAX_AMOUNT, description="the epoch number")],
    below: Annotated[
        str | None,
        Query(
            pattern=report.PERCENT_PATTERN,
            description="also list the members whose utilization % is under this, e.g. 12.5",
        ),
    ] = None,
) -> dict[str, Any]:
    if not reader.sees_everything:
        raise Forbidden("only the operator and auditors read the utilization report")
    price: str = request.app.state.ledger_info["cu_price_usd"]
    threshold = None if below is None else Decimal(below)
    now = request.app.state.clock.now()
    return report.utilization(
        session, epoch, cu_price_usd=price, below=threshold, now=now
    ).to_json()
