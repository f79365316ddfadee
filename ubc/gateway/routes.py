"""The OpenAI-compatible surface (DESIGN section 7): models, chat completions, embeddings.

Any program written for the OpenAI API works by pointing ``base_url`` at ``<server>/v1``
and using a member's API key. Errors come in OpenAI's shape with its status codes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ubc.gateway.catalog import ModelSpec
from ubc.gateway.local import encode_base64, encode_float_list, get_local_embedder
from ubc.gateway.service import (
    Call,
    Gateway,
    GatewayError,
    estimate_tokens,
    max_output_tokens,
    prompt_bound,
)
from ubc.gateway.upstream import UPSTREAM_ERRORS

router = APIRouter(prefix="/v1", tags=["openai"])


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
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


@router.get("/models", summary="The models this ledger meters, with their prices")
async def list_models(request: Request) -> JSONResponse:
    gateway = _gateway(request)
    data = [_model_entry(spec, gateway) for _, spec in sorted(gateway.catalog.items())]
    return JSONResponse({"object": "list", "data": data})


@router.get("/models/{model_id:path}", summary="One model")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    gateway = _gateway(request)
    spec = gateway.catalog.get(model_id)
    if spec is None:
        return error_response(
            GatewayError(
                404, f"The model '{model_id}' does not exist", code="model_not_found", param="model"
            )
        )
    return JSONResponse(_model_entry(spec, gateway))


@router.post("/chat/completions", summary="Chat completions, metered (streaming with SSE)")
async def chat_completions(request: Request) -> Response:
    gateway = _gateway(request)
    call: Call | None = None
    try:
        body = await _body(request)
        spec = gateway.model(body.get("model"), "chat")
        grant = await gateway.authorize(request.headers.get("authorization"), spec)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise GatewayError(400, "'messages' must be a non-empty array", param="messages")
        asked = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
        # n choices generate up to n × max_tokens: the hold covers them all.
        choices = _positive_int(body, "n") or 1
        if choices > 16:
            raise GatewayError(400, "'n' must be at most 16", param="n")
        output_cap = min(asked or spec.max_output_tokens, spec.max_output_tokens)
        bound = prompt_bound(body)
        call = await gateway.begin(grant, spec, input_bound=bound, output_cap=output_cap * choices)
        allowed = max_output_tokens(call.held, bound, call.price, output_cap * choices) // choices
        if allowed < 1:
            raise GatewayError(
                402,
                "You exceeded your current quota: not enough left for one token per choice",
                type_="insufficient_quota",
                code="insufficient_quota",
            )
        forwarded = dict(body)
        forwarded["model"] = spec.upstream_model
        # The clamped limit, under the name the caller used (newer models want
        # max_completion_tokens; max_tokens is the default).
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        forwarded.pop("max_tokens", None)
        forwarded.pop("max_completion_tokens", None)
        forwarded[name] = allowed
        stream = body.get("stream") is True
        if not stream:
            return await _chat_once(gateway, call, spec, forwarded, bound)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        forwarded["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
        return await _chat_stream(gateway, call, spec, forwarded, bound, include_usage)
    except GatewayError as error:
        if call is not None:
            gateway.finish(call, 0, 0)
        return error_response(error)


async def _chat_once(
    gateway: Gateway, call: Call, spec: ModelSpec, forwarded: dict[str, Any], bound: int
) -> Response:
    try:
        status, content = await gateway.upstreams.post(spec, "/chat/completions", forwarded)
    except UPSTREAM_ERRORS as exc:
        raise _failed(gateway, call, exc) from None
    if status != 200:
        gateway.finish(call, 0, 0)
        raise _upstream_error(status, content)
    try:
        data = json.loads(content)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError:
        gateway.finish(call, 0, 0)
        raise GatewayError(
            502, "The model's server answered no JSON", type_="upstream_error", code="upstream"
        ) from None
    usage = data.get("usage") if isinstance(data, dict) else None
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        input_tokens = usage["prompt_tokens"]
        output_tokens = int(usage.get("completion_tokens") or 0)
    else:
        text = "".join(
            str((choice.get("message") or {}).get("content") or "")
            for choice in data.get("choices", [])
        )
        input_tokens, output_tokens = estimate_tokens(bound), estimate_tokens(len(text.encode()))
    gateway.finish(call, input_tokens, output_tokens)
    data["model"] = spec.id
    return JSONResponse(data, headers={"x-request-id": call.request_id})


async def _chat_stream(
    gateway: Gateway,
    call: Call,
    spec: ModelSpec,
    forwarded: dict[str, Any],
    bound: int,
    include_usage: bool,
) -> Response:
    try:
        upstream = await gateway.upstreams.session(spec).post(
            gateway.upstreams.url(spec, "/chat/completions"), json=forwarded
        )
    except UPSTREAM_ERRORS as exc:
        raise _failed(gateway, call, exc) from None
    if upstream.status != 200:
        try:
            content = await upstream.read()
        except UPSTREAM_ERRORS:
            content = b""
        upstream.release()
        gateway.finish(call, 0, 0)
        raise _upstream_error(upstream.status, content)
    return MeteredStream(gateway, call, spec, upstream, bound, include_usage)


class MeteredStream(Response):
    """Relays the upstream's SSE stream, counting what it delivers.

    When the caller goes away, the upstream call is cancelled (its connection closed)
    and what was received is billed: the upstream's usage if it came, else one output
    token per content chunk and the prompt's estimate.
    """

    def __init__(
        self,
        gateway: Gateway,
        call: Call,
        spec: ModelSpec,
        upstream: aiohttp.ClientResponse,
        bound: int,
        include_usage: bool,
    ) -> None:
        super().__init__(
            status_code=200,
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-request-id": call.request_id},
        )
        # A stream has no length: it is sent chunked.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.gateway = gateway
        self.call = call
        self.spec = spec
        self.upstream = upstream
        self.bound = bound
        self.include_usage = include_usage
        self.usage: dict[str, Any] | None = None
        self.chunks = 0
        self.complete = False

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
                usage = self.usage
                if usage is not None and isinstance(usage.get("prompt_tokens"), int):
                    input_tokens = usage["prompt_tokens"]
                    output_tokens = int(usage.get("completion_tokens") or 0)
                else:
                    input_tokens, output_tokens = estimate_tokens(self.bound), self.chunks
                self.gateway.finish(self.call, input_tokens, output_tokens)

    async def _relay(self, send: Send) -> None:
        try:
            async for raw in self.upstream.content:
                out = self._line(raw.decode("utf-8", "replace"))
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            self.complete = True
        except UPSTREAM_ERRORS:
            pass  # a cut stream: the caller gets what came; it is billed as received
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _line(self, line: str) -> bytes | None:
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            return b"data: [DONE]\n\n"
        try:
            chunk = json.loads(data)
        except ValueError:
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


def _failed(gateway: Gateway, call: Call, exc: BaseException) -> GatewayError:
    """The upstream could not be reached or broke off: the call is released unbilled."""
    gateway.finish(call, 0, 0)
    return GatewayError(
        502, f"The model's server failed: {exc!r}", type_="upstream_error", code="upstream"
    )


def _upstream_error(status: int, content: bytes) -> GatewayError:
    message = "The model's server refused the request"
    try:
        error = json.loads(content).get("error", {})
        if isinstance(error, dict) and error.get("message"):
            message = f"The model's server: {error['message']}"
    except (ValueError, AttributeError):
        pass
    if 400 <= status < 500 and status not in (401, 403, 429):
        # The caller's request was bad; the upstream's key or limits are the operator's.
        return GatewayError(status, message, code="upstream_rejected")
    return GatewayError(502, message, type_="upstream_error", code=f"upstream_{status}")


@router.post("/embeddings", summary="Embeddings, metered (float or base64)")
async def embeddings(request: Request) -> Response:
    gateway = _gateway(request)
    call: Call | None = None
    try:
        body = await _body(request)
        spec = gateway.model(body.get("model"), "embeddings")
        grant = await gateway.authorize(request.headers.get("authorization"), spec)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise GatewayError(
                400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format"
            )
        dimensions = _positive_int(body, "dimensions")
        if spec.backend == "local":
            if (
                not isinstance(inputs, list)
                or not inputs
                or not all(isinstance(i, str) for i in inputs)
            ):
                raise GatewayError(
                    400, "'input' must be a string or a non-empty array of strings", param="input"
                )
            if len(inputs) > 2048:
                raise GatewayError(400, "at most 2048 inputs per request", param="input")
            texts: list[str] = inputs
            embedder = get_local_embedder()
            counts = await asyncio.to_thread(embedder.count_tokens, texts)
            tokens = sum(counts)
            call = await gateway.begin(grant, spec, input_bound=tokens, output_cap=0)
            try:
                vectors, _ = await asyncio.to_thread(embedder.embed, texts, dimensions)
            except ValueError as exc:
                raise GatewayError(400, str(exc), param="dimensions") from None
            gateway.finish(call, tokens, 0)
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
                headers={"x-request-id": call.request_id},
            )
        return await _upstream_embeddings(gateway, grant, spec, body, inputs)
    except GatewayError as error:
        if call is not None:
            gateway.finish(call, 0, 0)
        return error_response(error)


async def _upstream_embeddings(
    gateway: Gateway, grant: Any, spec: ModelSpec, body: dict[str, Any], inputs: Any
) -> Response:
    bound = _input_bound(inputs)
    call = await gateway.begin(grant, spec, input_bound=bound, output_cap=0)
    forwarded = dict(body)
    forwarded["model"] = spec.upstream_model
    try:
        status, content = await gateway.upstreams.post(spec, "/embeddings", forwarded)
        data = json.loads(content) if status == 200 else None
    except UPSTREAM_ERRORS as exc:
        raise _failed(gateway, call, exc) from None
    except ValueError:
        data = None
    if status != 200 or not isinstance(data, dict):
        gateway.finish(call, 0, 0)
        if status == 200:
            raise GatewayError(
                502, "The model's server answered no JSON", type_="upstream_error", code="upstream"
            )
        raise _upstream_error(status, content)
    usage = data.get("usage") or {}
    tokens = usage.get("prompt_tokens")
    gateway.finish(call, tokens if isinstance(tokens, int) else estimate_tokens(bound), 0)
    data["model"] = spec.id
    return JSONResponse(data, headers={"x-request-id": call.request_id})


def _input_bound(inputs: Any) -> int:
    """Tokens an embeddings input can be at most: bytes of text, or the ids given."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise GatewayError(400, "'input' must be a string or a non-empty array", param="input")
    if all(isinstance(i, int) for i in inputs):
        return len(inputs)
    total = 0
    for item in inputs:
        if isinstance(item, str):
            total += max(1, len(item.encode()))
        elif isinstance(item, list) and all(isinstance(t, int) for t in item):
            total += len(item)
        else:
            raise GatewayError(400, "'input' items must be strings or token arrays", param="input")
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
                response = await handler(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
