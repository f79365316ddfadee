"""The OpenAPI description of the OpenAI-compatible endpoint (``/v1``).

Documentation only: ``FastPath`` serves the two metered POST endpoints ahead of
FastAPI's routing, and every ``/v1`` handler takes the raw ``Request`` and checks the
body itself (``ubc/gateway/routes.py``), so nothing here is parsed or validated on a
call. The routes declare these models with ``responses=`` (FastAPI puts the response
models in ``components/schemas``) and their request bodies with ``openapi_extra``, as
self-contained schemas (no ``$ref``: FastAPI does not know the request models, so they
are not among the components it writes).

The request models list exactly the fields the gateway accepts (a test keeps them in
step with ``CHAT_FIELDS`` and ``EMBEDDING_FIELDS``); the answers are OpenAI's, plus
ubc's own ``kind`` and ``pricing`` of a model.

``document(schema)`` adds the bearer security scheme of the API keys to an assembled
document and marks the ``/v1`` operations with it (the model listing answers without a
key too).
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

#: The name of the API keys' security scheme in ``components/securitySchemes``.
SECURITY_SCHEME: Final = "ApiKey"

RATE_HEADERS: Final = ("requests", "tokens")


# -- errors -----------------------------------------------------------------------------------


class OpenAIError(BaseModel):
    """An error as OpenAI writes it."""

    message: str = Field(description="what went wrong, in a sentence")
    type: str = Field(
        description="invalid_request_error, insufficient_quota, permission_error, requests "
        "(rate limits), upstream_error or server_error"
    )
    param: str | None = Field(description="the request parameter at fault, or null")
    code: str | None = Field(
        description="e.g. invalid_api_key, insufficient_quota, model_not_found, "
        "unknown_parameter, rate_limit_exceeded, upstream_unavailable; or null"
    )


class OpenAIErrorResponse(BaseModel):
    """The body of every error of ``/v1``: ``{"error": {message, type, param, code}}``."""

    error: OpenAIError


# -- models -----------------------------------------------------------------------------------


class Pricing(BaseModel):
    input: int = Field(description="CU per 1,000 input tokens")
    output: int = Field(description="CU per 1,000 output tokens")


class Model(BaseModel):
    """A model the ledger meters (OpenAI's model object, with ubc's ``kind`` and
    ``pricing``)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: Literal["chat", "embeddings"]
    pricing: Pricing | None = Field(description="null until the price is in the journal")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


# -- chat completions -------------------------------------------------------------------------


class ChatMessage(BaseModel):
    """One message of the conversation (OpenAI's roles and content forms)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = Field(
        default=None, description="text, or content parts (text, image_url...)"
    )
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = Field(
        default=None, description="send a last chunk with the usage (choices: [])"
    )
    include_obfuscation: bool | None = None


class ChatCompletionRequest(BaseModel):
    """A chat completion. Only these fields are accepted (another is refused with 400
    ``unknown_parameter``): each is either counted in the hold or a small scalar."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a chat model of GET /v1/models")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        default=None, ge=1, description="clamped to the model's limit and what the account affords"
    )
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=16)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    top_logprobs: int | None = None
    logprobs: bool | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, int] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class AssistantMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["assistant"]
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    message: AssistantMessage
    finish_reason: str | None = Field(description="stop, length, tool_calls, content_filter")
    logprobs: dict[str, Any] | None = None


