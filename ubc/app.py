"""The FastAPI application factory; the one place where domain errors become HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.telemetry import TelemetryConfig
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ubc import __version__, apikey_routes, http_guard, logs, metrics
from ubc import schemas as api_schemas
from ubc.causes import routes as cause_routes
from ubc.clock import SYSTEM_CLOCK, Clock
from ubc.config import Settings, get_settings
from ubc.console import actions as console_actions
from ubc.console import routes as console_routes
from ubc.db import (
    DATABASE_ERRORS,
    RETRY_AFTER_S,
    as_unavailable,
    make_engine,
    make_session_factory,
    readiness_problem,
    run_unit_of_work,
    unit_of_work,
)
from ubc.db.leader import Leaders
from ubc.db.replica import ReadReplica
from ubc.envelopes import routes as envelope_routes
from ubc.envelopes import service as write_path
from ubc.envelopes.registry import REGISTRY
from ubc.envelopes.writer import GroupCommitWriter
from ubc.epochs import routes as epoch_routes
from ubc.epochs import service as epochs
from ubc.errors import BadRequest, Forbidden, NotFound, UbcError, Unauthenticated
from ubc.gateway import metering
from ubc.gateway import routes as gateway_routes
from ubc.gateway import schemas as gateway_schemas
from ubc.gateway import usage as gateway_usage
from ubc.gateway.metering import HoldWriter
from ubc.gateway.service import Gateway, GatewayError
from ubc.journal import routes as journal_routes
from ubc.journal import webhook_routes, webhooks
from ubc.ledger import routes as ledger_routes
from ubc.ledger import service as ledger
from ubc.ledger.routes import EpochReads
from ubc.market import routes as market_routes
from ubc.market import service as market
from ubc.members import routes as member_routes
from ubc.members.auth import api_key_principal
from ubc.migrations import current_revision, head_revision
from ubc.runtime import Runtime, is_loopback, load_runtime
from ubc.schemas import ErrorBody, Health, Readiness, error_responses
from ubc.witness import cosigning

log = logging.getLogger("ubc")


_NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def _opentelemetry_configured() -> bool:
    return any(name.startswith("OTEL_") for name in os.environ) or bool(
        os.environ.get("FASTAPI_OTEL_AUTO_CONFIGURE")
    )


def create_app(settings: Settings | None = None, *, clock: Clock | None = None) -> FastAPI:
    """The application; ``clock`` is the ledger's time (default: the wall clock; tests
    give a :class:`ubc.clock.ManualClock` and move it instead of sleeping)."""
    settings = settings or get_settings()
    ledger_clock: Clock = clock or SYSTEM_CLOCK
    engine = make_engine(settings.database_url)
    read_engine = make_engine(settings.database_url, readonly=True)
    # Holds of model calls commit without waiting for the disk (see make_engine).
    hold_engine = make_engine(settings.database_url, lazy_commit=True, pool_size=2)
    sessions = make_session_factory(engine)
    # Reads of history, reports and the journal go to a streaming replica when one is set
    # (ubc.deps routes them; README "A read replica").
    replica = (
        ReadReplica(settings.read_database_url, primary=engine)
        if settings.read_database_url
        else None
    )
    # The ledger's witnesses (UBC_WITNESSES): a bad setting stops the start here.
    witness_endpoints = cosigning.parse_witnesses(settings.witnesses)
    witnessing = cosigning.witnessing_of(
        witness_endpoints, settings.witness_quorum, settings.witness_interval_seconds
    )
    witness_rounds = cosigning.WitnessRounds(
        witness_endpoints,
        quorum=witnessing.quorum,
        interval=settings.witness_interval_seconds,
        timeout=settings.witness_timeout_seconds,
        sessions=sessions,
        engine=engine,
        clock=ledger_clock,
    )
    # Webhook deliveries (docs/events.md): one process of all delivers (the leader lock).
    deliverer = webhooks.Deliverer(
        sessions=sessions,
        engine=engine,
        clock=ledger_clock,
        timeout=settings.webhook_timeout_seconds,
        retry_seconds=settings.webhook_retry_seconds,
        retention_seconds=settings.webhook_log_retention_seconds,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await asyncio.to_thread(_load_runtime, sessions, settings, ledger_clock)
        app.state.ctx = runtime.ctx
        app.state.tokens = runtime.tokens
        app.state.ledger_info = runtime.info
        writer = GroupCommitWriter(
            sessions, runtime.ctx, read_sessions=app.state.read_sessions, clock=ledger_clock
        )
        app.state.writer = writer
        writer.start()
        holds = HoldWriter(
            make_session_factory(hold_engine),
            timeout=timedelta(seconds=settings.gateway_hold_timeout_seconds),
            clock=ledger_clock,
        )
        holds.start()
        gateway = Gateway(
            ctx=runtime.ctx,
            catalog=runtime.catalog,
            prices=runtime.prices,
            read_sessions=app.state.read_sessions,
            holds=holds,
            writer=writer,
            clock=ledger_clock,
            redis_url=settings.redis_url,
            spare_holds=settings.gateway_spare_holds,
        )
        if gateway.shared_limiter is not None:
            await gateway.shared_limiter.start()  # a warning if Redis is down; serve anyway
        app.state.gateway = gateway
        stop = asyncio.Event()
        # One process (of every worker and host on this database) runs each background
        # job's rounds at a time: ubc.db.leader.
        leaders = app.state.leaders = Leaders(engine)
        background = [
            asyncio.create_task(
                _sweep_holds(app, settings.hold_sweep_interval_seconds, stop, leaders)
            ),
            asyncio.create_task(_advance_epochs(app, stop, leaders)),
            asyncio.create_task(deliverer.run(stop, lambda: _leads(leaders, "webhooks"))),
        ]
        if witness_endpoints:  # cosignatures, in rounds: never on the write path
            background.append(
                asyncio.create_task(
                    witness_rounds.run(stop, lambda: _leads(leaders, "witness-round"))
                )
            )
        try:
            yield
        finally:
            # Let each loop finish the round it is in (its thread holds a connection),
            # so that nothing is left using the engines when they are disposed.
            stop.set()
            try:
                # A loop that ended with an error (or was cancelled) must not keep the
                # rest from stopping: the locks, queues and connections below.
                ends = await asyncio.gather(*background, return_exceptions=True)
                for job, ended in zip(background, ends, strict=True):
                    if isinstance(ended, BaseException):
                        log.error("background job %s ended with %r", job.get_name(), ended)
            finally:
                await leaders.aclose()  # another process takes the jobs over
                try:
                    await gateway.close_spares()  # while the hold writer still runs
                    await holds.stop()
                    # Queued usage entries are written before the writer stops.
                    await gateway.aclose()
                    await writer.stop()
                finally:
                    engine.dispose()
                    read_engine.dispose()
                    hold_engine.dispose()
                    if replica is not None:
                        replica.dispose()

    app = FastAPI(
        # FastAPI's own OpenTelemetry spans and metrics: only where OpenTelemetry is set up
        # (an ``OTEL_*`` variable in the environment); otherwise FastAPI would look for
        # configured providers on every request (~10 µs of CPU each).
        telemetry=None if _opentelemetry_configured() else _NO_TELEMETRY,
        title="ubc",
        version=__version__,
        summary="Universal Basic Compute ledger",
        lifespan=lifespan,
        # /docs is served by ubc.http_guard from local files; ReDoc needs a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.clock = ledger_clock
    app.state.witnessing = witnessing
    app.state.witness_rounds = witness_rounds
    app.state.webhooks = deliverer
    app.state.payload_types = frozenset(REGISTRY.specs)
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.read_sessions = make_session_factory(read_engine, retry_reads=True)
    app.state.replica = replica
    # What the layers below use of the ones beside or above them, handed over here, at the
    # top (DESIGN section 2: no cycle, each layer imports only the ones below it): the
    # read routes' API-key lookup (the members' tables), the ledger's reads of the epochs,
    # and the write path's precheck for the market's stored withdrawals.
    app.state.api_key_principal = api_key_principal
    epoch_reads: EpochReads = epochs
    app.state.epoch_reads = epoch_reads
    app.state.precheck = write_path.precheck
    # The ledger's state for GET /metrics, read once per scrape (not registered globally).
    app.state.metrics = metrics.StateCollector(
        app.state.read_sessions,
        ledger_clock.now,
        balance_interval=settings.metrics_balance_interval_seconds,
        replica=(lambda: replica.status(ledger_clock.now())) if replica is not None else None,
    )
    for router in (
        envelope_routes.router,
        ledger_routes.router,
        member_routes.router,
        apikey_routes.router,
        journal_routes.router,
        webhook_routes.router,
        epoch_routes.router,
        cause_routes.router,
        market_routes.router,
        gateway_routes.router,
        gateway_usage.router,
        console_routes.router,
        console_actions.router,
    ):
        app.include_router(router)
    app.mount(console_routes.STATIC_URL, console_routes.static, name="console_static")
    _document(app)
    app.add_middleware(gateway_routes.FastPath)
    app.add_middleware(envelope_routes.EnvelopeFastPath, exception_handlers=app.exception_handlers)
    app.add_middleware(RefuseNul)
    # Outermost: body size, read timeout and JSON depth (also for FastPath), /docs, and
    # security headers on every response.
    http_guard.install(app, settings)
    # Around even that: the request id of every response and the access line (ubc.logs).
    build_guarded = app.build_middleware_stack
    app.build_middleware_stack = lambda: logs.RequestLog(build_guarded())  # type: ignore[method-assign]

    @app.exception_handler(UbcError)
    async def _ubc_error(_request: Request, error: UbcError) -> JSONResponse:
        return JSONResponse(error.to_body(), status_code=error.status_code, headers=error.headers)

    async def _database_error(request: Request, error: Exception) -> JSONResponse:
        # Unreachable, restarting, full or locked: 503 with Retry-After; anything else is
        # a bug, logged, answered 500 in the documented shape rather than as plain text.
        known: UbcError | None = as_unavailable(error)
        if known is None:
            log.error("database error on %s %s", request.method, request.url.path, exc_info=error)
            known = UbcError("internal error")
        return await _ubc_error(request, known)

    for database_error in DATABASE_ERRORS:
        app.add_exception_handler(database_error, _database_error)

    @app.exception_handler(GatewayError)
    async def _gateway_error(_request: Request, error: GatewayError) -> JSONResponse:
        return gateway_routes.error_response(error)

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

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # The framework's own refusals (no such path: 404; a method the path does not
        # take: 405, with Allow) in the documented shape instead of {"detail": ...}.
        return http_error_response(request, error)

    @app.get(
        "/healthz",
        tags=["ops"],
        summary="The process is up",
        response_model=Health,
        responses=error_responses(),
    )
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["ops"],
        summary="The database is reachable and migrated",
        response_model=Readiness,
        responses={
            **error_responses(),
            503: {
                **error_responses()[503],
                "model": Readiness | ErrorBody,
                "description": "not ready: {status: unavailable, reason, ...}; or the server "
                "is busy (the error body); Retry-After when it may come back by itself",
            },
        },
    )
    def readyz() -> JSONResponse:
        # Reachable and writable: a full disk fails readiness too (see readiness_problem).
        problem = readiness_problem(engine)
        current, head = None, head_revision()
        try:
            if problem is None:
                current = current_revision(engine)
        except Exception as exc:  # any driver error means not ready
            problem = f"database unreachable: {type(exc).__name__}"
        if problem is not None:
            return JSONResponse(
                {"status": "unavailable", "reason": problem},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_S)},
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
        ready: dict[str, Any] = {"status": "ok", "revision": current}
        if replica is not None:
            # Informative: a replica behind or down does not fail readiness (reads then go
            # to the primary).
            ready["replica"] = replica.status(ledger_clock.now()).to_json()
        return JSONResponse(ready)

    @app.get(
        "/metrics",
        tags=["ops"],
        summary="Prometheus metrics (text format)",
        response_class=PlainTextResponse,
        responses={
            200: {
                "description": "the Prometheus text exposition format 0.0.4",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **error_responses(
                401,
                403,
                404,
                notes={
                    401: "UBC_METRICS_ACCESS requires a token and none was given",
                    403: "the token is wrong, or no UBC_METRICS_TOKEN is configured",
                    404: "UBC_METRICS_ACCESS=off",
                },
            ),
        },
    )
    def get_metrics(request: Request) -> Response:
        check_metrics_access(settings, request)
        body = metrics.exposition(app.state.metrics)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    return app


class MetricsUnauthenticated(Unauthenticated):
    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="metrics"'}


def check_metrics_access(settings: Settings, request: Request) -> None:
    """Whether ``request`` may read ``/metrics`` (``UBC_METRICS_ACCESS``), else the error.

    ``auto`` is open when the server listens on loopback only: the host ``ubc serve`` was
    given, or, when it is unknown (an app served otherwise), the local address this
    connection came to; else it is ``token``. A token is compared in constant time."""
    mode = settings.metrics_access
    if mode == "off":
        raise NotFound("no route /metrics (UBC_METRICS_ACCESS=off)", detail={"path": "/metrics"})
    if mode == "open":
        return
    if mode == "auto":
        host = os.environ.get(metrics.BIND_HOST_ENV)
        if host is None:
            server = request.scope.get("server")
            host = str(server[0]) if server else ""
        if is_loopback(host):
            return
    expected = settings.metrics_token.get_secret_value() if settings.metrics_token else ""
    if not expected:
        raise Forbidden(
            "/metrics requires a token here and none is configured: set UBC_METRICS_TOKEN "
            "(or UBC_METRICS_ACCESS=open)"
        )
    authorization = request.headers.get("authorization", "")
    if not authorization.lower().startswith("bearer "):
        raise MetricsUnauthenticated("/metrics requires Authorization: Bearer <metrics token>")
    if not hmac.compare_digest(authorization[7:].strip().encode(), expected.encode()):
        raise Forbidden("wrong metrics token")


class RefuseNul:
    """400 for a URL carrying a NUL character: no text column of PostgreSQL can hold or
    compare one, so it would otherwise reach the database as an error (500) wherever a
    path or query parameter is used in a query."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope["query_string"]):
            body = BadRequest("a NUL character is not accepted in a URL").to_body()
            await JSONResponse(body, status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


_HTTP_ERROR_TYPES = {
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def http_error_response(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """A refusal of the framework (an unknown path, a method not allowed) in the shape of
    the surface it falls under: OpenAI's under ``/v1/``, ubc's everywhere else."""
    status = error.status_code
    path, method = request.url.path, request.method
    if status == 404:
        message = f"no route {path}"
    elif status == 405:
        message = f"{method} is not allowed on {path}"
    else:
        message = str(error.detail)
    if path.startswith("/v1/"):
        openai = {"message": f"Invalid URL ({method} {path})", "type": "invalid_request_error"}
        if status not in (404, 405):
            openai["message"] = message
        body: dict[str, Any] = {"error": {**openai, "param": None, "code": None}}
    else:
        kind = _HTTP_ERROR_TYPES.get(status, "bad_request" if status < 500 else "internal")
        detail: dict[str, Any] = {"path": path}
        if status == 405:
            allow = (error.headers or {}).get("Allow", "")
            detail = {"path": path, "method": method, "allow": allow.split(", ") if allow else []}
        body = {"error": {"type": kind, "message": message, "detail": detail}}
    return JSONResponse(body, status_code=status, headers=error.headers)


def _load_runtime(sessions: sessionmaker[Session], settings: Settings, clock: Clock) -> Runtime:
    with unit_of_work(sessions) as session:
        return load_runtime(settings, session, now=clock.now())


def _document(app: FastAPI) -> None:
    """Add the envelope and payload schemas to the OpenAPI document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                envelope_routes.openapi_components()
            )
            api_schemas.document(schema)
            gateway_schemas.document(schema)  # the /v1 routes and their bearer key
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _leads(leaders: Leaders | None, job: str) -> bool:
    """Whether this process runs ``job``'s round now: it holds the job's leader lock
    (``ubc.db.leader``); without ``leaders``, always."""
    return leaders is None or await leaders.lead(job)


async def _sweep_holds(
    app: FastAPI, interval: float, stop: asyncio.Event, leaders: Leaders | None = None
) -> None:
    """Release expired holds now and every ``interval`` seconds, also after a restart
    (in the one process that leads the job ``hold-sweep``)."""
    while not stop.is_set():
        if await _leads(leaders, "hold-sweep"):
            try:
                started = time.perf_counter()
                calls, other, offers = await asyncio.to_thread(sweep_once, app)
                if calls or other or offers:
                    _job_done("hold sweep", started, calls=calls, holds=other, offers=offers)
            except Exception:  # keep sweeping; the next round retries
                log.exception("hold sweep failed")
        await _pause(stop, interval)


async def _advance_epochs(
    app: FastAPI, stop: asyncio.Event, leaders: Leaders | None = None
) -> None:
    """Fix and apply opening epochs' allocations batch by batch, and journal closing
    epochs' expiry steps one by one (also an open or a close left half-done by a crash);
    in the one process that leads the job ``epochs``."""
    while not stop.is_set():
        if not await _leads(leaders, "epochs"):
            await _pause(stop, 0.5)
            continue
        try:
            started = time.perf_counter()
            steps = await asyncio.to_thread(_advance_once, app)
            progressed = bool(steps)
            if steps:
                _job_done("epoch step", started, steps=steps)
        except Exception:  # keep going; the next round retries the batch
            log.exception("epoch allocation batch failed")
            progressed = False
        await _pause(stop, 0 if progressed else 0.5)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if the server is stopping."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def _job_done(job: str, started: float, **did: object) -> None:
    """The log line of a background job's round that did something."""
    elapsed = round((time.perf_counter() - started) * 1000, 3)
    what = ", ".join(f"{name} {value}" for name, value in did.items())
    log.info(
        "%s: %s in %.1f ms",
        job,
        what,
        elapsed,
        extra={"fields": {"job": job, **did, "ms": elapsed}},
    )


def _advance_once(app: FastAPI) -> list[str]:
    """One round; the steps that progressed (fix, allocate, expire), empty if none."""
    clock: Clock = app.state.clock

    def fix(session: Session) -> bool:
        return any(epochs.fix_ahead(session, n) for n in epochs.pending_epochs(session))

    def allocate(session: Session) -> bool:
        now = clock.now()
        return any(
            epochs.apply_allocations(session, n, now=now) for n in epochs.pending_epochs(session)
        )

    def expire(session: Session) -> bool:
        return epochs.next_close_step(
            session, app.state.ctx, now=clock.now(), submit=write_path.submit
        )

    # Each its own transaction: fixing locks the epoch's row, allocating its members'
    # accounts, and a close step the journal.
    fixed = False
    while run_unit_of_work(app.state.sessions, fix):  # a batch's worth, step by step
        fixed = True
    allocated = run_unit_of_work(app.state.sessions, allocate)
    expired = run_unit_of_work(app.state.sessions, expire)
    done = (("fix", fixed), ("allocate", allocated), ("expire", expired))
    return [name for name, progressed in done if progressed]


def sweep_once(app: FastAPI) -> tuple[int, int, int]:
    """One round of the sweeper: expired holds of model calls (journaled ``hold.expire``),
    other expired holds, and expired offers (journaled ``offer.expire``), until none is
    due; how many of each. Each unit of work reads the ledger's clock once."""
    ctx = app.state.ctx
    clock: Clock = app.state.clock
    totals = (0, 0, 0)
    while True:
        # Model calls' holds first: each journaled as a ledger-signed hold.expire.
        calls = run_unit_of_work(
            app.state.sessions,
            lambda session: metering.expire_due_holds(
                session, ctx, now=clock.now(), submit=write_path.submit
            ),
        )
        released = calls + run_unit_of_work(
            app.state.sessions, lambda session: ledger.expire_holds(session, now=clock.now())
        )
        metrics.HOLDS_EXPIRED.inc(released)
        expired = run_unit_of_work(
            app.state.sessions,
            lambda session: market.expire_due_offers(
                session, ctx, now=clock.now(), submit=write_path.submit
            ),
        )
        totals = (totals[0] + calls, totals[1] + released - calls, totals[2] + expired)
        if released == 0 and expired == 0:
            return totals


def _jsonable_errors(errors: Any) -> list[dict[str, Any]]:
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
        for e in errors
    ]
