"""The OpenAI-compatible surface (DESIGN section 7): models, chat completions, embeddings.

Any program written for the OpenAI API works by pointing ``base_url`` at ``<server>/v1``
and using a member's API key. Errors come in OpenAI's shape with its status codes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ubc import logs, metrics
from ubc.config import Settings
from ubc.db import as_unavailable
from ubc.gateway import schemas
from ubc.gateway.catalog import ModelSpec
from ubc.gateway.local import (
    MAX_TOKENS,
    VOCAB_SIZE,
    DimensionsNotSupportedError,
    check_dimensions,
    encode_base64,
    encode_float_list,
    get_local_embedder,
    token_bound,
)
from ubc.gateway.service import (
    Call,
    Gateway,
    GatewayError,
    Grant,
    Metered,
    check_chat_fields,
    prompt_bound,
)
from ubc.gateway.tokens import INLINE_TOKENIZE_BYTES, MAX_TOKENIZED_BYTES, image_bytes
from ubc.gateway.upstream import UPSTREAM_ERRORS

router = APIRouter(prefix="/v1", tags=["openai"])
log = logging.getLogger("ubc.gateway")

#: The fields of an embeddings request (OpenAI's schema); any other is refused.
EMBEDDING_FIELDS = frozenset(("model", "input", "encoding_format", "dimensions", "user"))
# Every local embedding input is at least [CLS] and [SEP]: the least an input can cost.
LOCAL_MIN_TOKENS = 2
# Per text input of an upstream embedding model: a BPE token covers at least one byte, a
# WordPiece token at least one character, plus begin/end tokens (at most 2).
UPSTREAM_SPECIAL_TOKENS = 2


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise GatewayError(400, "The request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object")
    return body


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GatewayError(400, f"'{name}' must be a positive integer", param=name)
    return value


def _model_entry(spec: ModelSpec, gateway: Gateway) -> dict[str, Any]:
    price = gateway.prices.get(spec.id)
    return {
        "id": spec.id,
        "object": "model",
        "created": 0,
        "owned_by": "ubc",
        # ubc's own fields: what a call costs (CU per 1K tokens) and what it serves.
        "kind": spec.kind,
        "pricing": price,
    }


async def _check_presented_key(gateway: Gateway, request: Request) -> None:
    """401 for a key that is sent and not valid (as OpenAI answers on every endpoint).
    Without an Authorization header the model listing is public (``ubc models`` and
    the console read it so): the models and prices are in the public journal anyway."""
    authorization = request.headers.get("authorization")
    if authorization is not None:
        await gateway.identify(authorization)


@router.get(
    "/models",
    summary="The models this ledger meters, with their prices",
    description="Public: no key is needed, but a key that is sent must be valid (401).",
    response_model=None,
    responses={200: {"model": schemas.ModelList}, **schemas.UNAUTHORIZED},
)
async def list_models(request: Request) -> JSONResponse:
    gateway = _gateway(request)
    try:
        await _check_presented_key(gateway, request)
    except GatewayError as error:
        return error_response(error)
    data = [_model_entry(spec, gateway) for _, spec in sorted(gateway.catalog.items())]
    return JSONResponse({"object": "list", "data": data})


@router.get(
    "/models/{model_id:path}",
    summary="One model",
    description="Public: no key is needed, but a key that is sent must be valid (401).",
    response_model=None,
    responses={200: {"model": schemas.Model}, **schemas.UNAUTHORIZED, **schemas.NOT_FOUND},
    # The id is read from the path as it is (no FastAPI parameter, so no 422 to document).
    openapi_extra=schemas.MODEL_ID_PARAMETER,
)
async def get_model(request: Request) -> JSONResponse:
    model_id: str = request.path_params["model_id"]
    gateway = _gateway(request)
    try:
        await _check_presented_key(gateway, request)
    except GatewayError as error:
        return error_response(error)
    spec = gateway.catalog.get(model_id)
    if spec is None:
        return error_response(
            GatewayError(
                404, f"The model '{model_id}' does not exist", code="model_not_found", param="model"
            )
        )
    return JSONResponse(_model_entry(spec, gateway))


@router.post(
    "/chat/completions",
    summary="Chat completions, metered (streaming with SSE)",
    response_model=None,
    responses=schemas.chat_responses(),
    openapi_extra=schemas.request_body(schemas.ChatCompletionRequest),
)
async def chat_completions(request: Request) -> Response:
    gateway = _gateway(request)
    metered: Metered | None = None
    try:
        # The key first, from the headers: nothing of the body is read for a bad key.
        grant = await gateway.authenticate(request.headers.get("authorization"))
        body = await _body(request)
        check_chat_fields(body)
        spec = gateway.model(body.get("model"), "chat")
        request.state.model = spec.id  # the label of ubc_model_calls_total (FastPath)
        gateway.permit(grant, spec)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise GatewayError(400, "'messages' must be a non-empty array", param="messages")
        asked = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
        # n choices generate up to n × max_tokens: the hold covers them all.
        choices = _positive_int(body, "n") or 1
        if choices > 16:
            raise GatewayError(400, "'n' must be at most 16", param="n")
        output_cap = min(asked or spec.max_output_tokens, spec.max_output_tokens)
        bound, estimate = await _chat_prompt(gateway, grant, spec, body, _settings(request))
        metered = gateway.metered(grant, spec, input_bound=bound, output_cap=output_cap * choices)
        # Every way out of the block by an error (or cancellation) releases the hold at
        # once; leaving it bills what was recorded; a stream takes the call over.
        async with metered as m:
            forwarded = dict(body)
            forwarded["model"] = spec.upstream_model
            # The clamped limit, under the name the caller used (newer models want
            # max_completion_tokens; max_tokens is the default).
            name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            forwarded.pop("max_tokens", None)
            forwarded.pop("max_completion_tokens", None)
            forwarded[name] = m.output_allowed(choices)
            if body.get("stream") is not True:
                data = await _chat_once(gateway, m, spec, forwarded, bound, estimate)
            else:
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                forwarded["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
                return await _chat_stream(
                    gateway, m, spec, forwarded, bound, include_usage, estimate
                )
        return JSONResponse(data, headers=m.headers())
    except GatewayError as error:
        return error_response(error)
    except Exception as exc:
        return error_response(_unexpected(exc, _call(metered), upstream=True))


async def _chat_prompt(
    gateway: Gateway, grant: Grant, spec: ModelSpec, body: dict[str, Any], settings: Settings
) -> tuple[int, int | None]:
    """The prompt's token bound for the hold, and what to bill for it if the upstream
    reports no usage (``None``: estimated from the byte bound).

    The byte bound first (O(bytes), no tokenizing); then, for a model with a tokenizer, its
    tokenizer bound (``ubc.gateway.tokens``), whose text (the byte bound less the image
    parts, which it does not read) is counted on the event loop up to
    ``INLINE_TOKENIZE_BYTES``, in one of the key's CPU slots above, and not at all above
    ``MAX_TOKENIZED_BYTES`` (held at the byte bound), so that no body makes the server
    tokenize more than that, and a large one only in its key's share of the cores."""
    size = prompt_bound(body)
    counter = spec.tokenizer
    if counter is None:
        return size, None
    text = size - image_bytes(body)
    if text > MAX_TOKENIZED_BYTES:
        return size, None
    if text <= INLINE_TOKENIZE_BYTES:
        tokens = counter.bound(body)
    else:
        async with gateway.cpu.key(grant.key_hash, settings.gateway_cpu_slots_per_key) as cpu:
            tokens = await cpu.run(counter.bound, body)
    return tokens, tokens


