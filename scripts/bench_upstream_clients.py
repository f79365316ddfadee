"""Async HTTP clients against the loopback upstream: why the gateway uses aiohttp.

Calls ``POST /v1/chat/completions`` of ``tests/upstream.py`` (its own process, 20 ms
latency) from one event loop at concurrency 1 and 50, with httpx's ``AsyncClient`` and
with aiohttp's ``ClientSession``, and prints calls/s and the client process's CPU per
call. On the 2-core machine of BENCHMARKS.md, at concurrency 50: httpx 152–218 calls/s at
4.5–6.5 ms of CPU a call, aiohttp 2,092–2,228 calls/s at 0.35–0.4 ms (two runs).

    python scripts/bench_upstream_clients.py
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.upstream import spawn_upstream  # noqa: E402

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(call: Callable[[], Awaitable[None]], concurrency: int, calls: int) -> str:
    async def worker() -> None:
        for _ in range(calls // concurrency):
            await call()

    await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm-up
    cpu, start = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed, used = time.perf_counter() - start, cpu_seconds() - cpu
    return f"c={concurrency}: {calls / elapsed:,.0f} calls/s, {used / calls * 1000:.3f} ms CPU/call"


async def with_httpx(base: str, concurrency: int, calls: int) -> str:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=base, limits=limits) as client:

        async def call() -> None:
            (await client.post("/v1/chat/completions", json=BODY)).json()

        return await measure(call, concurrency, calls)


async def with_aiohttp(base: str, concurrency: int, calls: int) -> str:
    connector = aiohttp.TCPConnector(limit=1000)
    async with aiohttp.ClientSession(base_url=base, connector=connector) as session:

        async def call() -> None:
            async with session.post("/v1/chat/completions", json=BODY) as response:
                await response.json()

        return await measure(call, concurrency, calls)


def main() -> None:
    with spawn_upstream(latency_ms=20) as upstream:
        for name, run in (("httpx", with_httpx), ("aiohttp", with_aiohttp)):
            for concurrency, calls in ((1, 100), (50, 2000)):
                print(name, asyncio.run(run(upstream.base_url, concurrency, calls)))


if __name__ == "__main__":
    main()
