"""Fuzzing the write path and the HTTP surface: no input makes the server fail.

(a) Hypothesis: arbitrary JSON values, bytes and envelope-shaped objects through the
envelope decoder (``ubc.envelopes.service._decode``) and over HTTP, and signed payloads
perturbed field by field through the rules. The answer is always a client error with the
error body of DESIGN section 4 (or an acceptance), never a 5xx; and every acceptance adds
exactly one journal entry while the books stay balanced.

(b) Schemathesis: every operation of the app's own ``/openapi.json``, with the
``not_a_server_error`` check.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from schemathesis.checks import not_a_server_error
from sqlalchemy import text

from tests.conftest import LiveServer
from ubc.db import make_engine
from ubc.envelopes.payloads import PAYLOAD_MODELS, format_timestamp
from ubc.envelopes.service import _decode
from ubc.errors import UbcError
from ubc.signing import (
    encode_public_key,
    generate_signing_key,
    payload_type_for,
    sign_envelope,
)

ORIGIN = "test.ubc/ledger"
CLIENT_ERRORS = {400, 401, 403, 404, 409, 413, 422}

# --- strategies ---------------------------------------------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=24)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
payload_types = st.sampled_from(
    [payload_type_for(name) for name in PAYLOAD_MODELS]
    + ["application/vnd.ubc.nope+json", "application/json", "", "application/vnd.ubc.+json"]
) | st.text(max_size=40)
base64_strings = st.binary(max_size=96).map(lambda b: base64.b64encode(b).decode()) | st.text(
    max_size=48
)
keyids = st.text("0123456789abcdef", min_size=16, max_size=16) | st.text(max_size=20)
FIELD_NAMES = sorted(
    {name for model in PAYLOAD_MODELS.values() for name in model.model_json_schema()["properties"]}
)
payload_objects = st.dictionaries(
    st.sampled_from(FIELD_NAMES) | st.text(max_size=10), json_values, max_size=10
)
payload_bytes = (
    st.binary(max_size=256)
    | payload_objects.map(lambda obj: json.dumps(obj).encode())
    | st.integers(min_value=8190, max_value=8200).map(lambda n: b"{" + b" " * (n - 2) + b"}")
)
signatures = st.lists(
    st.fixed_dictionaries({"keyid": keyids, "sig": base64_strings}) | json_values, max_size=10
)
envelopes = st.fixed_dictionaries(
    {
        "payloadType": payload_types | json_values,
        "payload": payload_bytes.map(lambda b: base64.b64encode(b).decode()) | json_values,
        "signatures": signatures | json_values,
    },
    optional={"extra": json_values},
)
batches = st.fixed_dictionaries(
    {"envelopes": st.lists(envelopes | json_values, max_size=4) | json_values},
    optional={"atomic": st.booleans() | json_values, "extra": json_values},
)


def _json(value: object) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity included: the server must refuse them


http_bodies = (
    st.binary(max_size=512) | json_values.map(_json) | envelopes.map(_json) | batches.map(_json)
)


# --- (a) the decoder, directly --------------------------------------------------------------


def _assert_client_error(error: UbcError) -> None:
    assert error.status_code in (400, 413), error
    body = error.to_body()
    assert set(body["error"]) == {"type", "message", "detail"}
    json.dumps(body)  # the error body must serialize


@settings(max_examples=300)
@given(raw=json_values | envelopes)
def test_decoder_refuses_any_json_value_with_a_client_error(raw: object) -> None:
    try:
        _decode(0, raw)
    except UbcError as error:
        _assert_client_error(error)


@settings(max_examples=300)
@given(
    type_name=st.sampled_from(sorted(PAYLOAD_MODELS)),
    base=st.sampled_from(["valid", "empty"]),
    changes=payload_objects,
    raw=st.none() | payload_bytes,
)
def test_decoder_refuses_any_payload_with_a_client_error(
    type_name: str, base: str, changes: dict[str, Any], raw: bytes | None
) -> None:
    body = {**(TEMPLATES[type_name] if base == "valid" else {}), **changes}
    payload = raw if raw is not None else json.dumps(body).encode()
    envelope = sign_envelope(payload_type_for(type_name), payload, [STRANGER]).to_json()
    try:
        _decode(0, envelope)
    except UbcError as error:
        _assert_client_error(error)


# --- (a) over HTTP ------------------------------------------------------------------------


def _assert_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.status_code in CLIENT_ERRORS, response.text
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"type", "message", "detail"}, body
        assert isinstance(body["error"]["detail"], dict), body


def test_any_body_over_http_is_a_client_error(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        size = _journal_size(client)

        @settings(max_examples=200)
        @given(body=http_bodies, path=st.sampled_from(["/api/envelopes", "/api/envelopes/batch"]))
        def post(body: bytes, path: str) -> None:
            response = client.post(path, content=body, headers={"content-type": "application/json"})
            _assert_answer(response)
            if path == "/api/envelopes":
                assert response.status_code >= 400  # nothing here is signed by a known key

        post()
        assert _journal_size(client) == size


# --- (a) signed payloads, perturbed field by field, through the rules ---------------------

STRANGER = generate_signing_key()
NEW_KEY = generate_signing_key()


def _public(key: SigningKey) -> str:
    return encode_public_key(bytes(key.verify_key))


def _now() -> str:
    return format_timestamp(datetime.now(UTC))


TEMPLATES: dict[str, dict[str, Any]] = {
    "member.register": {
        "actor": "member:fuzz",
        "handle": "fuzz",
        "public_key": _public(NEW_KEY),
        "display_name": "Fuzz",
    },
    "key.rotate": {"actor": "member:alice", "handle": "alice", "new_public_key": _public(NEW_KEY)},
    "apikey.grant": {
        "actor": "member:alice",
        "account": "member:alice",
        "key_hash": "ab" * 32,
        "label": "fuzz",
        "scopes": ["models"],
    },
    "apikey.revoke": {"actor": "member:alice", "account": "member:alice", "key_hash": "ab" * 32},
    "transfer": {
        "actor": "member:alice",
        "from": "member:alice",
        "to": "member:bob",
        "asset": "CU",
        "amount": 1,
    },
    "member.admit": {"actor": "operator", "handle": "bob", "tier": "basic"},
    "member.update": {"actor": "operator", "handle": "bob", "tier": "gold"},
    "deposit": {
        "actor": "operator",
        "to": "member:alice",
        "asset": "CU",
        "amount": 5,
        "external_ref": "fuzz",
    },
    "withdrawal": {
        "actor": "member:alice",
        "from": "member:alice",
        "asset": "CU",
        "amount": 1,
        "external_ref": "fuzz-w",
    },
    "epoch.open": {
        "actor": "operator",
        "epoch": 1,
        "asset": "CU",
        "allocations": {"basic": 100},
        "carryover_cap": 10,
        "starts_at": "2026-01-01T00:00:00Z",
        "ends_at": "2026-02-01T00:00:00Z",
    },
    "epoch.close": {"actor": "operator", "epoch": 1},
    "epoch.expire": {"actor": "ledger", "epoch": 1, "after": "", "through": "member:alice"},
    "ledger.config": {
        "actor": "ledger",
        "ledger_public_key": _public(STRANGER),
        "operator_public_keys": [_public(STRANGER)],
        "enrollment": "open",
        "assets": {"CU": {"scale": 0}},
        "market_fee_bps": 0,
        "models": {},
        "cu_price_usd": "0.001",
    },
    "usage": {
        "actor": "ledger",
        "account": "member:alice",
        "key_hash": "ab" * 32,
        "request_id": str(uuid.uuid4()),
        "model": "all-minilm-l6-v2",
        "input_tokens": 10,
        "output_tokens": 0,
        "held": 1,
        "cost": 1,
    },
    "hold.expire": {"actor": "ledger", "hold_id": f"hold:{uuid.uuid4()}:0"},
    "offer.create": {
        "actor": "member:alice",
        "sell_asset": "CU",
        "sell_amount": 10,
        "price_asset": "USD",
        "price_amount": 5,
    },
    "offer.fill": {"actor": "member:bob", "offer_id": str(uuid.uuid4()), "amount": 1},
    "offer.cancel": {"actor": "member:alice", "offer_id": str(uuid.uuid4())},
    "offer.expire": {"actor": "ledger", "offer_id": str(uuid.uuid4())},
    "cause.register": {
        "actor": "operator",
        "slug": "malaria-research",
        "name": "Malaria research",
        "description": "nets",
        "stewards": ["alice"],
    },
    "cause.update": {
        "actor": "operator",
        "slug": "malaria-research",
        "name": "Malaria research",
        "description": "nets and vaccines",
        "stewards": ["bob"],
    },
}
TEMPLATES["ledger.genesis"] = TEMPLATES["ledger.config"]
for _template in TEMPLATES.values():
    _template.update({"ledger": ORIGIN, "id": str(uuid.uuid4()), "created_at": _now()})

#: Values worth trying in each field: valid ones of other subjects, edge cases, junk.
POOLS: dict[str, st.SearchStrategy[Any]] = {
    "handle": st.sampled_from(["alice", "bob", "carol", "nobody", "fuzz", "Alice", "a", "x" * 33]),
    "address": st.sampled_from(
        [
            "member:alice",
            "member:bob",
            "member:carol",
            "member:nobody",
            "cause:malaria-research",
            "system:deposits",
            "operator",
            "alice",
        ]
    ),
    "actor": st.sampled_from(["member:alice", "member:bob", "operator", "ledger", "member:nobody"]),
    "amount": st.sampled_from([0, 1, 2, 99, 2**53 - 1, 2**53, -1, 10**12, True, "1", 1.5]),
    "asset": st.sampled_from(["CU", "USD", "XYZ", "cu", ""]),
    "key": st.sampled_from(
        [_public(NEW_KEY), _public(STRANGER), "A" * 44, "A" * 43 + "=", "=" * 44, "not a key"]
    ),
    "timestamp": st.sampled_from(
        [
            "2026-01-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            "2099-01-01T00:00:00.123456789Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T23:59:60Z",
        ]
    ),
    "key_hash": st.sampled_from(["ab" * 32, "cd" * 32, "AB" * 32, "ab"]),
    "tier": st.sampled_from(["basic", "gold", "", "X"]),
    "status": st.sampled_from(["active", "suspended", "pending", "deleted"]),
    "ref": st.sampled_from(["fuzz", "fuzz-w", "world", "", "r" * 129]),
    "text": st.text(max_size=300),
}
FIELD_POOLS = {
    "handle": "handle",
    "from": "address",
    "to": "address",
    "account": "address",
    "actor": "actor",
    "amount": "amount",
    "spend_cap_per_epoch": "amount",
    "rpm": "amount",
    "tpm": "amount",
    "asset": "asset",
    "public_key": "key",
    "new_public_key": "key",
    "ledger_public_key": "key",
    "created_at": "timestamp",
    "expires_at": "timestamp",
    "key_hash": "key_hash",
    "tier": "tier",
    "status": "status",
    "external_ref": "ref",
    "memo": "text",
    "label": "text",
    "display_name": "text",
    "reason": "text",
}


#: Who signs each type rightly (names of the signers below).
RIGHT_SIGNERS = {
    "member.register": ["new"],
    "key.rotate": ["alice", "new"],
    "apikey.grant": ["alice"],
    "apikey.revoke": ["alice"],
    "transfer": ["alice"],
    "member.admit": ["operator"],
    "member.update": ["operator"],
    "deposit": ["operator"],
    "withdrawal": ["alice", "operator"],
    "ledger.config": ["ledger", "operator"],
    "ledger.genesis": ["ledger"],
    "epoch.open": ["operator"],
    "epoch.close": ["operator"],
    "epoch.expire": ["ledger"],
    "usage": ["ledger"],
    "hold.expire": ["ledger"],
    "offer.create": ["alice"],
    "offer.fill": ["bob"],
    "offer.cancel": ["alice"],
    "offer.expire": ["ledger"],
    "cause.register": ["operator"],
    "cause.update": ["operator"],
}
SIGNER_NAMES = ["alice", "bob", "operator", "ledger", "stranger", "new"]
ALL_FIELDS = sorted({"ledger", "id", *FIELD_POOLS})


@st.composite
def perturbed_payloads(draw: st.DrawFn) -> tuple[str, dict[str, Any], list[str]]:
    """A template payload with up to three fields dropped or changed, and its signers:
    mostly the right ones, so that the rules (not only the decoder) see the result."""
    type_name = draw(st.sampled_from(sorted(TEMPLATES)))
    body = dict(TEMPLATES[type_name])
    body["id"] = str(uuid.uuid4())
    body["created_at"] = _now()
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3]))):
        names = sorted(body.keys() - {"ledger", "id"}) if draw(st.integers(0, 9)) else ALL_FIELDS
        name = draw(st.sampled_from(names))
        how = draw(st.integers(min_value=0, max_value=9))
        if how == 0:
            body.pop(name, None)
        elif how == 1:
            body[name] = draw(json_values)
        else:
            body[name] = draw(POOLS[FIELD_POOLS.get(name, "text")])
    if draw(st.integers(0, 3)):
        who = RIGHT_SIGNERS[type_name]
    else:
        who = draw(st.lists(st.sampled_from(SIGNER_NAMES), min_size=1, max_size=3, unique=True))
    return type_name, body, who


def test_signed_perturbed_payloads_never_fail_the_server(live_server: LiveServer) -> None:
    alice = generate_signing_key()
    bob = generate_signing_key()
    operator = live_server.operator_key
    signers = {
        "alice": alice,
        "bob": bob,
        "operator": operator,
        "ledger": live_server.ledger_key,
        "stranger": STRANGER,
        "new": NEW_KEY,
    }
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        for handle, key in (("alice", alice), ("bob", bob)):
            _accept(
                client,
                "member.register",
                {"actor": f"member:{handle}", "handle": handle, "public_key": _public(key)},
                [key],
            )
        _accept(
            client,
            "member.admit",
            {"actor": "operator", "handle": "alice", "tier": "basic"},
            [operator],
        )
        _accept(
            client,
            "deposit",
            {
                "actor": "operator",
                "to": "member:alice",
                "asset": "CU",
                "amount": 1000,
                "external_ref": "world",
            },
            [operator],
        )
        accepted = 0
        start = _journal_size(client)

        @settings(max_examples=300)
        @given(drawn=perturbed_payloads())
        def post(drawn: tuple[str, dict[str, Any], list[str]]) -> None:
            nonlocal accepted
            type_name, body, who = drawn
            payload = json.dumps(body).encode()
            keys = [signers[name] for name in who]
            envelope = sign_envelope(payload_type_for(type_name), payload, keys).to_json()
            response = client.post("/api/envelopes", json=envelope)
            _assert_answer(response)
            if response.status_code == 201:
                accepted += 1

        post()
        assert _journal_size(client) == start + accepted
    _assert_books_balance(live_server.db_url)


def _accept(
    client: httpx.Client, type_name: str, fields: dict[str, Any], keys: list[SigningKey]
) -> None:
    body = {"ledger": ORIGIN, "id": str(uuid.uuid4()), "created_at": _now(), **fields}
    envelope = sign_envelope(payload_type_for(type_name), json.dumps(body).encode(), keys)
    response = client.post("/api/envelopes", json=envelope.to_json())
    assert response.status_code == 201, response.text


def _journal_size(client: httpx.Client) -> int:
    return int(client.get("/journal/checkpoint").text.splitlines()[1])


def _assert_books_balance(db_url: str) -> None:
    """Double entry: per asset, credits equal debits, posted and pending."""
    engine = make_engine(db_url, readonly=True)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT asset, sum(credits_posted - debits_posted),"
                    " sum(credits_pending - debits_pending) FROM accounts GROUP BY asset"
                )
            ).all()
    finally:
        engine.dispose()
    for asset, posted, pending in rows:
        assert (int(posted), int(pending)) == (0, 0), asset


# --- (b) schemathesis over the OpenAPI document -------------------------------------------


@pytest.fixture
def api_schema(live_server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(live_server.url + "/openapi.json")


# GET /journal/stream never ends by itself (Server-Sent Events): its own tests cover it
# (tests/test_stream.py); a fuzzer reading whole bodies would wait on it forever.
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path="/journal/stream")


@settings(max_examples=30)
@schema.parametrize()
def test_openapi_operations_never_answer_5xx(
    case: schemathesis.Case, live_server: LiveServer
) -> None:
    case.call_and_validate(
        base_url=live_server.url,
        headers={"Authorization": f"Bearer {live_server.operator_token}"},
        checks=[not_a_server_error],
    )