def _call(metered: Metered | None) -> Call | None:
    """The call a metered block held, if it got that far."""
    return metered.call if metered is not None else None


def _unexpected(exc: Exception, call: Call | None, *, upstream: bool) -> GatewayError:
    """The OpenAI-shaped answer to an exception no step expected: 503 with Retry-After
    while the database is unreachable or full, 502 once an upstream call was under way,
    else 500."""
    unavailable = as_unavailable(exc)
    if unavailable is not None:
        log.warning("a model call found the database unavailable: %s", exc)
        return GatewayError(
            503,
            unavailable.message,
            type_="server_error",
            code="database_unavailable",
            headers=unavailable.headers,
        )
    if call is not None and upstream:
        log.error(
            "call %s (%s): the upstream call failed unexpectedly",
            _named(call),
            call.spec.id,
            exc_info=exc,
        )
        return _upstream_failed(call, "The model's server failed to answer", "upstream")
    if call is not None:
        log.error("call %s (%s) failed unexpectedly", _named(call), call.spec.id, exc_info=exc)
        return GatewayError(
            500,
            "The server failed to answer the call",
            type_="server_error",
            headers={"x-request-id": call.request_id},
        )
    log.error("a model call failed unexpectedly", exc_info=exc)
    return GatewayError(500, "The server failed to answer the call", type_="server_error")


