"""Issue 12 on the metered model endpoint: no free CPU from an empty account, caps on
embedding input, only counted chat fields forwarded, and a hold released at once on any
exception of an upstream call.

Uses the served ledger and loopback upstream of ``tests/test_gateway.py`` (SQLite and
PostgreSQL); ``chat-small`` costs ``input + 2 × output`` CU, the local embedding model
1 CU per 1K tokens.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_gateway import Env, balance, serve_gateway
from ubc.gateway.local import LocalEmbedder
from ubc.gateway.service import Gateway, prompt_bound

LONG_TEXT = ("compute for everyone, " * 2400)[:50_000]  # 50 KB, far more than 256 tokens


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """The served ledger and upstream of tests/test_gateway.py."""
    with serve_gateway(db_url, tmp_path, monkeypatch) as made:
        yield made


def post(env: Env, path: str, secret: str, body: dict[str, Any] | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{env.server.url}/v1{path}",
        headers={"authorization": f"Bearer {secret}", "content-type": "application/json"},
        content=content,
        timeout=60,
    )


def gateway_of(env: Env) -> Gateway:
    gateway: Gateway = env.server.app.state.gateway
    return gateway


def released_at_once(env: Env, member: Any) -> dict[str, int]:
    """The member's balance once the call's release is written: within a few seconds,
    far less than the hold's timeout (600 s)."""
    deadline = time.monotonic() + 5
    while True:
        row = balance(member)
        if row["pending_debits"] == 0 and not gateway_of(env)._settling:
            return row
        assert time.monotonic() < deadline, f"the hold is still pending: {row}"
        time.sleep(0.05)


class Tokenizing:
    """Records every call of ``LocalEmbedder.encode`` in the served process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> None:
        self.calls = 0
        self.threads: set[str] = set()
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self._lock = threading.Lock()
        # (Absent before issue 12's fix: then the test fails on its timing instead.)
        original: Callable[[LocalEmbedder, Sequence[str]], list[list[int]]] | None = getattr(
            LocalEmbedder, "encode", None
        )

        def encode(embedder: LocalEmbedder, texts: Sequence[str]) -> list[list[int]]:
            tag = texts[0][:8] if texts else ""
            with self._lock:
                self.calls += 1
                self.threads.add(threading.current_thread().name)
                self.running[tag] = self.running.get(tag, 0) + 1
                self.running["*"] = self.running.get("*", 0) + 1
                for key in (tag, "*"):
                    self.most[key] = max(self.most.get(key, 0), self.running[key])
            try:
                time.sleep(delay)
                assert original is not None
                return original(embedder, texts)
            finally:
                with self._lock:
                    self.running[tag] -= 1
                    self.running["*"] -= 1

        monkeypatch.setattr(LocalEmbedder, "encode", encode, raising=False)


# -- free CPU from an empty account ------------------------------------------------------


def test_an_empty_accounts_huge_embeddings_request_is_refused_at_once(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """160 inputs of 50 KB (8 MB, under the caps) from a key with 0 CU: 402 before any
    tokenizing (which took seconds before the fix)."""
    member, secret = env.member("alice", 0)
    tokenizing = Tokenizing(monkeypatch)
    body = json.dumps({"model": "all-minilm-l6-v2", "input": [LONG_TEXT] * 160}).encode()
    started = time.perf_counter()
    response = post(env, "/embeddings", secret, body)
    elapsed = time.perf_counter() - started
    assert response.status_code == 402, response.text
    assert response.json()["error"]["code"] == "insufficient_quota"
    assert tokenizing.calls == 0  # the proof: refused before any tokenizing
    # And in about the time the 8 MB take to arrive and be parsed (tokenizing them took
    # seconds more before the fix; a fresh CI clone once needed 1.3 s for this alone).
    assert elapsed < 5.0
    assert balance(member) == {**balance(member), "posted": 0, "pending_debits": 0}


def test_a_hold_short_of_the_counted_tokens_is_refused_and_released(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 CU pays the least these inputs can cost (2 tokens each), not their 40,960 tokens:
    they are counted (once), refused with 402, and nothing is billed."""
    member, secret = env.member("alice", 1)
    tokenizing = Tokenizing(monkeypatch)
    response = post(
        env, "/embeddings", secret, {"model": "all-minilm-l6-v2", "input": [LONG_TEXT] * 160}
    )
    assert response.status_code == 402, response.text
    assert "40960 tokens" in response.json()["error"]["message"]
    assert tokenizing.calls == 1
    assert released_at_once(env, member)["posted"] == 1
    # Affordable inputs are billed their counted tokens, as before.
    ok = post(env, "/embeddings", secret, {"model": "all-minilm-l6-v2", "input": ["a cat"] * 3})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens"] == 12
    env.settled()
    assert balance(member)["posted"] == 0


