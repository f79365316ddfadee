"""Per-key limits shared by every worker and host through Redis (issue 17, item 3).

Against real services only: the Redis at ``UBC_TEST_REDIS_URL`` (default the local one,
each test in a namespace of its own), Redis servers the tests start and stop on free
ports, limiters in separate OS processes, and ``ubc serve`` processes on one database.

Where a window must stand still, the limiters read a frozen clock (their ``clock``):
with the wall clock, a bucket of 10 requests per minute gains one every 6 seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import REGISTRY

from tests.conftest import LiveServer, _free_port, answers, make_data_dir, run_server
from tests.upstream import run_upstream
from ubc.client import UbcClient, api_key_hash
from ubc.gateway.ratelimit import Limit, RateLimited, RateLimiter
from ubc.gateway.ratelimit_redis import SharedRateLimiter
from ubc.signing import generate_signing_key, load_signing_key

REDIS_URL = os.environ.get("UBC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FROZEN = 1_000_000.0  # the limiters' time where it must not move

MODELS_TOML = """
[models."chat-small"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake-chat"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 2000
max_output_tokens = 64
"""


@pytest.fixture
def redis_url() -> str:
    """The shared Redis (skipped with a message when it cannot be reached)."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis at {REDIS_URL} unreachable ({exc}); set UBC_TEST_REDIS_URL")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A namespace of this test's own; its keys are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex}"
    yield name
    with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
        for key in client.scan_iter(f"ubc:{name}:*"):
            client.delete(key)


def keys_of(url: str, namespace: str) -> dict[str, dict[str, str]]:
    """Every key of ``namespace`` in the Redis at ``url`` with its hash's fields."""
    with contextlib.closing(redis.Redis.from_url(url, decode_responses=True)) as client:
        return {key: client.hgetall(key) for key in client.scan_iter(f"ubc:{namespace}:*")}


# --- a Redis of the test's own ------------------------------------------------------------


@dataclass
class RedisServer:
    """``redis-server`` on a free port, nothing persisted; stopped and started again on
    the same port by the test."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        with contextlib.closing(redis.Redis(port=self.port, socket_connect_timeout=0.2)) as c:
            while True:
                try:
                    c.ping()
                    return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise AssertionError("redis-server did not start") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary")
    server = RedisServer(_free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.stop()


# --- (a) limiters in three OS processes ---------------------------------------------------


def _take_in_a_process(
    url: str,
    namespace: str,
    limits: list[Limit],
    tokens: int,
    takes: int,
    start: Any,
    results: Any,
) -> None:
    """A process with its own limiter: ``takes`` concurrent takes once every process is
    ready; puts each take's Retry-After (0: admitted) on ``results``."""

    async def main() -> list[int]:
        limiter = SharedRateLimiter(url, namespace, RateLimiter(), clock=lambda: FROZEN)
        await limiter.start()
        start.wait()

        async def take() -> int:
            try:
                await limiter.acquire(limits, tokens)
            except RateLimited as exc:
                return exc.retry_after
            return 0

        outcomes = await asyncio.gather(*(take() for _ in range(takes)))
        await limiter.aclose()
        return outcomes

    results.put(asyncio.run(main()))


