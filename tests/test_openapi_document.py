"""``/openapi.json`` tells the whole truth about ``/api``, ``/journal`` and the probes.

The document itself: every operation has a typed success schema and lists its error
statuses with the server's own error body (never FastAPI's ``HTTPValidationError``);
reads that need a bearer say so (``securitySchemes``); ``POST /api/withdrawals`` has a
request body. Against a real server: after a known sequence of operations, the answers of
every read route (and of the write path) validate against the document's schemas, with no
field the document does not name; unknown paths and methods answer in the documented
shape; schemathesis checks its generated calls' answers against the schemas. The client's
typed results are compared with the response models, field by field.

``/v1`` is documented and tested with the model endpoint (``ubc.gateway.schemas``).
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from pydantic import BaseModel
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import LiveServer, make_data_dir
from ubc.app import create_app
from ubc.causes import schemas as causes
from ubc.client import UbcClient
from ubc.client import _client as client_types
from ubc.config import Settings
from ubc.envelopes import schemas as envelopes
from ubc.ledger import schemas as ledger
from ubc.market import schemas as market
from ubc.members import schemas as members
from ubc.schemas import BEARER_SCHEME, ErrorBody
from ubc.signing import generate_signing_key

ERROR_REF = f"#/components/schemas/{ErrorBody.__name__}"
METHODS = ("get", "post", "put", "patch", "delete")


def _ours(path: str) -> bool:
    return not path.startswith("/v1/") and not path.startswith("/docs")


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The document as the app assembles it (no server, no database needed)."""
    tmp = tmp_path_factory.mktemp("openapi")
    app = create_app(
        Settings(database_url=f"sqlite:///{tmp / 'doc.db'}", data_dir=make_data_dir(tmp / "d"))
    )
    return app.openapi()


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        if _ours(path):
            for method, operation in item.items():
                if method in METHODS:
                    yield path, method, operation


def _refs(schema: Any) -> set[str]:
    if isinstance(schema, dict):
        found = {schema["$ref"]} if isinstance(schema.get("$ref"), str) else set()
        for value in schema.values():
            found |= _refs(value)
        return found
    if isinstance(schema, list):
        return set().union(*(_refs(v) for v in schema)) if schema else set()
    return set()


# --- the document ------------------------------------------------------------------------


def test_the_document_covers_every_route(document: dict[str, Any]) -> None:
    paths = {p for p in document["paths"] if _ours(p)}
    assert {
        "/api/envelopes",
        "/api/envelopes/batch",
        "/api/ledger",
        "/api/accounts",
        "/api/accounts/{address}",
        "/api/accounts/{address}/history",
        "/api/accounts/{address}/donations",
        "/api/accounts/{address}/usage",
        "/api/accounts/{address}/apikeys",
        "/api/transfers/{transfer_id}",
        "/api/members/{handle}",
        "/api/epochs",
        "/api/epochs/{number}",
        "/api/reports/utilization",
        "/api/causes",
        "/api/causes/{slug}",
        "/api/market/offers",
        "/api/market/offers/{offer_id}",
        "/api/market/trades",
        "/api/withdrawals",
        "/api/withdrawals/{withdrawal_id}",
        "/journal/checkpoint",
        "/journal/tile/{path}",
        "/journal/entries",
        "/journal/proof/inclusion",
        "/journal/proof/consistency",
        "/healthz",
        "/readyz",
    } <= paths


def test_every_operation_has_a_typed_success_schema(document: dict[str, Any]) -> None:
    components = document["components"]["schemas"]
    for path, method, operation in _operations(document):
        successes = {s: r for s, r in operation["responses"].items() if s.startswith("2")}
        assert successes, (method, path)
        for status, response in successes.items():
            content = response.get("content")
            assert content, (method, path, status, "no content")
            for media, entry in content.items():
                schema = entry.get("schema")
                assert schema, (method, path, status, media, "untyped")
                if media != "application/json":
                    assert schema.get("type") == "string", (method, path, media)
                    continue
                ref = schema.get("$ref")
                assert ref, (method, path, status, "not a named model")
                target = components[ref.rsplit("/", 1)[1]]
                assert target.get("type") == "object", (path, ref)
                assert target.get("properties"), (path, ref)