def _upstream_failed(call: Call, message: str, code: str) -> GatewayError:
    """A 502 in plain words, with the request id the operator's log names."""
    metrics.UPSTREAM_ERRORS.labels(call.spec.id, code).inc()
    return GatewayError(
        502, message, type_="upstream_error", code=code, headers={"x-request-id": call.request_id}
    )


async def _chat_once(
    gateway: Gateway,
    m: Metered,
    spec: ModelSpec,
    forwarded: dict[str, Any],
    bound: int,
    estimate: int | None,
) -> dict[str, Any]:
    """The upstream's JSON answer, its usage recorded on ``m``."""
    call = m.held
    try:
        status, content = await gateway.upstreams.post(spec, "/chat/completions", forwarded)
    except UPSTREAM_ERRORS as exc:
        raise _failed(call, exc) from None
    if status != 200:
        raise _upstream_error(call, status, content)
    try:
        data = json.loads(content)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError:
        raise _no_json(call, content) from None
    m.usage_from(data.get("usage"), bound, answer=data, estimate=estimate)
    data["model"] = spec.id
    return data


async def _chat_stream(
    gateway: Gateway,
    m: Metered,
    spec: ModelSpec,
    forwarded: dict[str, Any],
    bound: int,
    include_usage: bool,
    estimate: int | None,
) -> Response:
    call = m.held
    started = time.perf_counter()
    try:
        upstream = await gateway.upstreams.session(spec).post(
            gateway.upstreams.url(spec, "/chat/completions"),
            json=forwarded,
            headers=gateway.upstreams.headers(),
        )
    except UPSTREAM_ERRORS as exc:
        raise _failed(call, exc) from None
    metrics.UPSTREAM_SECONDS.labels(spec.id).observe(time.perf_counter() - started)
    if upstream.status != 200:
        try:
            content = await upstream.read()
        except UPSTREAM_ERRORS:
            content = b""
        finally:
            upstream.release()
        raise _upstream_error(call, upstream.status, content)
    try:
        return MeteredStream(m, spec, upstream, bound, include_usage, estimate)
    except BaseException:
        upstream.close()
        raise


