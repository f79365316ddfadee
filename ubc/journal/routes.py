"""HTTP: the journal's signed checkpoint (public)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from ubc.deps import ReadSession
from ubc.journal import store

router = APIRouter(tags=["journal"])


@router.get(
    "/journal/checkpoint",
    summary="The latest C2SP tlog-checkpoint, a signed note",
    response_class=PlainTextResponse,
)
def get_checkpoint(session: ReadSession) -> PlainTextResponse:
    _, checkpoint = store.latest_checkpoint(session)
    return PlainTextResponse(checkpoint, headers={"Cache-Control": "no-cache"})