class CompletionUsage(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """The answer of a call without ``stream``."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str = Field(description="the model id as asked")
    choices: list[ChatChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class ChunkChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    delta: dict[str, Any] = Field(description="role, content, tool_calls... as they come")
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One ``data:`` event of a streamed answer (the stream ends with ``data: [DONE]``);
    with ``stream_options.include_usage`` the last chunk has ``choices: []`` and the
    usage."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


# -- embeddings -------------------------------------------------------------------------------


Text = Annotated[str, Field(min_length=1)]
Texts = Annotated[list[Text], Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
TokenIdArrays = Annotated[list[TokenIds], Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    """Embeddings of one input or many. ``input`` is a non-empty string, an array of
    them, an array of token ids (one input), or an array of such arrays; for the local
    model the ids are its tokenizer's (0 to 30,521), used as given and cut at 256."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="an embeddings model of GET /v1/models")
    input: Text | Texts | TokenIds | TokenIdArrays = Field(
        description="no empty string, no empty array; at most 2,048 inputs by default"
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        default=None, description="float (default) or base64 (little-endian float32)"
    )
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of float32 values")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# -- what the route declarations use ----------------------------------------------------------


def _rate_headers() -> dict[str, Any]:
    headers: dict[str, Any] = {}
    for kind in RATE_HEADERS:
        headers[f"x-ratelimit-limit-{kind}"] = {
            "description": f"the {kind} per minute of the key's tightest limit",
            "schema": {"type": "string"},
        }
        headers[f"x-ratelimit-remaining-{kind}"] = {
            "description": f"the {kind} left in it",
            "schema": {"type": "string"},
        }
        headers[f"x-ratelimit-reset-{kind}"] = {
            "description": "until it is full again (20ms, 8.64s, 6m0s)",
            "schema": {"type": "string"},
        }
    return headers


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": OpenAIErrorResponse, "description": description, **extra}


Responses = dict[int | str, dict[str, Any]]

_REQUEST_ID = {
    "x-request-id": {"description": "the call's request id", "schema": {"type": "string"}}
}
UNAUTHORIZED: Responses = {
    401: _error("No API key, or one that is unknown, revoked or expired (invalid_api_key)")
}
NOT_FOUND: Responses = {404: _error("No such model (model_not_found)")}
CALL_RESPONSES: Responses = {
    400: _error("The request is not valid (param names the field)"),
    **UNAUTHORIZED,
    402: _error(
        "The account or the key's spend cap cannot pay for the call (insufficient_quota; "
        "do not retry)"
    ),
    403: _error("The key has no models scope or may not use this model"),
    **NOT_FOUND,
    429: _error(
        "A rate limit of the key or model (rate_limit_exceeded), or too many calls of the key "
        "in progress",
        headers={
            "retry-after": {"description": "seconds", "schema": {"type": "string"}},
            **_rate_headers(),
        },
    ),
    500: _error("The server failed (server_error)"),
    502: _error("The model's server is unavailable or failed (upstream_*)"),
    503: _error("The model has no price in the journal yet (model_not_priced)"),
}


MODEL_ID_PARAMETER: Final[dict[str, Any]] = {
    "parameters": [
        {
            "name": "model_id",
            "in": "path",
            "required": True,
            "description": "a model id of GET /v1/models (it may contain slashes)",
            "schema": {"type": "string"},
        }
    ]
}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its nested models written in place (no ``$ref``)."""
    schema = model.model_json_schema()
    definitions: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                target = resolve(copy.deepcopy(definitions[ref.removeprefix("#/$defs/")]))
                rest = {k: resolve(v) for k, v in node.items() if k != "$ref"}
                return {**target, **rest}
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting ``model`` as the JSON request body."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(model)}},
        }
    }


def chat_responses() -> Responses:
    return {
        200: {
            "model": ChatCompletion,
            "description": "The answer; with stream: true, server-sent events of "
            "ChatCompletionChunk objects ending with data: [DONE]",
            "headers": {**_REQUEST_ID, **_rate_headers()},
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "string",
                        "description": "data: <ChatCompletionChunk JSON> events, then "
                        "data: [DONE] (x-item-schema: the chunk's schema)",
                    },
                    # OpenAPI 3.2's itemSchema, as an extension of this 3.1 document.
                    "x-item-schema": inline_schema(ChatCompletionChunk),
                }
            },
        },
        **CALL_RESPONSES,
    }


def embedding_responses() -> Responses:
    return {
        200: {
            "model": CreateEmbeddingResponse,
            "description": "One embedding per input, in order",
            "headers": {**_REQUEST_ID, **_rate_headers()},
        },
        **CALL_RESPONSES,
    }


# -- the security scheme ----------------------------------------------------------------------


def openapi_components() -> dict[str, dict[str, Any]]:
    """The components the ``/v1`` operations need beyond FastAPI's: the bearer scheme."""
    return {
        "securitySchemes": {
            SECURITY_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": "A member's API key (ubc_sk_...), as OpenAI clients send it: "
                "Authorization: Bearer <key>",
            }
        }
    }


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the API keys' security scheme to an assembled OpenAPI document (in place;
    returned too) and require it on every ``/v1`` operation: optional on the model
    listing, which answers without a key (a key that is sent must be valid)."""
    components = schema.setdefault("components", {})
    for section, entries in openapi_components().items():
        target = components.setdefault(section, {})
        for name, entry in entries.items():
            target.setdefault(name, entry)
    for path, item in schema.get("paths", {}).items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in item.items():
            if not isinstance(operation, dict) or method not in ("get", "post"):
                continue
            required: list[dict[str, list[str]]] = [{SECURITY_SCHEME: []}]
            operation["security"] = [{}, *required] if method == "get" else required
    return schema
