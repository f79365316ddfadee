"""Per-key limits shared by every worker and host through Redis (``UBC_REDIS_URL``).

The buckets are those of :mod:`ubc.gateway.ratelimit` (one of requests and one of tokens
per scope, refilled continuously at the limit per minute, a call taking one request and
its token estimate and getting back what it did not use), kept in Redis instead of in
the process, so that N processes on any number of hosts share one key's ``rpm`` and
``tpm``. A call's take is one Lua script: every bucket of the call (the key's and the
model's, requests and tokens) is refilled and checked, and either all of them are taken
from or none (a 429 takes nothing), in one round trip. The time is the Redis server's
(``TIME``), one clock for every host. The answer is the buckets' levels, from which the
same ``x-ratelimit-*`` headers and the same 429 with ``Retry-After`` are made as in one
process.

Why a script and not the ``limits`` library: its strategies check one limit at a time
(a call has up to four: requests and tokens of the key and of the model, which must be
taken all or nothing), cannot give back tokens a call reserved but did not use, and its
moving window stores one list entry per unit of cost (a call of 4,000 tokens would push
4,000 entries). Its windows would also change what clients see: a window empties all at
once where a bucket refills a little every second, and ``reset`` would be the window's
end rather than the time until the bucket is full. The script keeps today's semantics
exactly, and a bucket is three fields of one hash that expires once it is full again.

Keys: ``ubc:<namespace>:ratelimit:<scope>:<kind>``, the namespace being the ledger's
origin (two ledgers sharing a Redis never share a bucket) and the scope the gateway's
(``key:<SHA-256 of the API key>[:<model>]``: never the key itself). One Redis server
(with replicas or Sentinel if wanted), not Redis Cluster: the keys of one call are not
given a common hash slot.

When Redis cannot be reached (refused, no connection within 250 ms, or no answer within
``timeout``, 50 ms by default) the call is limited by the process's own buckets, as
without Redis; the outage is logged once when it starts and once when it ends, every such
call counts in ``ubc_ratelimit_redis_fallbacks_total`` and ``ubc_ratelimit_redis_up``
reads 0. While Redis is down it is tried again by one call at a time after a back-off
(0.5 s, doubling up to 5 s), so that a dead Redis adds no latency to the others. Two
approximations, both at the edges of an outage: a take that timed out may still be run
by Redis when it answers late (the shared buckets are then charged for a call the
process judged: stricter, never looser), and tokens given back go where the limits are
kept at that moment, which is not always where they were taken.

The path without Redis is untouched: the gateway calls :class:`RateLimiter` as before
and awaits nothing more. With ``UBC_REDIS_URL`` the take is awaited: one round trip, during
which the event loop serves other requests; a give-back runs as a background task.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ubc.gateway.ratelimit import Limit, RateLimited, RateLimiter, _Bucket, _headers

log = logging.getLogger("ubc.gateway")

_Reply = list[int | bytes]

FALLBACKS = Counter(
    "ubc_ratelimit_redis_fallbacks_total",
    "Model calls whose rate limits were checked by the serving process alone because "
    "Redis (UBC_REDIS_URL) could not be reached",
)
REDIS_UP = Gauge(
    "ubc_ratelimit_redis_up",
    "1 when the last round trip to Redis for shared rate limits succeeded, else 0 "
    "(also 0 when UBC_REDIS_URL is not set)",
    multiprocess_mode="livemin",
)

# KEYS: the buckets (hashes: c capacity, l level, t stamp in seconds).
# ARGV[1]: the time in seconds, or '' for the Redis server's clock; ARGV[2]: 'take' (all
# or nothing) or 'refund' (give back, up to the capacity); then per key its capacity and
# the amount to take or give back.
# Answer: {1 if taken (or given back) else 0, then each bucket's level before the take,
# refilled to now, as a string (a Lua number would be cut to an integer)}.
_SCRIPT = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local take = ARGV[2] == 'take'
local levels, capacities, amounts = {}, {}, {}
local fits = 1
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[1 + 2 * i])
  local amount = tonumber(ARGV[2 + 2 * i])
  local state = redis.call('HMGET', key, 'c', 'l', 't')
  local level = capacity
  if state[1] and tonumber(state[1]) == capacity then
    local elapsed = math.max(0, now - tonumber(state[3]))
    level = math.min(capacity, tonumber(state[2]) + elapsed * capacity / 60)
  end
  levels[i], capacities[i], amounts[i] = level, capacity, amount
  if take and math.min(amount, capacity) - level > 0 then
    fits = 0
  end
end
local answer = {fits}
for i, key in ipairs(KEYS) do
  answer[i + 1] = string.format('%.17g', levels[i])
  if fits == 1 then
    local level
    if take then
      level = levels[i] - amounts[i]
    else
      level = math.min(capacities[i], levels[i] + amounts[i])
    end
    redis.call('HSET', key, 'c', capacities[i], 'l', string.format('%.17g', level),
               't', string.format('%.17g', now))
    -- Once full again the bucket is as good as absent.
    local full_in = (capacities[i] - level) * 60000 / capacities[i]
    redis.call('PEXPIRE', key, math.ceil(full_in) + 1000)
  end
end
return answer
"""


