"""FastAPI dependencies: a read session per request, and the reader's principal."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from ubc.auth import Principal, authenticate_bearer
from ubc.dbtypes import utcnow
from ubc.errors import Forbidden


def read_session(request: Request) -> Iterator[Session]:
    session: Session = request.app.state.read_sessions()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


ReadSession = Annotated[Session, Depends(read_session)]


def principal(
    request: Request,
    session: ReadSession,
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    return authenticate_bearer(
        session, authorization, tokens=request.app.state.tokens, now=utcnow()
    )


Reader = Annotated[Principal, Depends(principal)]


def require_read(reader: Principal, address: str) -> None:
    if not reader.may_read(address):
        raise Forbidden(f"this key may not read {address}", detail={"address": address})
