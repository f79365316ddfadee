"""What the HTTP surface answers, shared by every domain: the error body, the operations
probes, and the ``responses=`` of a route's error statuses for the OpenAPI document.

Pure pydantic (no FastAPI): each domain's ``schemas.py`` describes its own answers, the
routes attach them with ``response_model=`` or ``responses=``. The models describe the JSON
exactly as the routes write it today; integers stay integers.

Every route outside ``/v1`` answers errors as ``{"error": {"type", "message", "detail"}}``
(``ubc.errors``, docs/http.md section 5). Two statuses can come from any route, whatever it
does: 400 (a NUL character in the URL, JSON nested too deep) and 503 (the database cannot
serve now, or the worker is too busy: ``Retry-After``). :func:`error_responses` adds them
to the statuses a route names.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ALWAYS",
    "BEARER_SCHEME",
    "ERROR_DESCRIPTIONS",
    "ErrorBody",
    "ErrorInfo",
    "Health",
    "Readiness",
    "Schema",
    "absent",
    "document",
    "error_responses",
]

#: The name of the bearer scheme of reads in ``components/securitySchemes``.
BEARER_SCHEME: Final = "BearerToken"


class Schema(BaseModel):
    """Base of the response models: fields in the order the routes write them; a key the
    model does not name is kept as it is (``extra="allow"``), so that a model can never
    drop a field from an answer."""

    model_config = ConfigDict(extra="allow")


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def absent(description: str) -> Any:
    """A field that is sometimes left out of an answer (never written as null): not
    required, with no ``default`` in the document. Routes whose models have one answer
    with ``response_model_exclude_unset=True``."""
    return Field(default=None, description=description, json_schema_extra=_no_default)


class ErrorInfo(BaseModel):
    type: str = Field(
        description="stable, for programs: bad_request, invalid_envelope, invalid_payload, "
        "unauthenticated, forbidden, missing_signature, not_found, account_not_found, "
        "transfer_not_found, method_not_allowed, request_timeout, insufficient_funds, "
        "idempotency_conflict, state_conflict, conflict, batch_failed, payload_too_large, "
        "invalid_request, internal, unavailable, server_busy",
        examples=["insufficient_funds"],
    )
    message: str = Field(description="for people", examples=["member:alice has 12 CU available"])
    detail: dict[str, Any] = Field(
        description="the values involved (always an object, possibly empty)",
        examples=[{"account": "member:alice", "asset": "CU", "available": 12}],
    )


class ErrorBody(BaseModel):
    """Every error outside ``/v1``: ``{"error": {"type", "message", "detail"}}``."""

    error: ErrorInfo


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class ReplicaReadiness(Schema):
    """The read replica (``UBC_READ_DATABASE_URL``) as ``/readyz`` saw it: informative,
    never a reason to be unready (the primary serves its reads meanwhile)."""

    status: str = Field(description="ok, lagging (entries not replayed yet), paused or down")
    lag_entries: Annotated[int, absent("journal entries the replica has not replayed yet")]
    lag_seconds: Annotated[
        float, absent("how long ago the oldest entry it lacks was committed (0: none)")
    ]
    replay_lag_seconds: Annotated[float, absent("PostgreSQL's replay lag")]
    reason: Annotated[str, absent("why it is down")]
    warning: Annotated[str, absent("the URL is not a standby")]


class Readiness(Schema):
    """``ok`` with the schema revision, or ``unavailable`` with the reason."""

    status: str = Field(description="ok or unavailable")
    revision: Annotated[str | None, absent("the database's schema revision")]
    reason: Annotated[str, absent("why not ready")]
    head: Annotated[str, absent("the revision the code expects, when not migrated")]
    replica: Annotated[ReplicaReadiness, absent("with a read replica: how it is")]


#: What each status means on any route; a route may say more in ``notes``.
ERROR_DESCRIPTIONS: Final[dict[int, str]] = {
    400: "bad_request (or invalid_envelope, invalid_payload): a request that is not valid, "
    "a bad cursor or range, JSON nested too deep, a NUL character in the URL",
    401: "unauthenticated: no bearer token, or an unknown, revoked or expired one",
    403: "forbidden: a reader or signer that may not do this",
    404: "not_found (or account_not_found, transfer_not_found): nothing by that name",
    405: "method_not_allowed: the path does not take this method",
    408: "request_timeout: the request body did not arrive in time",
    409: "conflict, insufficient_funds, idempotency_conflict, state_conflict or batch_failed",
    413: "payload_too_large: a payload over 8 KiB, or a body over the server's limit",
    422: "invalid_request: a parameter out of its range or of the wrong type "
    "(detail.errors lists them)",
    503: "unavailable: the database cannot serve now (unreachable, restarting, full, "
    "locked) or the server is busy; nothing changed, retry after Retry-After seconds",
}

#: Statuses any route may answer: 400 for a URL or body refused before routing, 503.
ALWAYS: Final = (400, 503)

_RETRY_AFTER: Final[dict[str, Any]] = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "schema": {"type": "integer"},
    }
}


def error_responses(*statuses: int, notes: dict[int, str] | None = None) -> dict[int | str, Any]:
    """``responses=`` of a route for its error statuses (plus :data:`ALWAYS`), each with
    the :class:`ErrorBody` schema; ``notes`` adds route-specific words to a status."""
    notes = notes or {}
    responses: dict[int | str, Any] = {}
    for status in sorted({*statuses, *ALWAYS}):
        description = ERROR_DESCRIPTIONS[status]
        if status in notes:
            description = f"{notes[status]}. {description}"
        response: dict[str, Any] = {"model": ErrorBody, "description": description}
        if status == 503:
            response["headers"] = _RETRY_AFTER
        responses[status] = response
    return responses


_VALIDATION_ERROR: Final = "#/components/schemas/HTTPValidationError"


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """Fix an assembled OpenAPI document (in place; returned too) where FastAPI describes
    what the app does otherwise, outside ``/v1``:

    - FastAPI lists its own 422 body (``HTTPValidationError``) on every operation with
      parameters, but the app answers a request FastAPI refuses in the error body
      (``ubc.app``): such a 422 becomes :class:`ErrorBody`, and the components nothing
      refers to any more are dropped;
    - FastAPI files every response of a route under the media type of the route's
      response class (``text/plain`` for the checkpoint), but errors are always JSON.
    """
    body = {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}
    for path, item in schema.get("paths", {}).items():
        if path.startswith("/v1/"):
            continue
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if not status.startswith(("4", "5")) or not content:
                    continue
                if "application/json" not in content:
                    response["content"] = content = {"application/json": content.popitem()[1]}
                media = content["application/json"]
                if media.get("schema", {}).get("$ref") == _VALIDATION_ERROR:
                    media["schema"] = body
                    response["description"] = ERROR_DESCRIPTIONS[422]
    components = schema.get("components", {}).get("schemas", {})
    text = repr(schema.get("paths", {}))
    if _VALIDATION_ERROR not in text:
        components.pop("HTTPValidationError", None)
        if "#/components/schemas/ValidationError" not in text:
            components.pop("ValidationError", None)
    return schema
