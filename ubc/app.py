"""The FastAPI application factory; the one place where domain errors become HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text

from ubc import __version__
from ubc.config import Settings, get_settings
from ubc.db import make_engine, make_session_factory, unit_of_work
from ubc.errors import UbcError
from ubc.ledger import service as ledger
from ubc.migrations import current_revision, head_revision

log = logging.getLogger("ubc")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep_holds(app, settings.hold_sweep_interval_seconds))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            engine.dispose()

    app = FastAPI(
        title="ubc",
        version=__version__,
        summary="Universal Basic Compute ledger",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = sessions

    @app.exception_handler(UbcError)
    async def _ubc_error(_request: Request, error: UbcError) -> JSONResponse:
        return JSONResponse(error.to_body(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        body = {
            "error": {
                "type": "invalid_request",
                "message": "the request body is not valid",
                "detail": {"errors": _jsonable_errors(error.errors())},
            }
        }
        return JSONResponse(body, status_code=422)

    @app.get("/healthz", tags=["ops"], summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="The database is reachable and migrated")
    def readyz() -> JSONResponse:
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            current, head = current_revision(engine), head_revision()
        except Exception as exc:  # any driver error means not ready
            return JSONResponse(
                {"status": "unavailable", "reason": f"database unreachable: {exc}"},
                status_code=503,
            )
        if current != head:
            return JSONResponse(
                {
                    "status": "unavailable",
                    "reason": "database not migrated",
                    "revision": current,
                    "head": head,
                },
                status_code=503,
            )
        return JSONResponse({"status": "ok", "revision": current})

    return app


async def _sweep_holds(app: FastAPI, interval: float) -> None:
    """Release expired holds now and every ``interval`` seconds, also after a restart."""
    while True:
        try:
            await asyncio.to_thread(_sweep_once, app)
        except Exception:  # keep sweeping; the next round retries
            log.exception("hold sweep failed")
        await asyncio.sleep(interval)


def _sweep_once(app: FastAPI) -> None:
    while True:
        with unit_of_work(app.state.sessions) as session:
            released = ledger.expire_holds(session)
        if released == 0:
            return


def _jsonable_errors(errors: Any) -> list[dict[str, Any]]:
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
        for e in errors
    ]
