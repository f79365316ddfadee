"""HTTP: epochs (public, with progress while one is being applied), and the utilization
report (operator and auditors)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from decimal import Decimal
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from ubc.deps import Reader, ReadSession, RequestReads
from ubc.epochs import report
from ubc.epochs import service as epochs
from ubc.epochs.schemas import Epoch, EpochList, UtilizationReport
from ubc.epochs.service import EpochInfo
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
    "bought, expired, utilization % and USD value, a page at a time in address order, or "
    "the whole report as CSV with `Accept: text/csv` (operator and auditors)",
    response_model=UtilizationReport,
    response_model_exclude_unset=True,
    responses={
        200: {
            "description": "a page of the report (JSON), or the whole report as CSV: a header, "
            "every member's row in address order, then a `total` row",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
        **error_responses(
            401, 403, 404, 422, notes={400: "a malformed cursor", 404: "no such epoch"}
        ),
    },
)
def utilization_report(
    request: Request,
    session: ReadSession,
    reads: RequestReads,
    reader: Reader,
    epoch: Annotated[int, Query(ge=1, le=MAX_AMOUNT, description="the epoch number")],
    below: Annotated[
        str | None,
        Query(
            pattern=report.PERCENT_PATTERN,
            description="also list the members of the page whose utilization % is under "
            "this, e.g. 12.5",
        ),
    ] = None,
    cursor: Annotated[
        str | None, Query(description="`next_cursor` of the previous page (JSON only)")
    ] = None,
    limit: Annotated[
        int,
        Query(ge=1, le=report.MAX_LIMIT, description="members per page (JSON only)"),
    ] = report.DEFAULT_LIMIT,
) -> Any:
    if not reader.sees_everything:
        raise Forbidden("only the operator and auditors read the utilization report")
    price: str = request.app.state.ledger_info["cu_price_usd"]
    after = report.parse_cursor(cursor)
    if _wants_csv(request.headers.get("accept")):
        info = epochs.get_epoch(session, epoch)  # 404 before anything is sent
        # The stream reads with a session of its own, open exactly as long as the stream:
        # this one goes back to the pool now, not when the last row has been sent.
        session.close()
        return StreamingResponse(
            _csv_stream(reads.factory, info, price),  # the replica's, if it serves
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="utilization-epoch-{epoch}.csv"'
            },
        )
    threshold = None if below is None else Decimal(below)
    now = request.app.state.clock.now()
    return report.utilization(
        session, epoch, cu_price_usd=price, below=threshold, now=now, cursor=after, limit=limit
    ).to_json()


def _wants_csv(accept: str | None) -> bool:
    """Whether ``Accept`` names ``text/csv`` before any JSON (JSON is the default)."""
    for item in (accept or "").split(","):
        media = item.split(";", 1)[0].strip().lower()
        if media == "text/csv":
            return True
        if media in ("application/json", "application/*"):
            return False
    return False


async def _csv_stream(
    sessions: sessionmaker[Session], info: EpochInfo, price: str
) -> AsyncIterator[str]:
    """The CSV of the whole report, read in a worker thread a chunk at a time with a session
    opened for it and closed when the stream ends, however it ends (the client gone too)."""
    session = sessions()
    chunks = report.csv_chunks(session, info, cu_price_usd=price)
    try:
        while True:
            chunk = await run_in_threadpool(next, chunks, None)
            if chunk is None:
                return
            yield chunk
    finally:
        # Shielded: a stream cancelled because the client went away still closes (the
        # thread reading a chunk, if any, is waited for first: it cannot be abandoned).
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(_close, chunks, session)


def _close(chunks: Generator[str, None, None], session: Session) -> None:
    try:
        chunks.close()
    finally:
        session.rollback()
        session.close()
