"""The fake OpenAI-compatible upstream (tests/upstream.py), through httpx and the openai SDK."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.upstream import (
    FakeUpstream,
    UpstreamStats,
    chat_prompt_tokens,
    fake_embedding,
    parse_modes,
    run_upstream,
    spawn_upstream,
)

KEY = "sk-upstream-test"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    with run_upstream(api_key=KEY, answer_tokens={"long-model": 40}) as upstream:
        yield upstream


@pytest.fixture
def client(up: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=up.api_base, headers=AUTH, timeout=5, verify=False) as c:
        yield c


def chat_body(content: Any = "hello there world", **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(response: httpx.Response) -> list[Any]:
    """The data of each SSE event, JSON-decoded ("[DONE]" kept as is)."""
    events: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# --------------------------------------------------------------------------- unit


def test_prompt_token_rule() -> None:
    messages = [
        {"role": "system", "content": "be   brief"},
        {"role": "user", "content": [{"type": "text", "text": "a b c"}, {"type": "image_url"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
    ]
    assert chat_prompt_tokens(messages) == 2 + 3 + 3


def test_modes_from_header_and_model() -> None:
    modes = parse_modes("slow-stream-30, no-usage", "fake:cut-after-2")
    assert (modes.slow_stream_ms, modes.no_usage, modes.cut_after) == (30.0, True, 2)
    assert parse_modes(None, "gpt-4o-mini").fail is None
    assert parse_modes("fail-429", "").fail == 429
    assert parse_modes(None, "org/hang").hang


# --------------------------------------------------------------------------- chat


def test_chat_plain(up: FakeUpstream, client: httpx.Client) -> None:
    r = client.post("/chat/completions", json=chat_body())
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "fake-model"
    assert data["id"].startswith("chatcmpl-")
    assert isinstance(data["created"], int)
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == " ".join(f"tok{i}" for i in range(16))
    assert choice["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}
    stats = up.stats()
    assert stats.requests == {"/v1/chat/completions": 1}
    assert stats.last_request_body == chat_body()
    assert stats.last_request_headers is not None
    assert stats.last_request_headers["authorization"] == f"Bearer {KEY}"


def test_chat_max_tokens_and_answer_length(client: httpx.Client) -> None:
    def usage_and_finish(body: dict[str, Any]) -> tuple[int, str]:
        data = client.post("/chat/completions", json=body).json()
        assert (
            len(data["choices"][0]["message"]["content"].split())
            == (data["usage"]["completion_tokens"])
        )
        return data["usage"]["completion_tokens"], data["choices"][0]["finish_reason"]

    assert usage_and_finish(chat_body(max_tokens=5)) == (5, "length")
    assert usage_and_finish(chat_body(max_completion_tokens=3)) == (3, "length")
    assert usage_and_finish(chat_body(max_tokens=16)) == (16, "stop")
    assert usage_and_finish(chat_body(max_tokens=100)) == (16, "stop")
    assert usage_and_finish({**chat_body(), "model": "long-model"}) == (40, "stop")
    assert usage_and_finish({**chat_body(max_tokens=30), "model": "long-model"}) == (30, "length")
    assert usage_and_finish({**chat_body(), "model": "fake:answer-2"}) == (2, "stop")
    parts = [{"type": "text", "text": "one two"}, {"type": "text", "text": "three"}]
    data = client.post("/chat/completions", json=chat_body(parts)).json()
    assert data["usage"]["prompt_tokens"] == 4
    assert client.post("/chat/completions", json={"model": "m"}).status_code == 400
    assert client.post("/chat/completions", json=chat_body(max_tokens=-1)).status_code == 400


def test_chat_stream_with_usage(up: FakeUpstream, client: httpx.Client) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True}, max_tokens=4)
    with client.stream("POST", "/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    tokens = [c["choices"][0]["delta"]["content"] for c in chunks[1:5]]
    assert tokens == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert chunks[5]["choices"][0]["finish_reason"] == "length"
    assert chunks[5]["choices"][0]["delta"] == {}
    assert chunks[6]["choices"] == []
    assert chunks[6]["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    assert all(c["usage"] is None for c in chunks[:6])
    assert len(chunks) == 7
    stats = up.wait_for(lambda s: s.streams_completed == 1)
    assert (stats.streams_started, stats.streams_cancelled, stats.tokens_sent) == (1, 0, 4)
    assert stats.last_request_body["stream_options"] == {"include_usage": True}


def test_chat_stream_without_usage(client: httpx.Client) -> None:
    with client.stream("POST", "/chat/completions", json=chat_body(stream=True)) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert len(events) == 1 + 16 + 1 + 1
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


# --------------------------------------------------------------------------- embeddings


def test_embeddings_float_and_base64(up: FakeUpstream, client: httpx.Client) -> None:
    r = client.post("/embeddings", json={"model": "emb", "input": ["a b c", "d"]})
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "list"
    assert data["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    vectors = [d["embedding"] for d in data["data"]]
    assert [d["index"] for d in data["data"]] == [0, 1]
    assert vectors == [fake_embedding("a b c", 8), fake_embedding("d", 8)]
    assert abs(sum(v * v for v in vectors[0]) - 1.0) < 1e-5
    assert vectors[0] != vectors[1]

    body = {"input": "a b c", "dimensions": 5, "encoding_format": "base64"}
    data = client.post("/embeddings", json=body).json()
    raw = base64.b64decode(data["data"][0]["embedding"])
    assert list(struct.unpack("<5f", raw)) == fake_embedding("a b c", 5)
    assert data["usage"]["prompt_tokens"] == 3

    data = client.post("/embeddings", json={"input": [[1, 2, 3], [4]]}).json()
    assert data["usage"]["prompt_tokens"] == 4
    assert len(data["data"]) == 2
    data = client.post("/embeddings", json={"input": [7, 8]}).json()
    assert (data["usage"]["prompt_tokens"], len(data["data"])) == (2, 1)
    assert client.post("/embeddings", json={"input": []}).status_code == 400
    assert client.post("/embeddings", json={"input": "x", "dimensions": 0}).status_code == 400
    assert up.stats().requests == {"/v1/embeddings": 6}


def test_models(client: httpx.Client) -> None:
    data = client.get("/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["fake-model", "long-model"]


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("status", [500, 400, 429])
def test_fail_modes(up: FakeUpstream, client: httpx.Client, status: int) -> None:
    by_model = client.post("/chat/completions", json={**chat_body(), "model": f"fail-{status}"})
    by_header = client.post(
        "/embeddings", json={"input": "x"}, headers={"x-fake-mode": f"fail-{status}"}
    )
    for r in (by_model, by_header):
        assert r.status_code == status
        error = r.json()["error"]
        assert error["message"]
        assert error["type"] == {500: "server_error", 400: "invalid_request_error"}.get(
            status, "requests"
        )
    assert up.stats().responses == {status: 2}
    # The connection stays usable after an error.
    assert client.post("/chat/completions", json=chat_body()).status_code == 200


def test_cut_after(up: FakeUpstream, client: httpx.Client) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    headers = {"x-fake-mode": "cut-after-3"}
    tokens: list[str] = []

    def read_stream() -> None:
        with client.stream("POST", "/chat/completions", json=body, headers=headers) as r:
            for line in r.iter_lines():
                assert "[DONE]" not in line
                if line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    assert chunk.get("usage") is None
                    tokens.extend(c["delta"].get("content", "") for c in chunk["choices"])

    with pytest.raises(httpx.RemoteProtocolError):
        read_stream()
    assert [t for t in tokens if t] == ["tok0 ", "tok1 ", "tok2 "]
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/chat/completions", json={**chat_body(), "model": "m:cut-after-0"})
    stats = up.stats()
    assert (stats.streams_cut, stats.connections_cut, stats.streams_completed) == (1, 2, 0)
    assert stats.streams_cancelled == 0
    assert client.post("/chat/completions", json=chat_body()).status_code == 200


def test_slow_stream_and_no_usage(client: httpx.Client) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True}, max_tokens=3)
    started = time.monotonic()
    headers = {"x-fake-mode": "slow-stream-40,no-usage"}
    with client.stream("POST", "/chat/completions", json=body, headers=headers) as r:
        events = sse_events(r)
    assert time.monotonic() - started >= 0.12
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert len(events) == 1 + 3 + 1 + 1
    data = client.post("/chat/completions", json={**chat_body(), "model": "no-usage"}).json()
    assert "usage" not in data
    data = client.post("/embeddings", json={"input": "a", "model": "no-usage"}).json()
    assert "usage" not in data


def test_client_disconnect_is_counted(up: FakeUpstream, client: httpx.Client) -> None:
    body = chat_body(stream=True)
    headers = {"x-fake-mode": "slow-stream-100"}
    with client.stream("POST", "/chat/completions", json=body, headers=headers) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"tok' in line:
                seen += 1
                if seen == 3:
                    break
    stats = up.wait_for(lambda s: s.streams_cancelled == 1)
    assert stats.cancelled_stream_tokens == [3]
    assert (stats.streams_started, stats.streams_completed, stats.requests_cancelled) == (1, 0, 1)
    assert stats.in_flight == 0


def test_hang_until_client_gives_up(up: FakeUpstream, client: httpx.Client) -> None:
    with pytest.raises(httpx.ReadTimeout):
        client.post("/chat/completions", json={**chat_body(), "model": "hang"}, timeout=0.2)
    stats = up.wait_for(lambda s: s.requests_cancelled == 1)
    assert stats.responses == {}
    assert stats.streams_started == 0


def test_latency_at_start_and_runtime() -> None:
    with (
        run_upstream(latency_ms=100) as up,
        httpx.Client(base_url=up.api_base, timeout=5, verify=False) as client,
    ):
        started = time.monotonic()
        assert client.get("/models").status_code == 200
        assert time.monotonic() - started >= 0.1
        up.configure(latency_ms=0)
        started = time.monotonic()
        client.get("/models")
        assert time.monotonic() - started < 0.1
        client.post(f"{up.base_url}/_config", json={"latency_ms": 50}).raise_for_status()
        assert up.config.latency_ms == 50
        started = time.monotonic()
        client.get("/models", headers={"x-fake-mode": "latency-0"})
        assert time.monotonic() - started < 0.04
        started = time.monotonic()
        client.get("/models")
        assert time.monotonic() - started >= 0.05


# --------------------------------------------------------------------------- auth, admin, HTTP


def test_auth(up: FakeUpstream) -> None:
    with httpx.Client(base_url=up.api_base, timeout=5, verify=False) as anon:
        r = anon.post("/chat/completions", json=chat_body())
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        wrong = {"authorization": "Bearer nope"}
        assert anon.get("/models", headers=wrong).status_code == 401
        assert anon.get("/models", headers=AUTH).status_code == 200
        # Admin endpoints need no key.
        assert anon.get(f"{up.base_url}/_stats").status_code == 200
        up.configure(api_key=None)
        assert anon.get("/models").status_code == 200


def test_stats_and_reset_over_http(up: FakeUpstream, client: httpx.Client) -> None:
    client.post("/chat/completions", json=chat_body(max_tokens=2))
    client.get("/nope")
    assert up.stats().connections_total == 1  # keep-alive
    remote = UpstreamStats.from_dict(client.get(f"{up.base_url}/_stats").json())
    assert remote == up.stats()
    assert remote.requests == {"/v1/chat/completions": 1, "/v1/nope": 1}
    assert remote.responses == {200: 1, 404: 1}
    assert (remote.tokens_sent, remote.prompt_tokens) == (2, 4)
    assert client.post(f"{up.base_url}/_reset").json() == {"ok": True}
    assert up.stats() == UpstreamStats()


def test_chunked_request_body_and_pipelining(up: FakeUpstream, client: httpx.Client) -> None:
    payload = json.dumps(chat_body("a b c d e")).encode()

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(payload), 7):
            yield payload[i : i + 7]

    r = client.post("/chat/completions", content=pieces())
    assert r.json()["usage"]["prompt_tokens"] == 6

    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    with socket.create_connection(("127.0.0.1", up.port), timeout=5) as sock:
        sock.sendall(request * 2 + b"GET /_health HTTP/1.1\r\nconnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200 OK") == 3
    assert received.endswith(b'{"ok":true}')


def test_stop_with_a_stream_open() -> None:
    payload = json.dumps(chat_body(stream=True)).encode()
    with run_upstream(token_delay_ms=1000) as up:
        sock = socket.create_connection(("127.0.0.1", up.port), timeout=5)
        head = f"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: {len(payload)}\r\n\r\n"
        sock.sendall(head.encode() + payload)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        up.wait_for(lambda s: s.streams_started == 1)
    with sock, contextlib.suppress(ConnectionResetError):
        while sock.recv(65536):  # the server closed it (EOF or reset), no timeout
            pass
    assert up.stats().streams_cancelled == 1


# --------------------------------------------------------------------------- openai SDK


def test_openai_sdk(up: FakeUpstream) -> None:
    openai = pytest.importorskip("openai")

    def sdk_client(key: str) -> Any:
        http = httpx.Client(verify=False)  # skips loading CA certificates: plain HTTP anyway
        return openai.OpenAI(base_url=up.api_base, api_key=key, max_retries=0, http_client=http)

    with sdk_client(KEY) as sdk:
        done = sdk.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi there"}], max_tokens=3
        )
        assert done.choices[0].message.content == "tok0 tok1 tok2"
        assert done.choices[0].finish_reason == "length"
        assert done.usage is not None
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 3)

        stream = sdk.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "hi there"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text = ""
        usage = None
        for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
            usage = chunk.usage or usage
        assert text == "".join(f"tok{i} " for i in range(16))
        assert usage is not None
        assert usage.total_tokens == 3 + 16

        emb = sdk.embeddings.create(model="emb", input=["a b", "c"], dimensions=4)
        assert [list(d.embedding) for d in emb.data] == [
            fake_embedding("a b", 4),
            fake_embedding("c", 4),
        ]
        assert emb.usage.prompt_tokens == 3
        emb = sdk.embeddings.create(model="emb", input="a b", encoding_format="float")
        assert list(emb.data[0].embedding) == fake_embedding("a b", 8)

        assert [m.id for m in sdk.models.list()] == ["fake-model", "long-model"]

        with pytest.raises(openai.InternalServerError):
            sdk.chat.completions.create(
                model="fail-500", messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(openai.BadRequestError):
            sdk.chat.completions.create(
                model="fail-400", messages=[{"role": "user", "content": "x"}]
            )
    with (
        sdk_client("wrong") as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()


# --------------------------------------------------------------------------- subprocess


def test_standalone_process() -> None:
    with (
        spawn_upstream("--answer-tokens", "5", latency_ms=1, api_key="k") as proc,
        httpx.Client(verify=False) as client,
    ):
        r = client.post(
            f"{proc.api_base}/chat/completions",
            json=chat_body(),
            headers={"authorization": "Bearer k"},
        )
        assert r.json()["usage"]["completion_tokens"] == 5
        stats = proc.wait_for(lambda s: s.requests_total == 1)
        assert stats.last_request_body == chat_body()
        proc.configure(latency_ms=0)
        proc.reset()
        stats = proc.stats()
        assert (stats.requests, stats.responses, stats.last_request_body) == ({}, {}, None)
    assert proc.proc.returncode == 0
