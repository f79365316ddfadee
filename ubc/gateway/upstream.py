"""Clients of OpenAI-compatible upstream servers: one pooled httpx client per upstream."""

from __future__ import annotations

import httpx

from ubc.gateway.catalog import ModelSpec


class UpstreamPool:
    """Connection reuse across calls: keep-alive connections per upstream base URL."""

    def __init__(self, *, max_connections: int = 1000, connect_timeout: float = 10.0) -> None:
        self._clients: dict[tuple[str, str | None, int], httpx.AsyncClient] = {}
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._connect_timeout = connect_timeout

    def client(self, spec: ModelSpec) -> httpx.AsyncClient:
        assert spec.url is not None
        key = (spec.url, spec.api_key, spec.timeout_seconds)
        client = self._clients.get(key)
        if client is None:
            headers = {"authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
            client = self._clients[key] = httpx.AsyncClient(
                base_url=spec.url,
                headers=headers,
                limits=self._limits,
                timeout=httpx.Timeout(spec.timeout_seconds, connect=self._connect_timeout),
            )
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