def _redacted(url: str) -> str:
    """The URL without its credentials, for the logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class SharedRateLimiter:
    """The buckets of :class:`RateLimiter` in Redis, with ``local`` (the process's own
    limiter) standing in while Redis cannot be reached."""

    def __init__(
        self,
        url: str,
        namespace: str,
        local: RateLimiter,
        *,
        timeout: float = 0.05,
        connect_timeout: float = 0.25,
        backoff: tuple[float, float] = (0.5, 5.0),
        clock: Callable[[], float] | None = None,
        connections: int = 64,
    ) -> None:
        self.local = local
        self._where = _redacted(url)
        self._prefix = f"ubc:{namespace}:ratelimit:"
        self._timeout = timeout + connect_timeout  # a whole round trip, connecting included
        self._backoff_first, self._backoff_max = backoff
        self._backoff = self._backoff_first
        #: The buckets' time in seconds (tests); None: the Redis server's clock.
        self.clock = clock
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            # A new connection in a burst of them waits for the event loop as well.
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),  # redis-py's default retries for seconds
            max_connections=connections,
        )
        # Round trips at once: more wait here (not as errors of a full pool), and look
        # again whether Redis is still up once their turn comes.
        self._slots = asyncio.Semaphore(connections)
        self._script = self._redis.register_script(_SCRIPT)
        self._up = True  # until shown otherwise: the first failure is logged
        self._retry_at = 0.0  # monotonic; while down, Redis is not tried before this
        self._pending: set[asyncio.Task[_Reply | None]] = set()

    # -- the gateway's interface (as RateLimiter's, with an awaitable acquire) --

    async def start(self) -> None:
        """Check Redis once (a warning if it cannot be reached; the server starts anyway)."""
        try:
            async with asyncio.timeout(self._timeout * 2):
                await cast(Awaitable[bool], self._redis.ping())
                # Loaded once here, so that calls need no second round trip (NOSCRIPT).
                await cast(Awaitable[str], self._redis.script_load(_SCRIPT))
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
        else:
            self._succeeded()

    async def acquire(self, limits: list[Limit], tokens: int) -> dict[str, str]:
        """As :meth:`RateLimiter.acquire`, for every process sharing the Redis."""
        keys: list[str] = []
        args: list[str] = ["" if self.clock is None else repr(self.clock()), "take"]
        checks: list[tuple[str, int, int, str]] = []  # kind, capacity, amount, what
        for limit in limits:
            if limit.rpm is not None:
                keys.append(f"{self._prefix}{limit.scope}:requests")
                args += (str(limit.rpm), "1")
                checks.append(("requests", limit.rpm, 1, f"{limit.rpm} requests per minute"))
            if limit.tpm is not None:
                keys.append(f"{self._prefix}{limit.scope}:tokens")
                args += (str(limit.tpm), str(tokens))
                checks.append(("tokens", limit.tpm, tokens, f"{limit.tpm} tokens per minute"))
        if not keys:
            return {}
        reply = await self._run(keys, args)
        if reply is None:
            FALLBACKS.inc()
            return self.local.acquire(limits, tokens)
        taken = reply[0] == 1
        requests: _Bucket | None = None
        tokens_bucket: _Bucket | None = None
        waits: list[tuple[float, str]] = []
        for (kind, capacity, amount, what), raw in zip(checks, reply[1:], strict=True):
            bucket = _Bucket(float(capacity), float(raw), 0.0)
            waits.append((bucket.wait_for(amount), what))
            if taken:
                bucket.level -= amount
            if kind == "requests":
                if requests is None or bucket.level < requests.level:
                    requests = bucket
            elif tokens_bucket is None or bucket.level < tokens_bucket.level:
                tokens_bucket = bucket
        if not taken:
            wait, what = max(waits)
            raise RateLimited(
                f"rate limit of {what} reached",
                max(1, math.ceil(wait)),
                _headers(requests, tokens_bucket),
            )
        return _headers(requests, tokens_bucket)

    def refund(self, limits: list[Limit], tokens: int) -> None:
        """As :meth:`RateLimiter.refund`; the round trip runs in the background."""
        if tokens <= 0:
            return
        keys: list[str] = []
        args: list[str] = ["" if self.clock is None else repr(self.clock()), "refund"]
        for limit in limits:
            if limit.tpm is not None:
                keys.append(f"{self._prefix}{limit.scope}:tokens")
                args += (str(limit.tpm), str(tokens))
        if not keys:
            return
        if not self._up and time.monotonic() < self._retry_at:
            self.local.refund(limits, tokens)
            return
        task = asyncio.get_running_loop().create_task(self._run(keys, args))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def aclose(self) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=self._timeout)
        await self._redis.aclose()

    # -- internals --

    async def _run(self, keys: Sequence[str], args: Sequence[str]) -> _Reply | None:
        """The script's answer, or None when Redis cannot be asked (down, slow, or
        waiting out its back-off)."""
        if not self._up and time.monotonic() < self._retry_at:
            return None
        async with self._slots:
            probe = not self._up
            if probe:
                now = time.monotonic()
                if now < self._retry_at:
                    return None
                # One call probes; the others go on locally until it has answered.
                self._retry_at = now + self._backoff
            try:
                async with asyncio.timeout(self._timeout):
                    reply = await self._script(keys=keys, args=args)
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed(exc, probe=probe)
                return None
        self._succeeded()
        assert isinstance(reply, list)
        return reply

    def _failed(self, exc: BaseException, *, probe: bool = True) -> None:
        if self._up:
            self._up = False
            self._backoff = self._backoff_first
            log.warning(
                "Redis at %s cannot be reached (%s): rate limits are per process until it is back",
                self._where,
                type(exc).__name__ + (f": {exc}" if str(exc) else ""),
            )
        elif probe:  # (not the calls that were under way when the outage began)
            self._backoff = min(self._backoff * 2, self._backoff_max)
        self._retry_at = time.monotonic() + self._backoff
        REDIS_UP.set(0)

    def _succeeded(self) -> None:
        if not self._up:
            self._up = True
            log.warning("Redis at %s is back: rate limits are shared again", self._where)
        REDIS_UP.set(1)
