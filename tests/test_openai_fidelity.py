"""Issue 15, the OpenAI surface: an OpenAI-SDK program sees the errors and headers it
sees from OpenAI.

Uses the served ledger and loopback upstream of ``tests/test_gateway.py`` (SQLite and
PostgreSQL), plus ``chat-down``, a model whose upstream is not listening.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.routing import APIRoute
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import _free_port
from tests.test_gateway import MODELS_TOML, Env, balance, serve_gateway
from ubc.client import api_key_hash
from ubc.gateway import routes as gateway_routes
from ubc.gateway import schemas
from ubc.gateway.local import MAX_TOKENS, VOCAB_SIZE, get_local_embedder
from ubc.gateway.ratelimit import format_reset
from ubc.gateway.service import CHAT_FIELDS

DOWN_TOML = """
[models."chat-down"]
backend = "upstream"
kind = "chat"
url = "http://127.0.0.1:{port}/v1"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 2000
"""
LOCAL = "all-minilm-l6-v2"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)
# Go's time.Duration format, as OpenAI sends it: "20ms", "1s", "8.64s", "6m0s", "1h0m0s".
DURATION = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s)$")


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    def models(api_base: str) -> str:
        return MODELS_TOML.format(api_base=api_base) + DOWN_TOML.format(port=_free_port())

    with serve_gateway(db_url, tmp_path, monkeypatch, models) as made:
        yield made


# -- 1. a presented key that is not valid: 401 on every /v1 endpoint ----------------------


def test_a_bad_key_is_refused_on_every_endpoint_the_listing_stays_public(env: Env) -> None:
    bad = env.sdk("ubc_sk_not-a-key")
    calls: list[Any] = [
        bad.models.list,
        lambda: bad.models.retrieve("chat-small"),
        lambda: bad.models.retrieve("no-such-model"),
        lambda: bad.chat.completions.create(model="chat-small", messages=HI),
        lambda: bad.embeddings.create(model=LOCAL, input="x"),
    ]
    for call in calls:
        with pytest.raises(openai.AuthenticationError) as refused:
            call()
        assert refused.value.code == "invalid_api_key"
        assert refused.value.body == {
            "message": "Incorrect API key provided",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    # A valid key lists the models (any scope: the listing is public information).
    member, secret = env.member("alice", 0)
    assert "chat-small" in {m.id for m in env.sdk(secret).models.list()}
    # A revoked key is as invalid as an unknown one.
    member.revoke_api_key(api_key_hash(secret))
    env.server.app.state.gateway._grants.clear()  # the 2 s cache of grants
    with pytest.raises(openai.AuthenticationError):
        env.sdk(secret).models.list()
    # Not even a bearer token.
    basic = httpx.get(f"{env.server.url}/v1/models", headers={"authorization": "Basic eDp5"})
    assert (basic.status_code, basic.json()["error"]["code"]) == (401, "invalid_api_key")
    # No key at all: the listing is public (``ubc models`` sends none); the calls are not.
    listed = httpx.get(f"{env.server.url}/v1/models")
    assert listed.status_code == 200
    assert httpx.get(f"{env.server.url}/v1/models/chat-small").status_code == 200
    anonymous = httpx.post(f"{env.server.url}/v1/embeddings", json={"model": LOCAL, "input": "x"})
    assert anonymous.status_code == 401


# -- 2. an unreachable upstream: a plain message, the detail in the log ----------------------


def test_an_unreachable_upstream_answers_a_plain_502_and_logs_the_detail(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    member, secret = env.member("alice", 1000)
    sdk = env.sdk(secret)
    for stream in (False, True):
        with (
            caplog.at_level(logging.WARNING, logger="ubc.gateway"),
            pytest.raises(openai.InternalServerError) as failed,
        ):
            sdk.chat.completions.create(model="chat-down", messages=HI, stream=stream)
        error = failed.value
        assert error.status_code == 502
        assert error.body == {
            "message": "The model's server is unavailable",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_unavailable",
        }
        assert "ClientConnectorError" not in error.response.text
        assert "ConnectionKey" not in error.response.text
        # The request id the member can quote is the one the operator's log names.
        request_id = error.request_id
        assert request_id
        logged = [r for r in caplog.records if r.name == "ubc.gateway" and request_id in r.message]
        assert logged, [r.message for r in caplog.records]
        assert "ClientConnectorError" in logged[0].message or logged[0].exc_info
        caplog.clear()
    env.settled()
    assert balance(member)["posted"] == 1000


def test_upstream_failures_answer_plain_sentences(env: Env) -> None:
    _, secret = env.member("alice", 1000)
    sdk = env.sdk(secret)
    with pytest.raises(openai.InternalServerError) as failed:
        sdk.chat.completions.create(model="chat-fail-500", messages=HI)
    assert failed.value.body == {
        "message": "The model's server failed to answer (HTTP 500)",
        "type": "upstream_error",
        "param": None,
        "code": "upstream_500",
    }
    with pytest.raises(openai.InternalServerError) as cut:
        sdk.chat.completions.create(model="chat-cut", messages=HI)
    assert cut.value.body == {
        "message": "The model's server broke off the answer",
        "type": "upstream_error",
        "param": None,
        "code": "upstream_disconnected",
    }


# -- 3. 402: param null, the shortfall in words ----------------------------------------------


def test_insufficient_quota_names_no_param_and_says_the_shortfall(env: Env) -> None:
    _, secret = env.member("alice", 3)
    with pytest.raises(openai.APIStatusError) as broke:
        env.sdk(secret).chat.completions.create(
            model="chat-small", messages=[{"role": "user", "content": "a long prompt " * 20}]
        )
    error = broke.value
    assert error.status_code == 402
    assert (error.type, error.code, error.param) == (
        "insufficient_quota",
        "insufficient_quota",
        None,
    )
    assert isinstance(error.body, dict)
    assert re.match(
        r"You exceeded your current quota: this call needs at least \d+ CU "
        r"and 3 CU are available\.",
        error.body["message"],
    ), error.body
    # The spend cap of a key says the same in its own words.
    _, capped = env.member("bob", 1000, spend_cap_per_epoch=5)
    with pytest.raises(openai.APIStatusError) as cap:
        env.sdk(capped).chat.completions.create(
            model="chat-small", messages=[{"role": "user", "content": "a long prompt " * 20}]
        )
    assert (cap.value.status_code, cap.value.param) == (402, None)
    assert isinstance(cap.value.body, dict)
    assert re.match(
        r"You exceeded your current quota: this key's spend cap of 5 CU per epoch is "
        r"reached: this call needs at least \d+ CU and 5 CU of it are left\.",
        cap.value.body["message"],
    ), cap.value.body


# -- 4. token arrays for the local embedding model -------------------------------------------


def test_token_arrays_are_embedded_as_given_and_billed_per_id(env: Env) -> None:
    member, secret = env.member("alice", 1000)
    sdk = env.sdk(secret)
    embedder = get_local_embedder()
    [ids] = embedder.encode(["a cat sat on the mat"])
    one = sdk.embeddings.create(model=LOCAL, input=ids, encoding_format="float")
    text = sdk.embeddings.create(model=LOCAL, input="a cat sat on the mat", encoding_format="float")
    assert one.usage.prompt_tokens == len(ids) == text.usage.prompt_tokens
    # The ids the tokenizer makes ([CLS] and [SEP] in) give the text's own vector.
    assert one.data[0].embedding == pytest.approx(text.data[0].embedding, abs=1e-5)
    many = sdk.embeddings.create(model=LOCAL, input=[[101, 2023, 102], ids, list(range(1, 300))])
    assert [len(d.embedding) for d in many.data] == [384] * 3
    assert many.usage.prompt_tokens == 3 + len(ids) + MAX_TOKENS  # cut at 256, as texts are
    env.settled()
    assert balance(member)["posted"] == 1000 - 3  # 1 CU a call at 1 CU per 1K tokens
    bads: list[Any] = [[101, VOCAB_SIZE], [[101], [-1]], [], [[]], [[101], "text"], [1.5], [True]]
    for bad in bads:
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.embeddings.create(model=LOCAL, input=bad)
        assert refused.value.param == "input", bad
    # An upstream embedding model gets the ids as they are.
    upstream = sdk.embeddings.create(model="embed-up", input=[[1, 2, 3], [4, 5]])
    assert upstream.usage.prompt_tokens == 5
    assert env.upstream.stats().last_request_body["input"] == [[1, 2, 3], [4, 5]]


# -- 5. rate-limit headers on successes and on 429 -------------------------------------------


def _rate(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: headers[name] for name in RATE_HEADERS if name in headers}


def test_rate_limit_headers_on_success_and_on_429(env: Env) -> None:
    _, secret = env.member("alice", 100_000, rpm=3, tpm=10_000)
    sdk = env.sdk(secret)
    first = sdk.chat.completions.with_raw_response.create(
        model="chat-small", messages=HI, max_tokens=5
    )
    rate = _rate(first.headers)
    assert set(rate) == set(RATE_HEADERS), dict(first.headers)
    assert rate["x-ratelimit-limit-requests"] == "3"
    assert rate["x-ratelimit-remaining-requests"] == "2"
    assert rate["x-ratelimit-limit-tokens"] == "10000"
    assert 9000 < int(rate["x-ratelimit-remaining-tokens"]) < 10_000
    assert DURATION.match(rate["x-ratelimit-reset-requests"]), rate
    assert DURATION.match(rate["x-ratelimit-reset-tokens"]), rate
    assert first.parse().choices[0].message.content
    # A streamed chat and an embeddings call carry them too.
    with sdk.chat.completions.with_streaming_response.create(
        model="chat-small", messages=HI, max_tokens=2, stream=True
    ) as streamed:
        assert _rate(streamed.headers)["x-ratelimit-remaining-requests"] == "1"
        assert list(streamed.iter_lines())
    embedded = sdk.embeddings.with_raw_response.create(model=LOCAL, input="x")
    assert _rate(embedded.headers)["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.embeddings.create(model=LOCAL, input="x")
    headers = limited.value.response.headers
    rate = _rate(headers)
    assert set(rate) == set(RATE_HEADERS)
    assert (rate["x-ratelimit-limit-requests"], rate["x-ratelimit-remaining-requests"]) == (
        "3",
        "0",
    )
    assert int(headers["retry-after"]) >= 1
    # Only the limits that apply are reported: a model's rpm alone has no tokens trio.
    _, other = env.member("bob", 1000)
    answer = env.sdk(other).chat.completions.with_raw_response.create(
        model="chat-limited", messages=HI, max_tokens=1
    )
    assert _rate(answer.headers) == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "30s",
    }


def test_reset_durations_read_like_openais() -> None:
    assert [format_reset(s) for s in (0, 0.0004, 0.02, 1, 8.64, 59.9996, 360, 3723.5)] == [
        "0s",
        "1ms",
        "20ms",
        "1s",
        "8.64s",
        "1m0s",
        "6m0s",
        "1h2m3.5s",
    ]


# -- 6. an empty string input -----------------------------------------------------------------


def test_an_empty_string_input_is_refused_not_billed(env: Env) -> None:
    member, secret = env.member("alice", 1000)
    sdk = env.sdk(secret)
    for model in (LOCAL, "embed-up"):
        for bad in ("", ["a cat", ""]):
            with pytest.raises(openai.BadRequestError) as refused:
                sdk.embeddings.create(model=model, input=bad)
            assert refused.value.param == "input"
            assert "empty" in refused.value.message
    env.settled()
    assert balance(member)["posted"] == 1000
    assert env.upstream.stats().requests.get("/v1/embeddings", 0) == 0


# -- 7. the OpenAPI document -------------------------------------------------------------------


def test_the_openapi_document_has_the_v1_schemas(env: Env) -> None:
    document = httpx.get(f"{env.server.url}/openapi.json").json()
    paths = document["paths"]
    components = document["components"]["schemas"]

    def ref(content: dict[str, Any]) -> str:
        return str(content["application/json"]["schema"]["$ref"]).rsplit("/", 1)[-1]

    chat = paths["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == CHAT_FIELDS
    assert body["required"] == ["model", "messages"]
    assert body["additionalProperties"] is False
    embeddings = paths["/v1/embeddings"]["post"]
    body = embeddings["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == set(gateway_routes.EMBEDDING_FIELDS)
    assert "$ref" not in json.dumps(body)  # self-contained: FastAPI never sees the model
    for operation, success in [(chat, "ChatCompletion"), (embeddings, "CreateEmbeddingResponse")]:
        responses = operation["responses"]
        assert {"200", "400", "401", "402", "403", "404", "429", "502"} <= set(responses)
        assert ref(responses["200"]["content"]) == success
        for status in ("400", "401", "402", "403", "404", "429", "502"):
            assert ref(responses[status]["content"]) == "OpenAIErrorResponse", status
        assert "x-ratelimit-remaining-requests" in responses["200"]["headers"]
        assert "retry-after" in responses["429"]["headers"]
        assert "422" not in responses
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    listing = paths["/v1/models"]["get"]["responses"]
    assert ref(listing["200"]["content"]) == "ModelList"
    assert ref(listing["401"]["content"]) == "OpenAIErrorResponse"
    one = paths["/v1/models/{model_id}"]["get"]["responses"]
    assert set(one) == {"200", "401", "404"}  # no 422: the id is any string
    assert (ref(one["200"]["content"]), ref(one["404"]["content"])) == (
        "Model",
        "OpenAIErrorResponse",
    )
    error = components["OpenAIError"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    # The security scheme, for the app's document to merge (ubc/app.py's _document).
    merged = schemas.document(json.loads(json.dumps(document)))
    scheme = merged["components"]["securitySchemes"][schemas.SECURITY_SCHEME]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert chat["operationId"]
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        [operation] = merged["paths"][path].values()
        assert operation["security"] == [{schemas.SECURITY_SCHEME: []}]
    assert merged["paths"]["/v1/models"]["get"]["security"] == [
        {},
        {schemas.SECURITY_SCHEME: []},
    ]


def test_fastapi_neither_parses_nor_validates_the_metered_bodies(env: Env) -> None:
    """The handlers take the raw request (FastPath serves them ahead of routing): a body
    the documented schema refuses still reaches the gateway's own checks."""
    routes = {
        (route.path, method): route
        for route in gateway_routes.router.routes  # included in the app as they are
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    }
    for key in [("/v1/chat/completions", "POST"), ("/v1/embeddings", "POST")]:
        route = routes[key]
        assert route.body_field is None
        assert [p.name for p in route.dependant.body_params] == []
        assert route.endpoint in gateway_routes.FastPath(env.server.app).handlers.values()
    _, secret = env.member("alice", 10)
    answer = httpx.post(
        f"{env.server.url}/v1/embeddings",
        headers={"authorization": f"Bearer {secret}"},
        content=b"not json",
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "The request body is not valid JSON"