class MeteredStream(Response):
    """Relays the upstream's SSE stream, counting what it delivers.

    When the caller goes away, the upstream call is cancelled (its connection closed)
    and what was received is billed: the upstream's usage if it came, else one output
    token per content chunk and the prompt's estimate.
    """

    def __init__(
        self,
        metered: Metered,
        spec: ModelSpec,
        upstream: aiohttp.ClientResponse,
        bound: int,
        include_usage: bool,
        estimate: int | None = None,
    ) -> None:
        super().__init__(
            status_code=200,
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", **metered.headers()},
        )
        # A stream has no length: it is sent chunked.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.request_id = metered.held.request_id
        self.spec = spec
        self.upstream = upstream
        self.bound = bound
        self.estimate = estimate
        self.include_usage = include_usage
        self.usage: dict[str, Any] | None = None
        self.chunks = 0
        self.complete = False
        # Built: the stream owns the call now and settles it when it ends.
        self.metered = metered.detach()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                try:
                    await self._relay(send)
                finally:
                    group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if self.complete:
                    self.upstream.release()  # the connection goes back to the pool
                else:
                    # Closing drops the connection: the upstream sees the caller go away
                    # and stops generating.
                    self.upstream.close()
                self.metered.usage_from(self.usage, self.bound, self.chunks, estimate=self.estimate)
                self.metered.settle()

    async def _relay(self, send: Send) -> None:
        lines = aiter(self.upstream.content)
        while True:
            try:
                raw = await anext(lines)
            except StopAsyncIteration:
                self.complete = True
                break
            except UPSTREAM_ERRORS:
                metrics.UPSTREAM_ERRORS.labels(self.spec.id, "upstream_disconnected").inc()
                break  # a cut stream: the caller gets what came; it is billed as received
            except Exception:
                # Anything else from the upstream's side ends the stream the same way.
                log.exception("call %s: the upstream stream failed", self.request_id)
                break
            out = self._line(raw.decode("utf-8", "replace"))
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _line(self, line: str) -> bytes | None:
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            return b"data: [DONE]\n\n"
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(chunk, dict):
            return None
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices") or []
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and (
                delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content")
            ):
                self.chunks += 1
        if not self.include_usage:
            if not choices and usage is not None:
                return None
            chunk.pop("usage", None)
        chunk["model"] = self.spec.id
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _failed(call: Call, exc: BaseException) -> GatewayError:
    """The upstream could not be reached or broke off: the caller is told in a sentence
    (the metered block releases the call as the error leaves it), the detail logged with
    the request id."""
    if isinstance(exc, _UNREACHABLE):
        message, code = "The model's server is unavailable", "upstream_unavailable"
    elif isinstance(exc, asyncio.TimeoutError):
        message, code = "The model's server did not answer in time", "upstream_timeout"
    else:
        message, code = "The model's server broke off the answer", "upstream_disconnected"
    log.warning(
        "call %s (%s at %s): %s: %r", _named(call), call.spec.id, call.spec.url, message, exc
    )
    return _upstream_failed(call, message, code)


#: Failures to connect at all (refused, no route, DNS, TLS, connect timeout).
_UNREACHABLE: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,
    ConnectionRefusedError,
    *((aiohttp.ConnectionTimeoutError,) if hasattr(aiohttp, "ConnectionTimeoutError") else ()),
)


def _named(call: Call) -> str:
    """A call as its log lines name it: its id, and the HTTP request's id (the one the
    caller is answered with) when the call has another (a hold placed again after a
    refusal gets a new id)."""
    request_id = logs.current_request_id()
    if request_id is None or request_id == call.request_id:
        return call.request_id
    return f"{call.request_id} (request {request_id})"


def _no_json(call: Call, content: bytes) -> GatewayError:
    log.warning(
        "call %s (%s): the model's server answered no JSON object: %r",
        _named(call),
        call.spec.id,
        content[:200],
    )
    return _upstream_failed(call, "The model's server sent an answer that is not JSON", "upstream")


def _upstream_error(call: Call, status: int, content: bytes) -> GatewayError:
    """An upstream's refusal. One of the caller's request (a 4xx but 401, 403, 429) is
    passed on with the upstream's message; the others (the operator's key or limits, the
    upstream's failures) are a 502 in a plain sentence, their detail logged."""
    detail = ""
    try:
        error = json.loads(content).get("error", {})
        if isinstance(error, dict) and error.get("message"):
            detail = str(error["message"])
    except (ValueError, AttributeError, RecursionError):
        pass
    if 400 <= status < 500 and status not in (401, 403, 429):
        message = (
            f"The model's server: {detail}" if detail else "The model's server refused the request"
        )
        return GatewayError(
            status, message, code="upstream_rejected", headers={"x-request-id": call.request_id}
        )
    if status in (401, 403):
        message = "The model's server refused this ledger's credentials"
    elif status == 429:
        message = "The model's server is over its capacity: retry later"
    else:
        message = f"The model's server failed to answer (HTTP {status})"
    log.warning(
        "call %s (%s at %s): upstream HTTP %s: %s",
        _named(call),
        call.spec.id,
        call.spec.url,
        status,
        detail or repr(content[:200]),
    )
    return _upstream_failed(call, message, f"upstream_{status}")


