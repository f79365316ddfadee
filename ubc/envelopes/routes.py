"""HTTP: ``POST /api/envelopes`` and ``POST /api/envelopes/batch``, the one write path."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ubc.deps import JOURNAL_SIZE_HEADER, json_body
from ubc.envelopes.payloads import PAYLOAD_MODELS
from ubc.envelopes.schemas import BatchResults, Receipt
from ubc.envelopes.service import Accepted, Outcome
from ubc.envelopes.writer import GroupCommitWriter
from ubc.errors import BadRequest, UbcError
from ubc.schemas import ErrorBody, error_responses

router = APIRouter(tags=["envelopes"])

MAX_BATCH = 1000

_ENVELOPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["payloadType", "payload", "signatures"],
    "additionalProperties": False,
    "properties": {
        "payloadType": {
            "type": "string",
            "enum": [f"application/vnd.ubc.{t}+json" for t in sorted(PAYLOAD_MODELS)],
        },
        "payload": {
            "type": "string",
            "format": "byte",
            "description": "standard base64 of the exact payload bytes (UTF-8 JSON, ≤ 8 KiB)",
        },
        "signatures": {
            "type": "array",
            "minItems": 1,
            "maxItems": 8,
            "items": {
                "type": "object",
                "required": ["keyid", "sig"],
                "additionalProperties": False,
                "properties": {
                    "keyid": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
                    "sig": {"type": "string", "format": "byte"},
                },
            },
        },
    },
}
_ERRORS_DOC = error_responses(
    400,
    401,
    403,
    404,
    409,
    413,
    notes={
        400: "not JSON, bad base64, unknown type, bad field, wrong ledger, created_at outside "
        "the window",
        401: "no signature verifies under a key the ledger knows",
        403: "a known signer that may not do this (another member's account, suspended, not "
        "admitted, rotated key, non-steward)",
        404: "unknown account, member, cause, offer, epoch or API key",
        409: "insufficient funds, idempotency conflict, state conflict",
        413: "payload over 8 KiB",
    },
)
_BATCH_ERRORS_DOC = error_responses(
    400,
    409,
    413,
    notes={
        400: 'not {"atomic": bool, "envelopes": [1 to 1,000 envelopes]}',
        409: "batch_failed: an atomic batch could not apply whole (detail.index, "
        "detail.cause); nothing was applied",
    },
)

# The journal size a write produced: reads that send it back see the write (docs/http.md).
_SIZE_DOC: dict[str, Any] = {
    JOURNAL_SIZE_HEADER: {
        "description": "the journal's size once the accepted entries are in (the largest "
        "accepted seq + 1); send it as UBC-Min-Journal-Size on reads to see this write "
        "where a read replica serves them; absent when nothing was accepted",
        "schema": {"type": "integer", "minimum": 1},
    }
}


@router.post(
    "/api/envelopes",
    summary="Submit one signed envelope",
    status_code=201,
    description=(
        "Any DSSE envelope of DESIGN section 4. Answers 201 with `{seq, id, type, effects}`; "
        "a replay of an accepted id with the same payload bytes answers 200 with the same body."
        " Payload schemas: see the `*Payload` components."
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}},
        }
    },
    response_model=Receipt,
    responses={
        201: {"description": "accepted", "headers": _SIZE_DOC},
        200: {
            "model": Receipt,
            "description": "replay: the same body as when it was accepted",
            "headers": _SIZE_DOC,
        },
        **_ERRORS_DOC,
    },
)
async def post_envelope(request: Request) -> JSONResponse:
    raw = await json_body(request)
    writer: GroupCommitWriter = request.app.state.writer
    [outcome] = await writer.submit([raw])
    status, body = _answer(outcome)
    return JSONResponse(body, status_code=status, headers=_journal_size([outcome]))


@router.post(
    "/api/envelopes/batch",
    summary="Submit up to 1,000 envelopes, atomically or not",
    description=(
        'Body `{"atomic": bool, "envelopes": [...]}`. Answers 200 with one result per '
        "index. An atomic batch that cannot apply whole answers 409 naming the failing index "
        "and applies nothing."
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["envelopes"],
                        "additionalProperties": False,
                        "properties": {
                            "atomic": {"type": "boolean", "default": False},
                            "envelopes": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": MAX_BATCH,
                                "items": {"$ref": "#/components/schemas/Envelope"},
                            },
                        },
                    }
                }
            },
        }
    },
    response_model=BatchResults,
    responses={
        200: {"description": "one result per envelope", "headers": _SIZE_DOC},
        **_BATCH_ERRORS_DOC,
    },
)
async def post_batch(request: Request) -> JSONResponse:
    body = await json_body(request)
    if not isinstance(body, dict) or set(body) - {"atomic", "envelopes"}:
        raise BadRequest('a batch is {"atomic": bool, "envelopes": [...]}')
    atomic = body.get("atomic", False)
    envelopes = body.get("envelopes")
    if not isinstance(atomic, bool):
        raise BadRequest("atomic must be a boolean")
    if not isinstance(envelopes, list) or not 1 <= len(envelopes) <= MAX_BATCH:
        raise BadRequest(f"envelopes must be a list of 1 to {MAX_BATCH} envelopes")
    writer: GroupCommitWriter = request.app.state.writer
    outcomes = await writer.submit(envelopes, atomic=atomic)
    results = []
    for index, outcome in enumerate(outcomes):
        status, answer = _answer(outcome)
        results.append({"index": index, "status": status, "body": answer})
    return JSONResponse({"results": results}, headers=_journal_size(outcomes))


class EnvelopeFastPath:
    """Serves the two write endpoints ahead of FastAPI's routing and dependency machinery
    (like the gateway's ``FastPath``): the same handlers, registered above for the OpenAPI
    document, called directly. An exception is answered by the handler the application
    registered for it (``app.exception_handlers``, as FastAPI's ``ExceptionMiddleware``
    would); one without a handler goes up to the server-error middleware, as from a route.

    With 2 workers, single envelopes from 32 clients on PostgreSQL, routing through the
    application's ~100 routes, the dependency machinery and the exception middleware cost
    about a tenth of the server's CPU per envelope (``scripts/bench_envelopes.py
    --cpu-profile``, BENCHMARKS.md)."""

    def __init__(self, app: ASGIApp, *, exception_handlers: Mapping[Any, Any]) -> None:
        self.app = app
        # The application's dictionary itself: handlers registered later are seen too.
        self.exception_handlers = exception_handlers
        self.handlers: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/api/envelopes": post_envelope,
            "/api/envelopes/batch": post_batch,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.handlers.get(scope["path"])
            if handler is not None:
                request = Request(scope, receive)
                try:
                    response = await handler(request)
                except Exception as exc:
                    answer = self._exception_handler(exc)
                    if answer is None:
                        raise
                    response = answer(request, exc)
                    if inspect.isawaitable(response):
                        response = await response
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _exception_handler(self, exc: Exception) -> Any:
        # What Starlette's ExceptionMiddleware looks up: the nearest class in the MRO
        # (500 and Exception are the server-error middleware's, not this one's).
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            if cls in self.exception_handlers:
                return self.exception_handlers[cls]
        return None


def openapi_components() -> dict[str, Any]:
    """Schemas for the OpenAPI document: the envelope, every payload type, the error body."""
    components: dict[str, Any] = {
        "Envelope": _ENVELOPE_SCHEMA,
        # The error body's first name here, kept for documents that refer to it.
        "Error": {"$ref": f"#/components/schemas/{ErrorBody.__name__}"},
    }
    for name, model in PAYLOAD_MODELS.items():
        schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
        for key, sub in schema.pop("$defs", {}).items():
            components[key] = sub
        schema["description"] = f"payload of application/vnd.ubc.{name}+json"
        components[
            model.__name__ + "Payload" if not model.__name__.endswith("Payload") else model.__name__
        ] = schema
    return components


def _journal_size(outcomes: list[Outcome]) -> dict[str, str]:
    """``UBC-Journal-Size``: the journal's size once the accepted envelopes' entries are in
    it (a read that asks for it sees them, on the read replica too); none if none was."""
    seqs = [o.receipt.seq for o in outcomes if isinstance(o, Accepted)]
    return {JOURNAL_SIZE_HEADER: str(max(seqs) + 1)} if seqs else {}


def _answer(outcome: Outcome) -> tuple[int, dict[str, Any]]:
    if isinstance(outcome, Accepted):
        return outcome.status_code, outcome.receipt.body()
    assert isinstance(outcome, UbcError)
    return outcome.status_code, outcome.to_body()
