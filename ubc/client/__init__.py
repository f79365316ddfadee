"""The Python client of a ubc ledger, used by the ``ubc`` command line and by members.

    from ubc.client import UbcClient, UbcApiError

    with UbcClient("http://127.0.0.1:8000", key=key, handle="alice", token=secret) as alice:
        alice.send("bob", 30, memo="thanks")
        alice.balance()
        for event in alice.events(from_seq=0, types=["transfer"]):  # live, resumes itself
            ...

    verify_webhook(body, headers, secret)  # a webhook receiver's check (docs/events.md)

Errors::

    Exception
    └── UbcApiError        any non-2xx answer: .status, .type, .message, .detail
    ValueError             local misuse (no signing key, no handle)
    httpx.TransportError   the ledger could not be reached (after the retries)
"""

from ubc.client._client import (
    API_KEY_PREFIX,
    Account,
    ApiKeyInfo,
    Balance,
    BatchResult,
    Effect,
    HistoryItem,
    HistoryPage,
    LedgerInfo,
    Member,
    MemberKey,
    Receipt,
    Transfer,
    TransferLeg,
    UbcApiError,
    UbcClient,
    api_key_hash,
    new_api_key_secret,
    read_events,
    to_address,
)
from ubc.client._webhooks import WebhookSignatureError, verify_webhook

__all__ = [
    "API_KEY_PREFIX",
    "Account",
    "ApiKeyInfo",
    "Balance",
    "BatchResult",
    "Effect",
    "HistoryItem",
    "HistoryPage",
    "LedgerInfo",
    "Member",
    "MemberKey",
    "Receipt",
    "Transfer",
    "TransferLeg",
    "UbcApiError",
    "UbcClient",
    "WebhookSignatureError",
    "api_key_hash",
    "new_api_key_secret",
    "read_events",
    "to_address",
    "verify_webhook",
]