@router.post(
    "/embeddings",
    summary="Embeddings, metered (float or base64)",
    response_model=None,
    responses=schemas.embedding_responses(),
    openapi_extra=schemas.request_body(schemas.EmbeddingRequest),
)
async def embeddings(request: Request) -> Response:
    gateway = _gateway(request)
    settings = _settings(request)
    metered: Metered | None = None
    local = False
    try:
        # The key first, from the headers: nothing of the body is read for a bad key.
        grant = await gateway.authenticate(request.headers.get("authorization"))
        body = await _body(request)
        for name in body:
            if name not in EMBEDDING_FIELDS:
                raise GatewayError(
                    400,
                    f"Unrecognized request argument supplied: {name}",
                    code="unknown_parameter",
                    param=name,
                )
        spec = gateway.model(body.get("model"), "embeddings")
        request.state.model = spec.id  # the label of ubc_model_calls_total (FastPath)
        gateway.permit(grant, spec)
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise GatewayError(
                400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format"
            )
        dimensions = _positive_int(body, "dimensions")
        local = spec.backend == "local"
        texts, arrays = _embedding_inputs(
            body.get("input"), settings.embedding_max_inputs, VOCAB_SIZE if local else None
        )
        if not local:
            bound = _input_bound(texts, arrays, settings.embedding_max_input_bytes)
            metered = gateway.metered(grant, spec, input_bound=bound, output_cap=0)
            async with metered as m:
                answer = await _upstream_embeddings(gateway, m, spec, body, bound)
            return JSONResponse(answer, headers=m.headers())
        if texts is not None:
            # O(bytes) checks, no tokenizing, before anything is held: held is up to the
            # inputs' token bound (bytes + 2 each, 256 at most), at least their least cost
            # (2 tokens each): an account that cannot pay even that is refused before any
            # tokenizing.
            sizes = _text_sizes(texts, settings.embedding_max_input_bytes)
            bound = sum(token_bound(size) for size in sizes)
            floor = LOCAL_MIN_TOKENS * len(texts)
            given: list[list[int]] | None = None
        else:
            # Token ids are the model's input as given (cut at 256 like a text's tokens):
            # their count is known before the hold.
            assert arrays is not None
            given = [ids[:MAX_TOKENS] for ids in arrays]
            bound = floor = sum(len(ids) for ids in given)
        try:
            check_dimensions(dimensions)
        except DimensionsNotSupportedError as exc:
            raise GatewayError(400, str(exc), param="dimensions") from None
        embedder = get_local_embedder()
        metered = gateway.metered(grant, spec, input_bound=bound, input_floor=floor, output_cap=0)
        async with (
            gateway.cpu.key(grant.key_hash, settings.gateway_cpu_slots_per_key) as cpu,
            metered as m,
        ):
            ids = given if given is not None else await cpu.run(embedder.encode, texts or [])
            tokens = sum(len(x) for x in ids)
            m.require_covered(tokens)
            vectors = await cpu.run(embedder.embed_ids, ids, dimensions)
            m.bill(tokens, 0)
        encode = encode_base64 if encoding == "base64" else encode_float_list
        data = [
            {"object": "embedding", "index": i, "embedding": encode(vector)}
            for i, vector in enumerate(vectors)
        ]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": spec.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            headers=m.headers(),
        )
    except GatewayError as error:
        return error_response(error)
    except Exception as exc:
        return error_response(_unexpected(exc, _call(metered), upstream=not local))


_INPUT_SHAPES = (
    "'input' must be a string, an array of strings, an array of token ids or an array of "
    "token-id arrays"
)