def test_every_error_status_has_the_error_body(document: dict[str, Any]) -> None:
    for path, method, operation in _operations(document):
        responses = operation["responses"]
        # A NUL in the URL (400) and an unavailable database or busy worker (503): any route.
        assert {"400", "503"} <= set(responses), (method, path)
        assert "Retry-After" in responses["503"].get("headers", {}), (method, path)
        for status, response in responses.items():
            if status.startswith("2"):
                continue
            schema = response["content"]["application/json"]["schema"]
            assert ERROR_REF in _refs(schema), (method, path, status, schema)
            if path != "/readyz":
                assert schema == {"$ref": ERROR_REF}, (method, path, status)
        if operation.get("security") == [{BEARER_SCHEME: []}]:
            assert {"401", "403"} <= set(responses), (method, path)
        validated = [
            p
            for p in operation.get("parameters", [])
            if p["schema"].get("type") == "integer" or "pattern" in p["schema"]
        ]
        if validated:
            assert "422" in responses, (method, path)
    for _path, _method, operation in _operations(document):
        assert not any("HTTPValidationError" in r for r in _refs(operation)), operation


def test_reads_declare_the_bearer_scheme(document: dict[str, Any]) -> None:
    scheme = document["components"]["securitySchemes"][BEARER_SCHEME]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    security = {
        (path, method): operation.get("security")
        for path, method, operation in _operations(document)
    }
    required = [{BEARER_SCHEME: []}]
    for path in (
        "/api/accounts",
        "/api/accounts/{address}",
        "/api/accounts/{address}/history",
        "/api/accounts/{address}/usage",
        "/api/members/{handle}",
        "/api/transfers/{transfer_id}",
        "/api/reports/utilization",
        "/api/market/trades",
        "/api/withdrawals",
    ):
        assert security[(path, "get")] == required, path
    for path in ("/journal/entries", "/journal/tile/{path}"):  # optional: public without one
        assert {} in security[(path, "get")]
        assert required[0] in security[(path, "get")]
    for path, method in (
        ("/api/ledger", "get"),
        ("/api/epochs", "get"),
        ("/api/causes", "get"),
        ("/api/market/offers", "get"),
        ("/journal/checkpoint", "get"),
        ("/api/envelopes", "post"),  # the signatures are the authentication
        ("/api/withdrawals", "post"),
    ):
        assert security[(path, method)] is None, path


def test_withdrawal_requests_have_a_request_body(document: dict[str, Any]) -> None:
    body = document["paths"]["/api/withdrawals"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Envelope"
    }
    responses = document["paths"]["/api/withdrawals"]["post"]["responses"]
    for status in ("200", "201"):
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/WithdrawalRequest"}
    for path in ("/api/envelopes", "/api/envelopes/batch"):
        assert "requestBody" in document["paths"][path]["post"]


# --- the client's types are the response models ------------------------------------------

#: Each typed result of the client ↔ the response model of what it reads.
CLIENT_MODELS: dict[str, type[BaseModel]] = {
    "Effect": envelopes.Effect,
    "Receipt": envelopes.Receipt,
    "LedgerAsset": ledger.LedgerAsset,
    "LedgerModelPrice": ledger.LedgerModelPrice,
    "LedgerInfo": ledger.LedgerInfo,
    "Balance": ledger.Balance,
    "Account": ledger.Account,
    "HistoryItem": ledger.HistoryItem,
    "HistoryPage": ledger.HistoryPage,
    "TransferLeg": ledger.TransferLeg,
    "Transfer": ledger.Transfer,
    "ApiKeyInfo": members.ApiKeyInfo,
    "MemberKey": members.MemberKey,
    "Member": members.Member,
    "Cause": causes.Cause,
    "DonationReceipt": causes.DonationReceipt,
    "Offer": market.Offer,
    "Trade": market.Trade,
    "WithdrawalError": market.WithdrawalError,
    "WithdrawalRequest": market.WithdrawalRequest,
}


