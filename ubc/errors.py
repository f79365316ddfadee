"""The one domain error hierarchy of ubc.

Business code raises these; the HTTP layer maps them to responses in one place
(``ubc.app``), with the body ``{"error": {"type", "message", "detail"}}`` of
DESIGN section 4. Nothing outside ``ubc.app`` raises ``HTTPException``.

    UbcError (500 internal)
    ├── BadRequest (400 bad_request)
    │   ├── InvalidEnvelope (400 invalid_envelope)
    │   └── InvalidPayload (400 invalid_payload)
    ├── Unauthenticated (401 unauthenticated)
    ├── Forbidden (403 forbidden)
    │   └── MissingSignature (403 missing_signature)
    ├── NotFound (404 not_found)
    │   ├── AccountNotFound (404 account_not_found)
    │   └── TransferNotFound (404 transfer_not_found)
    ├── Conflict (409 conflict)
    │   ├── InsufficientFunds (409 insufficient_funds)
    │   ├── IdempotencyConflict (409 idempotency_conflict)
    │   ├── StateConflict (409 state_conflict)
    │   └── BatchFailed (409 batch_failed)
    ├── PayloadTooLarge (413 payload_too_large)
    └── Unavailable (503 unavailable, with Retry-After)
"""

from __future__ import annotations

from typing import Any, ClassVar


class UbcError(Exception):
    """Base of every error ubc reports to a caller."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal"

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail: dict[str, Any] = detail or {}

    @property
    def status_code(self) -> int:
        return self.status

    @property
    def error_type(self) -> str:
        return self.type

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers of the response besides the JSON body."""
        return {}

    def to_body(self) -> dict[str, Any]:
        return {"error": {"type": self.error_type, "message": self.message, "detail": self.detail}}


class BadRequest(UbcError):
    status = 400
    type = "bad_request"


class InvalidEnvelope(BadRequest):
    type = "invalid_envelope"


class InvalidPayload(BadRequest):
    type = "invalid_payload"


class Unauthenticated(UbcError):
    status = 401
    type = "unauthenticated"


class Forbidden(UbcError):
    status = 403
    type = "forbidden"


class MissingSignature(Forbidden):
    """A required co-signature is absent; the same envelope may come back co-signed, so
    its id is not remembered as failed."""

    type = "missing_signature"


class NotFound(UbcError):
    status = 404
    type = "not_found"


class AccountNotFound(NotFound):
    type = "account_not_found"


class TransferNotFound(NotFound):
    type = "transfer_not_found"


class Conflict(UbcError):
    status = 409
    type = "conflict"


class InsufficientFunds(Conflict):
    type = "insufficient_funds"


class IdempotencyConflict(Conflict):
    type = "idempotency_conflict"


class StateConflict(Conflict):
    type = "state_conflict"


class BatchFailed(Conflict):
    """An atomic batch could not apply whole; ``detail["index"]`` names the failing item."""

    type = "batch_failed"

    def __init__(self, index: int, cause: UbcError) -> None:
        super().__init__(
            f"item {index} failed: {cause.message}",
            detail={"index": index, "cause": cause.to_body()["error"]},
        )
        self.index = index
        self.cause = cause


class PayloadTooLarge(UbcError):
    status = 413
    type = "payload_too_large"


class Unavailable(UbcError):
    """The database cannot serve the request now (unreachable, restarting, full, locked):
    nothing was changed, and the same request may succeed after ``retry_after`` seconds."""

    status = 503
    type = "unavailable"

    def __init__(
        self, message: str, *, detail: dict[str, Any] | None = None, retry_after: int = 5
    ) -> None:
        super().__init__(message, detail={**(detail or {}), "retry_after": retry_after})
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class StoredError(UbcError):
    """A failure remembered for an idempotency id, replayed with its original status and type."""

    def __init__(
        self, status: int, error_type: str, message: str, detail: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, detail=detail)
        self._status = status
        self._type = error_type

    @property
    def status_code(self) -> int:
        return self._status

    @property
    def error_type(self) -> str:
        return self._type