def _embedding_inputs(
    value: object, max_inputs: int, vocabulary: int | None
) -> tuple[list[str], None] | tuple[None, list[list[int]]]:
    """The inputs of an embeddings call in OpenAI's four shapes: a string, strings, token
    ids (one input) or arrays of them. 400 naming ``input`` for another shape, an empty
    string or array (OpenAI refuses them too), more than ``max_inputs`` inputs, or a
    token id that is not an int of ``[0, vocabulary)`` (``None``: any id ≥ 0, the
    upstream checks its vocabulary)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise GatewayError(400, f"{_INPUT_SHAPES} (not empty)", param="input")
    if isinstance(value[0], str):
        if not all(isinstance(item, str) for item in value):
            raise GatewayError(400, _INPUT_SHAPES, param="input")
        if "" in value:
            raise GatewayError(400, "'input' must not be an empty string", param="input")
        if len(value) > max_inputs:
            raise GatewayError(400, f"at most {max_inputs} inputs per request", param="input")
        return value, None
    arrays: list[Any] = [value] if _is_token_ids(value[0]) else value
    if len(arrays) > max_inputs:
        raise GatewayError(400, f"at most {max_inputs} inputs per request", param="input")
    for ids in arrays:
        if not isinstance(ids, list) or not ids:
            raise GatewayError(400, f"{_INPUT_SHAPES} (not empty)", param="input")
        if not all(type(token) is int and token >= 0 for token in ids):
            raise GatewayError(400, f"{_INPUT_SHAPES}; token ids are integers ≥ 0", param="input")
        if vocabulary is not None and max(ids) >= vocabulary:
            raise GatewayError(
                400,
                f"'input' holds the token id {max(ids)}, not in the model's vocabulary "
                f"(0 to {vocabulary - 1})",
                param="input",
            )
    return None, arrays


def _is_token_ids(item: object) -> bool:
    """Whether an item of ``input`` is a token id (an int, not a bool)."""
    return type(item) is int


def _text_sizes(texts: list[str], max_bytes: int) -> list[int]:
    """The UTF-8 size of each text; 400 when they are more than ``max_bytes`` in all or
    one is not valid Unicode (a lone surrogate, which JSON allows)."""
    sizes: list[int] = []
    total = 0
    for text in texts:
        if text.isascii():
            size = len(text)
        else:
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise GatewayError(
                    400, "'input' holds a lone surrogate (not Unicode text)", param="input"
                ) from None
        total += size
        if total > max_bytes:
            raise GatewayError(
                400, f"'input' is more than {max_bytes} bytes of text in all", param="input"
            )
        sizes.append(size)
    return sizes


async def _upstream_embeddings(
    gateway: Gateway, m: Metered, spec: ModelSpec, body: dict[str, Any], bound: int
) -> dict[str, Any]:
    """The upstream's JSON answer, its usage recorded on ``m``."""
    call = m.held
    forwarded = dict(body)
    forwarded["model"] = spec.upstream_model
    try:
        status, content = await gateway.upstreams.post(spec, "/embeddings", forwarded)
        data = json.loads(content) if status == 200 else None
    except UPSTREAM_ERRORS as exc:
        raise _failed(call, exc) from None
    except ValueError:
        data = None
    if status != 200 or not isinstance(data, dict):
        if status == 200:
            raise _no_json(call, content)
        raise _upstream_error(call, status, content)
    m.usage_from(data.get("usage"), bound, completion=False)
    data["model"] = spec.id
    return data


def _input_bound(texts: list[str] | None, arrays: list[list[int]] | None, max_bytes: int) -> int:
    """Tokens an upstream embeddings input can be at most: per text its UTF-8 bytes plus
    the begin/end tokens, or the ids given; 400 past ``max_bytes`` of text in all."""
    if arrays is not None:
        return sum(len(ids) for ids in arrays)
    total = 0
    text_bytes = 0
    for item in texts or []:
        size = len(item.encode("utf-8", "surrogatepass"))
        text_bytes += size
        if text_bytes > max_bytes:
            raise GatewayError(
                400, f"'input' is more than {max_bytes} bytes of text in all", param="input"
            )
        total += size + UPSTREAM_SPECIAL_TOKENS
    return total


class FastPath:
    """Serves the two metered POST endpoints ahead of FastAPI's routing and dependency
    machinery, which cost about a quarter of a call's CPU under load (the same handlers
    stay registered above for the OpenAPI document)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.handlers: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/v1/chat/completions": chat_completions,
            "/v1/embeddings": embeddings,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.handlers.get(scope["path"])
            if handler is not None:
                request = Request(scope, receive)
                response = await handler(request)
                model = getattr(request.state, "model", metrics.NO_MODEL)
                metrics.MODEL_CALLS.labels(model, str(response.status_code)).inc()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
