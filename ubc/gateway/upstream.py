"""Clients of OpenAI-compatible upstream servers: one pooled aiohttp session per upstream.

aiohttp rather than httpx on this path: on a 2-core machine, against the loopback
upstream at 20 ms, httpx's async client topped out at 150–220 calls/s at 4.5–6.5 ms of CPU
a call (its connection pool scans every connection per request), aiohttp did 2,100–2,200
calls/s at 0.35–0.4 ms (``scripts/bench_upstream_clients.py``). httpx stays the
synchronous client of ``ubc.client``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from ubc import logs, metrics
from ubc.gateway.catalog import ModelSpec

#: What a failed upstream call raises: connection errors, cut streams, timeouts.
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class UpstreamPool:
    """Connection reuse across calls: keep-alive connections per upstream base URL."""

    def __init__(self, *, max_connections: int = 1000, connect_timeout: float = 10.0) -> None:
        self._sessions: dict[tuple[str, str | None, int], aiohttp.ClientSession] = {}
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout

    def session(self, spec: ModelSpec) -> aiohttp.ClientSession:
        """The session of ``spec``'s upstream (made on first use, in the running loop)."""
        assert spec.url is not None
        key = (spec.url, spec.api_key, spec.timeout_seconds)
        session = self._sessions.get(key)
        if session is None or session.closed:
            headers = {"authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
            session = self._sessions[key] = aiohttp.ClientSession(
                headers=headers,
                connector=aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300),
                # No total limit (streams last); a stalled connect or read fails the call.
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self._connect_timeout,
                    sock_read=spec.timeout_seconds,
                ),
                raise_for_status=False,
                auto_decompress=True,
            )
        return session

    def url(self, spec: ModelSpec, path: str) -> str:
        assert spec.url is not None
        return f"{spec.url}{path}"

    def headers(self) -> dict[str, str] | None:
        """The headers of a call made for the request being served: its id, which the
        upstream's logs can then name too."""
        request_id = logs.current_request_id()
        return None if request_id is None else {"x-request-id": request_id}

    async def post(self, spec: ModelSpec, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """POST ``body`` as JSON; the status and the whole answer."""
        started = time.perf_counter()
        url = self.url(spec, path)
        async with self.session(spec).post(url, json=body, headers=self.headers()) as response:
            content = await response.read()
        metrics.UPSTREAM_SECONDS.labels(spec.id).observe(time.perf_counter() - started)
        return response.status, content

    async def aclose(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