def _type_name(tp: Any, names: dict[type, str]) -> str:
    """A type written the same way whichever side it comes from: models and TypedDicts
    by the client's name, unions as sorted alternatives."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(sorted(_type_name(arg, names) for arg in typing.get_args(tp)))
    if origin is typing.Literal:
        return type(typing.get_args(tp)[0]).__name__
    if origin is not None:
        args = ", ".join(_type_name(arg, names) for arg in typing.get_args(tp))
        return f"{getattr(origin, '__name__', origin)}[{args}]"
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    return names.get(tp, getattr(tp, "__name__", repr(tp)))


def _unwrap(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.NotRequired, typing.Required):
        return typing.get_args(hint)[0]
    return hint


def _typed_dicts() -> dict[str, type]:
    return {
        name: value
        for name, value in vars(client_types).items()
        if isinstance(value, type) and typing.is_typeddict(value)
    }


def test_every_client_result_type_has_a_response_model() -> None:
    assert set(_typed_dicts()) == set(CLIENT_MODELS)


def test_client_result_types_match_the_response_models() -> None:
    typed = _typed_dicts()
    names: dict[type, str] = {model: name for name, model in CLIENT_MODELS.items()}
    names.update({cls: name for name, cls in typed.items()})
    for name, model in CLIENT_MODELS.items():
        cls = typed[name]
        # The client's module postpones annotations, so __required_keys__ misses
        # NotRequired on Python 3.11: read it from the hints.
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = {
            (f.alias or field): (_type_name(f.annotation, names), f.is_required())
            for field, f in model.model_fields.items()
        }
        client = {
            field: (
                _type_name(_unwrap(hint), names),
                typing.get_origin(hint) is not typing.NotRequired
                and field in cls.__required_keys__,  # type: ignore[attr-defined]
            )
            for field, hint in hints.items()
        }
        assert client == fields, name
        assert list(client) == list(fields), f"{name}: fields in another order"


# --- real answers against the document -----------------------------------------------------


def _strict(document: dict[str, Any]) -> dict[str, Any]:
    """The components with every model closed: an answer naming a field its model does
    not is refused (the models keep unknown keys at run time, ``extra="allow"``)."""
    components = copy.deepcopy(document["components"])
    for schema in components["schemas"].values():
        if schema.get("properties") and schema.get("additionalProperties") is True:
            schema["additionalProperties"] = False
    return components


class Checker:
    def __init__(self, http: httpx.Client, document: dict[str, Any]) -> None:
        self.http = http
        self.document = document
        self.components = _strict(document)
        self.seen: set[tuple[str, str, int]] = set()

    def validate(self, template: str, method: str, response: httpx.Response) -> Any:
        responses = self.document["paths"][template][method]["responses"]
        status = str(response.status_code)
        assert status in responses, (template, method, response.status_code, response.text)
        body = response.json()
        schema = responses[status]["content"]["application/json"]["schema"]
        jsonschema.Draft202012Validator({**schema, "components": self.components}).validate(body)
        self.seen.add((template, method, response.status_code))
        return body

    def get(self, template: str, url: str, **kwargs: Any) -> Any:
        return self.validate(template, "get", self.http.get(url, **kwargs))


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def test_real_answers_validate_against_the_document(live_server: LiveServer) -> None:
    operator_token = live_server.operator_token
    with (
        httpx.Client(base_url=live_server.url, timeout=30) as http,
        UbcClient(live_server.url, key=live_server.operator_key, token=operator_token) as op,
        UbcClient(live_server.url, key=generate_signing_key()) as alice,
        UbcClient(live_server.url, key=generate_signing_key()) as bob,
    ):
        check = Checker(http, http.get("/openapi.json").json())

        def post(template: str, body: dict[str, Any]) -> Any:
            return check.validate(template, "post", http.post(template, json=body))

        register = alice.envelope(
            "member.register", handle="alice", public_key=_public(alice), actor="member:alice"
        )
        post("/api/envelopes", register)
        alice.handle = "alice"
        replay = post("/api/envelopes", register)  # 200: the same receipt
        assert replay["type"] == "member.register"
        bob.register("bob")
        op.admit("alice", "basic")
        op.admit("bob", "basic")
        alice.token, _ = alice.grant_api_key("laptop", rpm=60)
        op.deposit("alice", 1000, external_ref="seed-alice")
        deposit_usd = op.envelope(
            "deposit", actor="operator", to="member:bob", asset="USD", amount=500, external_ref="b"
        )
        batch = post("/api/envelopes/batch", {"envelopes": [deposit_usd, deposit_usd]})
        assert [r["status"] for r in batch["results"]] == [201, 200]
        bad = post("/api/envelopes/batch", {"envelopes": [{"payloadType": "x"}]})
        assert bad["results"][0]["body"]["error"]["type"]
        sent = alice.send("bob", 30, memo="thanks")
        starts = _now() - timedelta(minutes=1)
        opened = post(
            "/api/envelopes",
            op.envelope(
                "epoch.open",
                actor="operator",
                epoch=1,
                asset="CU",
                allocations={"basic": 100},
                carryover_cap=None,
                starts_at=_rfc3339(starts),
                ends_at=_rfc3339(starts + timedelta(days=30)),
            ),
        )
        assert "summary" in opened
        op.register_cause("nets", "Nets", "bed nets", ["alice"])
        alice.donate("nets", 5, memo="for nets")
        offer = alice.sell(40, 100)
        bob.buy(offer["id"], 10)
        alice.sell(5, 50)
        withdrawal = check.validate(
            "/api/withdrawals",
            "post",
            http.post(
                "/api/withdrawals", json=alice.withdrawal_envelope(7, external_ref="w1", asset="CU")
            ),
        )
        assert withdrawal["status"] == "pending"

        mine = {"Authorization": f"Bearer {alice.token}"}
        ops = {"Authorization": f"Bearer {operator_token}"}
        size = int(http.get("/journal/checkpoint").text.splitlines()[1])

        check.get("/api/ledger", "/api/ledger")
        check.get("/api/accounts", "/api/accounts", headers=ops)
        check.get("/api/accounts/{address}", "/api/accounts/member:alice", headers=mine)
        history = check.get(
            "/api/accounts/{address}/history",
            "/api/accounts/member:alice/history",
            params={"limit": 2},
            headers=mine,
        )
        assert history["next_cursor"] is not None
        check.get(
            "/api/accounts/{address}/donations",
            "/api/accounts/member:alice/donations",
            headers=mine,
        )
        check.get("/api/accounts/{address}/usage", "/api/accounts/member:alice/usage", headers=mine)
        keys = check.get(
            "/api/accounts/{address}/apikeys", "/api/accounts/member:alice/apikeys", headers=mine
        )
        assert keys["apikeys"][0]["rpm"] == 60
        check.get("/api/transfers/{transfer_id}", f"/api/transfers/{sent['id']}", headers=mine)
        check.get("/api/members/{handle}", "/api/members/alice", headers=mine)
        check.get("/api/epochs", "/api/epochs")
        check.get("/api/epochs/{number}", "/api/epochs/1")
        report = check.get(
            "/api/reports/utilization", "/api/reports/utilization?epoch=1&below=50", headers=ops
        )
        assert "from" in report
        check.get("/api/causes", "/api/causes")
        check.get("/api/causes/{slug}", "/api/causes/nets")
        offers = check.get("/api/market/offers", "/api/market/offers")
        assert offers["offers"]
        check.get("/api/market/offers/{offer_id}", f"/api/market/offers/{offer['id']}")
        trades = check.get(
            "/api/market/trades", "/api/market/trades?account=member:alice", headers=mine
        )
        assert trades["trades"][0]["side"] == "sell"
        everyone = check.get("/api/market/trades", "/api/market/trades", headers=ops)
        assert "side" not in everyone["trades"][0]
        check.get("/api/withdrawals", "/api/withdrawals?account=member:alice", headers=mine)
        check.get(
            "/api/withdrawals/{withdrawal_id}", f"/api/withdrawals/{withdrawal['id']}", headers=ops
        )
        full = check.get("/journal/entries", f"/journal/entries?start=0&end={size}", headers=ops)
        assert all("entry" in e for e in full["entries"])
        public = check.get("/journal/entries", f"/journal/entries?start=0&end={size}")
        assert not any("entry" in e for e in public["entries"])
        check.get("/journal/proof/inclusion", f"/journal/proof/inclusion?seq=1&size={size}")
        check.get("/journal/proof/consistency", f"/journal/proof/consistency?old=1&new={size}")
        check.get("/healthz", "/healthz")
        check.get("/readyz", "/readyz")

        # Errors, in the documented body, on the statuses the document lists.
        check.get("/api/accounts", "/api/accounts")  # 401
        check.get("/api/accounts", "/api/accounts", headers=mine)  # 403
        check.get("/api/members/{handle}", "/api/members/nobody", headers=ops)  # 404
        check.get("/api/epochs/{number}", "/api/epochs/0")  # 422
        check.get("/api/market/trades", "/api/market/trades?cursor=x", headers=ops)  # 400
        post("/api/envelopes", {**register, "payload": "%%%"})  # 400
        too_much = alice.envelope(
            "transfer", from_="member:alice", to="member:bob", asset="CU", amount=10**9
        )
        post("/api/envelopes", too_much)  # 409

    statuses = {(t, m, s) for t, m, s in check.seen}
    assert ("/api/envelopes", "post", 409) in statuses  # insufficient funds
    assert {s for _, _, s in statuses} >= {200, 201, 400, 401, 403, 404, 409, 422}


def _public(client: UbcClient) -> str:
    from ubc.signing import encode_public_key

    assert client.key is not None
    return encode_public_key(bytes(client.key.verify_key))


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_unknown_paths_and_methods_answer_in_the_documented_shape(
    live_server: LiveServer,
) -> None:
    with httpx.Client(base_url=live_server.url) as http:
        components = _strict(http.get("/openapi.json").json())
        error_schema = {"$ref": ERROR_REF, "components": components}
        missing = http.get("/api/nothing-here")
        assert missing.status_code == 404
        jsonschema.Draft202012Validator(error_schema).validate(missing.json())
        assert missing.json()["error"]["type"] == "not_found"
        wrong = http.delete("/api/ledger")
        assert wrong.status_code == 405
        jsonschema.Draft202012Validator(error_schema).validate(wrong.json())
        assert wrong.json()["error"]["type"] == "method_not_allowed"
        assert wrong.json()["error"]["detail"]["allow"] == ["GET"]
        assert wrong.headers["allow"] == "GET"
        # Under /v1, OpenAI's shape, as its SDKs expect.
        openai = http.get("/v1/nothing-here")
        assert openai.status_code == 404
        assert set(openai.json()["error"]) == {"message", "type", "param", "code"}


# --- schemathesis: generated calls, answers checked against the schemas --------------------


@pytest.fixture
def api_schema(live_server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(live_server.url + "/openapi.json")


# GET /journal/stream never ends by itself (Server-Sent Events; tests/test_stream.py).
schema = (
    schemathesis.pytest.from_fixture("api_schema")
    .exclude(path_regex="^/v1/")
    .exclude(path="/journal/stream")
)


@settings(max_examples=10, suppress_health_check=list(HealthCheck))
@schema.parametrize()
def test_generated_calls_answer_as_documented(
    case: schemathesis.Case, live_server: LiveServer
) -> None:
    case.call_and_validate(
        base_url=live_server.url,
        headers={"Authorization": f"Bearer {live_server.operator_token}"},
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