def take_across_processes(
    url: str, namespace: str, limits: list[Limit], tokens: int, takes: int
) -> tuple[int, int]:
    """(admitted, refused with a Retry-After of at least 1 s) of ``takes`` takes in each
    of three processes at once."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    results = context.Queue()
    processes = [
        context.Process(
            target=_take_in_a_process,
            args=(url, namespace, limits, tokens, takes, start, results),
        )
        for _ in range(3)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=60) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=30)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    results.close()
    results.join_thread()
    waits = [wait for outcome in outcomes for wait in outcome]
    assert len(waits) == 3 * takes
    return waits.count(0), sum(wait >= 1 for wait in waits)


def test_three_processes_admit_exactly_the_rpm(redis_url: str, namespace: str) -> None:
    limits = [Limit("key:" + "ab" * 32, 10, None)]
    assert take_across_processes(redis_url, namespace, limits, 5, 12) == (10, 26)
    [(key, bucket)] = keys_of(redis_url, namespace).items()
    assert key == f"ubc:{namespace}:ratelimit:key:{'ab' * 32}:requests"
    assert (bucket["c"], float(bucket["l"])) == ("10", 0.0)


def test_three_processes_admit_exactly_the_tpm(redis_url: str, namespace: str) -> None:
    limits = [Limit("key:k", None, 1000)]
    # 70 tokens a call: 14 calls fit in 1,000 (980), the 15th would not.
    assert take_across_processes(redis_url, namespace, limits, 70, 10) == (14, 16)


def test_a_take_is_all_or_nothing_across_the_keys_and_the_models_limits(
    redis_url: str, namespace: str
) -> None:
    # The model's 500 tokens run out first: the key's buckets lose only what passed.
    limits = [Limit("key:k", 100, 1000), Limit("key:k:m", None, 500)]
    assert take_across_processes(redis_url, namespace, limits, 70, 6) == (7, 11)
    levels = {
        key.rsplit(":", 2)[-2] + ":" + key.rsplit(":", 1)[-1]: float(fields["l"])
        for key, fields in keys_of(redis_url, namespace).items()
    }
    assert levels == {"k:requests": 93.0, "k:tokens": 510.0, "m:tokens": 10.0}


# --- the same answers as the process's own buckets -----------------------------------------


def test_headers_and_refusals_are_those_of_the_in_process_buckets(
    redis_url: str, namespace: str
) -> None:
    """One script of takes, refunds and time, on both limiters: the same headers, the
    same 429s (message, Retry-After, headers), the same levels."""
    now = [FROZEN]
    local = RateLimiter(clock=lambda: now[0])
    key = [Limit("key:k", 3, 1000)]
    both = [Limit("key:k", 3, 1000), Limit("key:k:m", 2, 300)]
    steps: list[tuple[str, list[Limit], float]] = [
        ("take", key, 100),
        ("take", both, 250),
        ("refund", both, 120),
        ("take", both, 200),  # the model's tokens: 170 left
        ("wait", [], 7.5),
        ("take", both, 50),
        ("take", key, 5000),  # more than the bucket: waits for a full bucket
        ("wait", [], 61.0),
        ("take", key, 5000),  # a full bucket, overdrawn
        ("take", key, 1),
        ("wait", [], 0.02),
        ("take", both, 1),
        ("take", [Limit("key:k", 4, None)], 10),  # a new capacity: a new bucket
    ]

    async def run() -> list[object]:
        shared = SharedRateLimiter(redis_url, namespace, RateLimiter(), clock=lambda: now[0])
        seen: list[object] = []
        try:
            for step, limits, amount in steps:
                if step == "wait":
                    now[0] += amount
                    continue
                if step == "refund":
                    local.refund(limits, int(amount))
                    shared.refund(limits, int(amount))
                    await asyncio.wait(list(shared._pending))
                    continue
                answers = []
                for limiter in (local, shared):
                    try:
                        result = limiter.acquire(limits, int(amount))
                        if not isinstance(result, dict):
                            result = await result
                        answers.append(("ok", result))
                    except RateLimited as exc:
                        answers.append(("429", str(exc), exc.retry_after, exc.headers))
                assert answers[0] == answers[1], (step, amount)
                seen.append(answers[0])
        finally:
            await shared.aclose()
        return seen

    seen = asyncio.run(run())
    kinds = [answer[0] for answer in seen]  # type: ignore[index]
    assert kinds == ["ok", "ok", "429", "ok", "429", "ok", "429", "429", "ok"], seen
    assert seen[0] == (
        "ok",
        {
            "x-ratelimit-limit-requests": "3",
            "x-ratelimit-remaining-requests": "2",
            "x-ratelimit-reset-requests": "20s",
            "x-ratelimit-limit-tokens": "1000",
            "x-ratelimit-remaining-tokens": "900",
            "x-ratelimit-reset-tokens": "6s",
        },
    )


# --- (b) three `ubc serve` processes ------------------------------------------------------


def _serve(port: int, environment: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", "from ubc.cli import main; main()", "serve"]
            + ["--port", str(port)],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    if answers(process, f"http://127.0.0.1:{port}", "/healthz"):
        return process
    process.kill()
    raise AssertionError("the server did not start")


def test_three_servers_share_one_keys_rpm(
    db_url: str, tmp_path: Path, redis_url: str, namespace: str
) -> None:
    rpm = 10
    origin = f"test.ubc/{namespace}"  # the limits' namespace is the ledger's origin
    with run_upstream(api_key="sk-upstream") as upstream:
        models = tmp_path / "models.toml"
        models.write_text(MODELS_TOML.format(api_base=upstream.api_base))
        data = make_data_dir(tmp_path / "data")
        environment = {
            **os.environ,
            "UBC_DATABASE_URL": db_url,
            "UBC_DATA_DIR": str(data),
            "UBC_MODELS_FILE": str(models),
            "UBC_ORIGIN": origin,
            "UBC_REDIS_URL": redis_url,
            "UBC_TEST_UPSTREAM_KEY": "sk-upstream",
        }
        ports = [_free_port() for _ in range(3)]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        logs = [tmp_path / f"serve-{port}.log" for port in ports]
        # The first one writes the genesis.
        processes = [_serve(ports[0], environment, logs[0])]
        try:
            processes += [
                _serve(p, environment, log) for p, log in zip(ports[1:], logs[1:], strict=True)
            ]
            with (
                UbcClient(
                    urls[0],
                    key=load_signing_key(data / "operator.key"),
                    token=(data / "operator.token").read_text().strip(),
                ) as operator,
                UbcClient(urls[0], key=generate_signing_key()) as member,
            ):
                member.register("alice")
                operator.admit("alice", "basic")
                operator.deposit("alice", 100_000, external_ref="seed")
                secret, _ = member.grant_api_key("sdk", rpm=rpm)

            async def hammer() -> list[httpx.Response]:
                async with httpx.AsyncClient(timeout=60) as http:
                    return await asyncio.gather(
                        *(
                            http.post(
                                f"{urls[i % 3]}/v1/chat/completions",
                                headers={"authorization": f"Bearer {secret}"},
                                json={
                                    "model": "chat-small",
                                    "messages": [{"role": "user", "content": "hi"}],
                                    "max_tokens": 1,
                                },
                            )
                            for i in range(3 * rpm)
                        )
                    )

            began = time.monotonic()
            answers = asyncio.run(hammer())
            # Then each server, whatever share of the burst it admitted, refuses.
            after = [
                httpx.post(
                    f"{url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {secret}"},
                    json={"model": "chat-small", "messages": [{"role": "user", "content": "hi"}]},
                    timeout=60,
                ).status_code
                for url in urls
            ]
            elapsed = time.monotonic() - began
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=30)
    statuses = sorted(answer.status_code for answer in answers)
    logged = "\n".join(log.read_text() for log in logs)
    assert "cannot be reached" not in logged, logged
    # The bucket gains one request every 60/rpm s: exactly rpm while the burst is shorter.
    assert elapsed < 60 / rpm, f"the burst took {elapsed:.1f} s: too slow to count exactly"
    assert statuses == [200] * rpm + [429] * (2 * rpm), statuses
    for answer in answers:
        assert answer.headers["x-ratelimit-limit-requests"] == str(rpm)
        if answer.status_code == 429:
            assert int(answer.headers["retry-after"]) >= 1
            assert answer.json()["error"]["code"] == "rate_limit_exceeded"
    assert after == [429, 429, 429]
    # In Redis: the key's hash under the ledger's origin, never the key itself.
    keys = keys_of(redis_url, origin)
    assert list(keys) == [f"ubc:{origin}:ratelimit:key:{api_key_hash(secret)}:requests"]
    assert secret not in repr(keys)
    with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
        client.delete(*keys)


# --- (c) Redis stopped and started again mid-run ------------------------------------------


def _fallbacks() -> float:
    return REGISTRY.get_sample_value("ubc_ratelimit_redis_fallbacks_total") or 0.0


def _redis_up() -> float | None:
    return REGISTRY.get_sample_value("ubc_ratelimit_redis_up")


def _frozen(server: LiveServer) -> None:
    """The server's buckets, shared and its own, stand still."""
    gateway = server.app.state.gateway
    gateway.shared_limiter.clock = lambda: FROZEN
    gateway.limiter._clock = lambda: FROZEN


