"""The write routes' fast path (``EnvelopeFastPath``) answers exactly as FastAPI's routing
of the same handlers: the same status, body and headers, for every kind of answer."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import make_data_dir, serve_asgi
from ubc.app import create_app
from ubc.config import Settings
from ubc.envelopes.payloads import validate_payload
from ubc.envelopes.routes import EnvelopeFastPath
from ubc.envelopes.service import sign_payload
from ubc.errors import Unavailable
from ubc.rules.payload import format_timestamp
from ubc.signing import encode_public_key, generate_signing_key

ORIGIN = "test.ubc/ledger"
# Never the same from one answer to the next.
_VARYING = {"date", "x-request-id"}


def _without_fast_path(app: Any) -> Any:
    app.user_middleware = [m for m in app.user_middleware if m.cls is not EnvelopeFastPath]
    return app


@pytest.fixture
def both(db_url: str, tmp_path: Path) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """The same ledger served with the fast path (first) and without it (second)."""
    settings = Settings(
        database_url=db_url,
        data_dir=make_data_dir(tmp_path / "data"),
        origin=ORIGIN,
        enrollment="open",
    )
    fast_app = create_app(settings)
    slow_app = _without_fast_path(create_app(settings))
    with (
        serve_asgi(fast_app) as fast_url,
        serve_asgi(slow_app) as slow_url,
        httpx.Client(base_url=fast_url) as fast,
        httpx.Client(base_url=slow_url) as slow,
    ):
        yield fast, slow


def _headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in _VARYING}


def _same(fast: httpx.Response, slow: httpx.Response) -> None:
    assert fast.status_code == slow.status_code, (fast.text, slow.text)
    assert fast.content == slow.content
    assert _headers(fast) == _headers(slow)
    assert fast.headers["x-request-id"]
    assert slow.headers["x-request-id"]


def _register(handle: str) -> dict[str, Any]:
    key = generate_signing_key()
    payload = {
        "ledger": ORIGIN,
        "id": str(uuid.uuid4()),
        "created_at": format_timestamp(datetime.now(UTC)),
        "actor": f"member:{handle}",
        "handle": handle,
        "public_key": encode_public_key(bytes(key.verify_key)),
    }
    signed = sign_payload(validate_payload("member.register", payload), "member.register", [key])
    return signed.to_json()


BAD_BODIES: Sequence[tuple[str, bytes]] = [
    ("/api/envelopes", b"not json"),
    ("/api/envelopes", b"[]"),
    ("/api/envelopes", b""),
    ("/api/envelopes", b'{"payloadType": "application/vnd.ubc.nope+json"}'),
    (
        "/api/envelopes",
        json.dumps(
            {
                "payloadType": "application/vnd.ubc.transfer+json",
                "payload": base64.b64encode(b'{"id": 1}').decode(),
                "signatures": [{"keyid": "0123456789abcdef", "sig": "AAAA"}],
            }
        ).encode(),
    ),
    ("/api/envelopes/batch", b'{"atomic": "yes", "envelopes": []}'),
    ("/api/envelopes/batch", b'{"envelopes": [[]]}'),
    ("/api/envelopes/batch", b'{"atomic": true, "envelopes": [[]]}'),
]


@pytest.mark.parametrize(("path", "body"), BAD_BODIES)
def test_refusals_are_the_framework_s(
    both: tuple[httpx.Client, httpx.Client], path: str, body: bytes
) -> None:
    headers = {"content-type": "application/json"}
    answers = [client.post(path, content=body, headers=headers) for client in both]
    _same(*answers)


def test_acceptance_replay_request_id_and_other_methods_are_the_framework_s(
    both: tuple[httpx.Client, httpx.Client],
) -> None:
    fast, slow = both
    first, second = _register("alice"), _register("bob")
    accepted_fast = fast.post("/api/envelopes", json=first)
    accepted_slow = slow.post("/api/envelopes", json=second)
    assert accepted_fast.status_code == accepted_slow.status_code == 201
    assert _headers(accepted_fast).keys() == _headers(accepted_slow).keys()
    assert accepted_fast.json().keys() == accepted_slow.json().keys()
    # A replay of each on the other server: 200 with the body it was accepted with.
    _same(fast.post("/api/envelopes", json=second), slow.post("/api/envelopes", json=second))
    assert fast.post("/api/envelopes", json=first).json() == accepted_fast.json()
    # A batch of both (repeats now), and the client's own request id.
    batch = {"envelopes": [first, second]}
    given = {"x-request-id": "fast-path-test-1"}
    answers = [c.post("/api/envelopes/batch", json=batch, headers=given) for c in both]
    _same(*answers)
    assert answers[0].headers["x-request-id"] == "fast-path-test-1"
    # Not POST, or another path: the framework answers (405, 404) through both.
    _same(fast.get("/api/envelopes"), slow.get("/api/envelopes"))
    redirects = [c.post("/api/envelopes/", json=first) for c in both]
    assert [r.status_code for r in redirects] == [307, 307]
    assert {httpx.URL(r.headers["location"]).path for r in redirects} == {"/api/envelopes"}


class _FailingWriter:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def submit(self, raws: Sequence[object], *, atomic: bool = False) -> list[Any]:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        Unavailable("the database is unavailable", retry_after=2),
        sqlite3.DatabaseError("database disk image is malformed"),
        RuntimeError("a bug"),
    ],
    ids=["ubc-error-with-headers", "database-error", "no-handler"],
)
def test_errors_of_the_write_are_answered_by_the_app_s_handlers(
    tmp_path: Path, error: Exception
) -> None:
    """The exception handlers of the application answer on the fast path as on the
    route (the writer stands in for a database that fails: nothing is opened)."""
    answers = []
    for strip in (False, True):
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'unused.db'}",
            data_dir=make_data_dir(tmp_path / f"data-{strip}"),
            origin=ORIGIN,
        )
        app = create_app(settings)
        if strip:
            _without_fast_path(app)
        app.state.writer = _FailingWriter(error)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

        async def post(transport: httpx.ASGITransport = transport) -> httpx.Response:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.post("/api/envelopes", json={"payloadType": "x"})

        answers.append(asyncio.run(post()))
    _same(*answers)
    if isinstance(error, Unavailable):
        assert answers[0].status_code == 503
        assert answers[0].headers["retry-after"] == "2"
    else:
        assert answers[0].status_code == 500
