"""FastAPI dependencies: a read session per request (on the read replica when there is
one), the reader's principal, and a request body read as strict JSON."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from ubc import logs, metrics
from ubc.auth import Principal, authenticate_bearer
from ubc.clock import Clock
from ubc.db import DATABASE_ERRORS
from ubc.db.replica import ReadReplica
from ubc.errors import BadRequest, Forbidden, PayloadTooLarge
from ubc.schemas import BEARER_SCHEME

#: Every write answers the journal size it produced (its entries are below that size).
JOURNAL_SIZE_HEADER = "UBC-Journal-Size"
#: A read asks for a journal size at least this (read-your-writes with a read replica).
MIN_JOURNAL_SIZE_HEADER = "UBC-Min-Journal-Size"


#: The same for pages a browser navigates to: the console's scripts keep the size their
#: latest write answered in this cookie (not a secret; a bad value is ignored).
MIN_JOURNAL_SIZE_COOKIE = "ubc_journal_size"


def min_journal_size(request: Request) -> int | None:
    """The journal size a read asks for (``UBC-Min-Journal-Size``, else the console's
    cookie), or None; 400 if the header is not a non-negative integer (of at most 19
    digits)."""
    value = request.headers.get(MIN_JOURNAL_SIZE_HEADER)
    if value is None or not value.strip():
        cookie = request.cookies.get(MIN_JOURNAL_SIZE_COOKIE, "")
        ok = cookie.isascii() and cookie.isdigit() and len(cookie) <= 19
        return int(cookie) if ok else None
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise BadRequest(
            f"{MIN_JOURNAL_SIZE_HEADER} must be a journal size (a non-negative integer)",
            detail={"header": MIN_JOURNAL_SIZE_HEADER, "value": value[:40]},
        )
    return int(text)


class Reads:
    """The read sessions of one request: the routed one (the read replica when there is
    one and it has the journal size the request asks for, else the primary) and, when a
    read must see the primary (who is reading: a key revoked a moment ago is revoked), the
    primary's. Without a replica both are one session."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self._primary: Session | None = None
        self._routed: Session | None = None
        self.factory: sessionmaker[Session] = request.app.state.read_sessions

    def primary(self) -> Session:
        if self._primary is None:
            self._primary = self.request.app.state.read_sessions()
        return self._primary

    def routed(self) -> Session:
        if self._routed is None:
            self._routed = self._route()
        return self._routed

    def _route(self) -> Session:
        min_size = min_journal_size(self.request)
        replica: ReadReplica | None = getattr(self.request.app.state, "replica", None)
        if replica is None:
            return self.primary()
        session, route = replica.open(min_size)
        if session is None:
            metrics.REPLICA_FALLBACKS.labels(route.value).inc()
            return self.primary()
        metrics.REPLICA_READS.inc()
        self.factory = replica.sessions
        return session

    @property
    def may_wait(self) -> bool:
        """Whether routing may wait on a database (the replica's journal size is read)."""
        return self._routed is None and getattr(self.request.app.state, "replica", None) is not None

    def close(self) -> None:
        for session in {id(s): s for s in (self._primary, self._routed) if s is not None}.values():
            # A connection lost meanwhile (the replica stopped) fails the rollback too: the
            # answer was given, and closing the session returns or discards the connection.
            with contextlib.suppress(*DATABASE_ERRORS):
                session.rollback()
            session.close()


def reads(request: Request) -> Iterator[Reads]:
    held = Reads(request)
    try:
        yield held
    finally:
        held.close()


async def read_session(
    held: Annotated[Reads, Depends(reads)],
    _min_size: Annotated[
        str | None,
        Header(
            alias=MIN_JOURNAL_SIZE_HEADER,
            description="serve this read from a database holding at least this many "
            "journal entries: the UBC-Journal-Size a write answered (read-your-writes "
            "where a read replica serves reads)",
            json_schema_extra={"pattern": "^[0-9]{1,19}$"},
        ),
    ] = None,
) -> Session:
    """The request's read session: on the read replica if there is one (see :class:`Reads`).
    Asking the replica runs in a worker thread; without one, nothing waits (a session
    connects on its first statement). ``_min_size`` documents the header (``Reads`` reads
    and checks it: 400 rather than FastAPI's 422)."""
    if held.may_wait:
        return await run_in_threadpool(held.routed)
    return held.routed()


async def primary_read_session(held: Annotated[Reads, Depends(reads)]) -> Session:
    """A read session on the primary, for reads that must see the latest writes."""
    return held.primary()


ReadSession = Annotated[Session, Depends(read_session)]
PrimaryReadSession = Annotated[Session, Depends(primary_read_session)]
#: The request's :class:`Reads` (the same object its read sessions come from): ``factory``
#: opens more sessions on the database that serves its routed one (a streamed report).
RequestReads = Annotated[Reads, Depends(reads)]


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


def principal(request: Request, session: PrimaryReadSession, _bearer: Bearer) -> Principal:
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