def test_a_redis_outage_falls_back_to_per_process_limits_and_recovers(
    db_url: str,
    tmp_path: Path,
    own_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rpm = 4
    monkeypatch.setenv("UBC_TEST_UPSTREAM_KEY", "sk-upstream")
    caplog.set_level(logging.WARNING, logger="ubc.gateway")
    with run_upstream(api_key="sk-upstream") as upstream:
        models = tmp_path / "models.toml"
        models.write_text(MODELS_TOML.format(api_base=upstream.api_base))
        data = make_data_dir(tmp_path / "data")
        settings = {"models_file": models, "redis_url": own_redis.url}
        with (
            run_server(db_url, data, **settings) as a,
            run_server(db_url, data, **settings) as b,
            UbcClient(a.url, key=a.operator_key, token=a.operator_token) as operator,
            UbcClient(a.url, key=generate_signing_key()) as member,
            httpx.Client(timeout=30) as http,
        ):
            _frozen(a)
            _frozen(b)
            member.register("alice")
            operator.admit("alice", "basic")
            operator.deposit("alice", 100_000, external_ref="seed")
            secret, _ = member.grant_api_key("sdk", rpm=rpm)

            def call(server: LiveServer) -> int:
                answer = http.post(
                    f"{server.url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {secret}"},
                    json={
                        "model": "chat-small",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 1,
                    },
                )
                assert answer.status_code in (200, 429), answer.text
                return answer.status_code

            # Shared: the two servers draw from one bucket of 4.
            assert [call(a), call(b), call(a), call(b), call(a), call(b)] == [200] * 4 + [429] * 2
            assert _redis_up() == 1.0
            before = _fallbacks()

            own_redis.stop()
            # Each server on its own buckets: 4 each, then 429; nothing fails.
            for server in (a, b):
                assert [call(server) for _ in range(rpm + 1)] == [200] * rpm + [429]
            assert _fallbacks() - before == 2 * (rpm + 1)
            assert _redis_up() == 0.0
            down = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
            assert len(down) == 2  # once per server, not once per call

            own_redis.start()  # empty: nothing was persisted
            # Each server tries Redis again after its back-off (at most 5 s); until
            # then its own exhausted bucket answers 429; then the shared bucket, full.
            for server in (a, b):
                deadline = time.monotonic() + 15
                while call(server) != 200:
                    assert time.monotonic() < deadline, "Redis was not tried again"
                    time.sleep(0.2)
            assert _redis_up() == 1.0
            # Shared again: what the fresh bucket has left (4 less the two calls that
            # found Redis back, less any take that Redis counted after the call had
            # stopped waiting for it) is admitted once, by either server.
            before = _fallbacks()
            [bucket] = keys_of(own_redis.url, a.app.state.ctx.origin).values()
            left = int(float(bucket["l"]))
            assert 0 <= left <= rpm - 2
            answers = [call(server) for server in (a, b) * 3]
            assert answers == [200] * left + [429] * (6 - left)
            assert _fallbacks() == before
            back = [r for r in caplog.records if "shared again" in r.getMessage()]
            assert len(back) == 2
            [key] = keys_of(own_redis.url, a.app.state.ctx.origin)
            assert key.endswith(f"key:{api_key_hash(secret)}:requests")