def test_embedding_input_caps_answer_400_naming_input(env: Env) -> None:
    member, secret = env.member("alice", 1000)
    settings = env.server.settings
    too_many = {"model": "all-minilm-l6-v2", "input": ["a"] * (settings.embedding_max_inputs + 1)}
    too_big = {
        "model": "all-minilm-l6-v2",
        "input": ["ab" * 1024] * (settings.embedding_max_input_bytes // 2048 + 1),
    }
    for model in ("all-minilm-l6-v2", "embed-up"):
        for body in (too_many, too_big):
            response = post(env, "/embeddings", secret, {**body, "model": model})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert (error["param"], error["type"]) == ("input", "invalid_request_error")
    assert env.upstream.stats().requests.get("/v1/embeddings", 0) == 0
    lone = post(env, "/embeddings", secret, b'{"model": "all-minilm-l6-v2", "input": "\\ud800"}')
    assert (lone.status_code, lone.json()["error"]["param"]) == (400, "input")
    assert balance(member) == {**balance(member), "posted": 1000, "pending_debits": 0}


def test_tokenizing_runs_in_the_cpu_pool_one_job_per_key_at_a_time(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, alice = env.member("alice", 1000)
    _, bob = env.member("bob", 1000)
    gateway_of(env).cpu.workers = max(2, gateway_of(env).cpu.workers)
    tokenizing = Tokenizing(monkeypatch, delay=0.3)
    results: list[int] = []

    def call(secret: str, tag: str) -> None:
        body = {"model": "all-minilm-l6-v2", "input": [f"{tag} a short sentence"]}
        results.append(post(env, "/embeddings", secret, body).status_code)

    threads = [
        threading.Thread(target=call, args=(secret, tag))
        for secret, tag in [(alice, "alice-01"), (alice, "alice-01"), (alice, "alice-01")]
        + [(bob, "bobbob01")]
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 4
    assert tokenizing.most["alice-01"] == 1  # gateway_cpu_slots_per_key
    assert tokenizing.most["*"] == 2  # bob's call ran beside alice's
    assert all(name.startswith("ubc-gateway-cpu") for name in tokenizing.threads)


# -- chat: only what is understood and counted is forwarded ------------------------------


def test_chat_refuses_unknown_fields_naming_them_and_holds_nothing(env: Env) -> None:
    member, secret = env.member("alice", 1000)
    base = {"model": "chat-small", "messages": [{"role": "user", "content": "hi"}]}
    for name, value in [
        ("documents", [{"text": "x" * 500_000}]),
        ("chat_template", "{{ messages }}"),
        ("prediction", {"type": "content", "content": "x"}),
        ("guided_json", {"type": "object"}),
    ]:
        response = post(env, "/chat/completions", secret, {**base, name: value})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (name, "unknown_parameter")
    # A field that is not counted must be the small scalar it is.
    for name, value in [("temperature", "x" * 1000), ("stream", "yes"), ("seed", 1.5)]:
        response = post(env, "/chat/completions", secret, {**base, name: value})
        assert (response.status_code, response.json()["error"]["param"]) == (400, name)
    assert env.upstream.stats().requests.get("/v1/chat/completions", 0) == 0
    assert balance(member) == {**balance(member), "posted": 1000, "pending_debits": 0}


def test_every_counted_chat_field_is_held_for(env: Env) -> None:
    """``stop``, ``user``, ``metadata``, ``logit_bias`` and ``tools`` carry text the
    upstream may read: their bytes are in the prompt bound, so in the hold, and the
    answer's length is clamped to what is left."""
    messages = [{"role": "user", "content": "hi"}]
    extra: dict[str, Any] = {
        "stop": ["s" * 100, "t" * 100],
        "user": "u" * 300,
        "metadata": {"note": "m" * 200},
        "logit_bias": {"50256": -100},
        "tools": [{"type": "function", "function": {"name": "f", "description": "d" * 300}}],
    }
    bound = prompt_bound({"messages": messages, **extra})
    assert bound > prompt_bound({"messages": messages}) + 1000
    # Enough for 10 output tokens after the counted fields.
    member, secret = env.member("alice", bound + 2 * 10)
    response = post(
        env,
        "/chat/completions",
        secret,
        {"model": "chat-small", "messages": messages, "max_tokens": 60, **extra},
    )
    assert response.status_code == 200, response.text
    forwarded = env.upstream.stats().last_request_body
    assert forwarded["max_tokens"] == 10
    assert {k: forwarded[k] for k in extra} == extra
    # While a stream runs, the hold is the bound of its counted fields + max_tokens.
    env.settled()
    _, rich = env.member("bob", 100_000)
    body = {"model": "chat-slow", "messages": messages, "max_tokens": 5, "stream": True}
    body["user"] = "u" * 3000
    held = prompt_bound(body) + 2 * 5
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST",
            f"{env.server.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {rich}"},
            json=body,
        ) as stream,
    ):
        for line in stream.iter_lines():
            if '"content":"tok' in line:
                assert balance(env.operator, "member:bob")["pending_debits"] == held
                break
    env.settled()


# -- a hold is released at once on any exception of an upstream call ---------------------


def test_an_unexpected_upstream_exception_answers_502_and_releases_the_hold(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    member, secret = env.member("alice", 1000)
    gateway = gateway_of(env)

    async def broken_post(*_args: Any, **_kwargs: Any) -> tuple[int, bytes]:
        raise RuntimeError("unexpected")

    class BrokenSession:
        def post(self, *_args: Any, **_kwargs: Any) -> Any:
            raise RuntimeError("unexpected")

    monkeypatch.setattr(gateway.upstreams, "post", broken_post)
    monkeypatch.setattr(gateway.upstreams, "session", lambda _spec: BrokenSession())
    messages = [{"role": "user", "content": "hi"}]
    for path, body in [
        ("/chat/completions", {"model": "chat-small", "messages": messages}),
        ("/chat/completions", {"model": "chat-small", "messages": messages, "stream": True}),
        ("/embeddings", {"model": "embed-up", "input": "hello"}),
    ]:
        response = post(env, path, secret, body)
        assert response.status_code == 502, response.text
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("upstream_error", "upstream")
        assert released_at_once(env, member)["posted"] == 1000


def test_an_unexpected_local_model_exception_answers_500_and_releases_the_hold(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    member, secret = env.member("alice", 1000)

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(LocalEmbedder, "embed_ids", broken)
    response = post(env, "/embeddings", secret, {"model": "all-minilm-l6-v2", "input": "x"})
    assert response.status_code == 500, response.text
    assert response.json()["error"]["type"] == "server_error"
    assert released_at_once(env, member)["posted"] == 1000
