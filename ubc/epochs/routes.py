"""HTTP: epochs (public, with progress while one is being applied)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ubc.deps import ReadSession
from ubc.epochs import service as epochs

router = APIRouter(tags=["epochs"])


@router.get("/api/epochs", summary="Every epoch, oldest first")
def list_epochs(session: ReadSession) -> dict[str, Any]:
    return {"epochs": [e.to_json() for e in epochs.list_epochs(session)]}


@router.get(
    "/api/epochs/{number}",
    summary="One epoch; `applied` of `members` shows progress while it is `opening`",
)
def get_epoch(number: int, session: ReadSession) -> dict[str, Any]:
    return epochs.get_epoch(session, number).to_json()