def test_a_redis_that_does_not_answer_is_not_waited_for(own_redis: RedisServer) -> None:
    """A Redis that accepts connections and answers nothing (stopped with SIGSTOP): the
    call falls back after the timeout (tens of ms), the next ones at once; it answers
    again, it is used again after the back-off."""
    assert own_redis.process is not None
    limits = [Limit("key:k", 2, None)]

    async def run() -> None:
        limiter = SharedRateLimiter(
            own_redis.url, "slow", RateLimiter(), clock=lambda: FROZEN, backoff=(0.2, 0.2)
        )
        await limiter.start()
        try:
            await limiter.acquire(limits, 1)  # through Redis: 1 request left there
            before = _fallbacks()
            own_redis.process.send_signal(signal.SIGSTOP)
            try:
                began = time.monotonic()
                await limiter.acquire(limits, 1)  # the process's own bucket: 1 left
                first = time.monotonic() - began
                began = time.monotonic()
                await limiter.acquire(limits, 1)
                with pytest.raises(RateLimited):
                    await limiter.acquire(limits, 1)
                then = time.monotonic() - began
            finally:
                own_redis.process.send_signal(signal.SIGCONT)
            assert first < 0.5, first
            assert then < 0.05, then
            assert _fallbacks() - before == 3
            assert _redis_up() == 0.0
            await asyncio.sleep(0.3)  # the back-off
            # Redis ran the take it received while stopped once it went on (the call
            # had been answered by the process): its last request is gone too.
            with pytest.raises(RateLimited):
                await limiter.acquire(limits, 1)
            assert _redis_up() == 1.0
            assert _fallbacks() - before == 3
            [bucket] = keys_of(own_redis.url, "slow").values()
            assert float(bucket["l"]) == 0.0
        finally:
            await limiter.aclose()

    asyncio.run(run())
