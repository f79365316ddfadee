"""Check a webhook delivery on the receiving side (docs/events.md, "Verifying a delivery").

    from ubc.client import WebhookSignatureError, verify_webhook

    try:
        event = verify_webhook(request_body, request_headers, secret)
    except WebhookSignatureError:
        return 400  # not from the ledger, altered, or too old
    if already_seen(event["seq"]):  # deliveries are at least once: dedupe by seq
        return 200
    ...

Standard library only, so an integrator can also copy it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["WebhookSignatureError", "verify_webhook"]


class WebhookSignatureError(ValueError):
    """The delivery is not signed with the secret, is altered, or is outside the tolerance."""


def verify_webhook(
    body: bytes | str,
    headers: Mapping[str, str],
    secret: str,
    tolerance: float = 300,
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """The delivered event ``{seq, type, leaf_hash, entry}`` if ``body`` carries a valid
    ``ubc-signature`` under ``secret`` made at most ``tolerance`` seconds from ``now``
    (default: this machine's clock), else :class:`WebhookSignatureError`.

    ``body`` is the request body exactly as received (before any JSON parsing);
    ``headers`` any mapping of the request's headers (names in any case). Every ``v1=``
    signature of the header is tried, so a receiver keeps working while the operator
    rotates the secret by registering the endpoint anew."""
    raw = body.encode() if isinstance(body, str) else bytes(body)
    header = _header(headers, "ubc-signature")
    if header is None:
        raise WebhookSignatureError("no ubc-signature header")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise WebhookSignatureError("the signature's t is not a number") from None
        elif name == "v1":
            signatures.append(value.strip().lower())
    if timestamp is None or not signatures:
        raise WebhookSignatureError("the ubc-signature header needs t= and v1=")
    moment = time.time() if now is None else now
    if abs(moment - timestamp) > tolerance:
        raise WebhookSignatureError(
            f"the signature's time {timestamp} is more than {tolerance:g} s from now"
        )
    expected = hmac.new(
        secret.encode(), str(timestamp).encode() + b"." + raw, hashlib.sha256
    ).hexdigest()
    if not any(hmac.compare_digest(expected, s) for s in signatures):
        raise WebhookSignatureError("the signature does not match (wrong secret or altered body)")
    try:
        event = json.loads(raw)
    except ValueError:
        raise WebhookSignatureError("the body is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("seq"), int):
        raise WebhookSignatureError("the body is not a journal event")
    event_id = _header(headers, "ubc-event-id")
    if event_id is not None and event_id.strip() != str(event["seq"]):
        raise WebhookSignatureError("ubc-event-id does not match the body's seq")
    return event


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    for key, found in headers.items():
        if key.lower() == name:
            return found
    return None
