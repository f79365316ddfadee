"""FastAPI dependencies: a read session per request, the reader's principal, and a
request body read as strict JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from ubc import logs
from ubc.auth import Principal, authenticate_bearer
from ubc.clock import Clock
from ubc.errors import BadRequest, Forbidden, PayloadTooLarge
from ubc.schemas import BEARER_SCHEME


def read_session(request: Request) -> Iterator[Session]:
    session: Session = request.app.state.read_sessions()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


ReadSession = Annotated[Session, Depends(read_session)]


#: ``Authorization: Bearer <secret>`` in the OpenAPI document (the Authorize button of
#: /docs). Only documents the header: the principal reads it itself, as sent.
bearer = HTTPBearer(
    scheme_name=BEARER_SCHEME,
    description="The operator or auditor token written by `ubc init`, or a member's API key "
    "with the `read` scope (for the account it was granted on)",
    auto_error=False,
)
Bearer = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


def clock(request: Request) -> Clock:
    """The ledger's clock (``app.state.clock``): read once per request."""
    held: Clock = request.app.state.clock
    return held


def principal(request: Request, session: ReadSession, _bearer: Bearer) -> Principal:
    found = authenticate_bearer(
        session,
        request.headers.get("authorization"),
        tokens=request.app.state.tokens,
        now=clock(request).now(),
        api_keys=request.app.state.api_key_principal,
    )
    logs.set_actor(found.account or found.role)  # the access line's actor: never a secret
    return found


Reader = Annotated[Principal, Depends(principal)]


def require_read(reader: Principal, address: str) -> None:
    if not reader.may_read(address):
        raise Forbidden(f"this key may not read {address}", detail={"address": address})


#: The largest body a route reading JSON itself accepts (the HTTP guard of ubc.app
#: refuses larger ones earlier, at its own configurable limit).
MAX_BODY = 16 * 1024 * 1024


async def json_body(request: Request) -> Any:
    """The request body as JSON (400 if it is not; 413 beyond :data:`MAX_BODY`), for the
    routes that take an envelope as it was signed (the write path, withdrawals)."""
    data = await request.body()
    if len(data) > MAX_BODY:
        raise PayloadTooLarge(f"request body over {MAX_BODY} bytes")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from None
