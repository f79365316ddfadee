"""Requests and tokens per minute per API key: token buckets in the serving process.

Each API key has a bucket of requests and one of tokens, refilled continuously at the
limit per minute; a call takes one request and its token estimate (prompt bound plus
``max_tokens``), and gets back what it did not use when it ends. The grant's ``rpm`` and
``tpm`` apply to the key across models; a model's defaults from the models file apply
to each key on that model. Buckets live in one process: with N server processes a key
gets up to N times its limit (documented in the README), unless ``UBC_REDIS_URL`` shares
them (:mod:`ubc.gateway.ratelimit_redis`, which keeps this limiter for when Redis is down).

Every call that passes (and every 429) reports the state of its buckets in OpenAI's
headers: ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests``,
``x-ratelimit-reset-requests`` and the same three for tokens. When both the key's and
the model's limits apply, each trio describes the bucket with the least left. The reset
is the time until the bucket is full again, written as OpenAI writes it (Go's duration
format: ``20ms``, ``1s``, ``8.64s``, ``6m0s``). A kind of limit that does not apply
(no ``rpm``, or no ``tpm``) has no headers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` fits (a request larger than the bucket waits for a
        full bucket and then overdraws it)."""
        needed = min(amount, self.capacity) - self.level
        return 0.0 if needed <= 0 else needed * 60.0 / self.capacity


@dataclass(frozen=True, slots=True)
class Limit:
    """One scope's limits: a bucket key and its requests and tokens per minute."""

    scope: str
    rpm: int | None
    tpm: int | None


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: int, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        #: The ``x-ratelimit-*`` headers of the buckets as they are (nothing taken).
        self.headers = headers


def format_reset(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it (Go's
    ``time.Duration`` format at millisecond precision, rounded up): ``0s``, ``20ms``,
    ``1s``, ``8.64s``, ``6m0s``, ``1h2m3.5s``."""
    ms = math.ceil(seconds * 1000 - 1e-3)  # up, to the ms (float noise aside)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms // 1000}.{ms % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


def _headers(requests: _Bucket | None, tokens: _Bucket | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for kind, bucket in (("requests", requests), ("tokens", tokens)):
        if bucket is None:
            continue
        capacity, level = bucket.capacity, bucket.level
        headers[f"x-ratelimit-limit-{kind}"] = str(int(capacity))
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(level)))
        headers[f"x-ratelimit-reset-{kind}"] = format_reset((capacity - level) * 60.0 / capacity)
    return headers


class RateLimiter:
    def __init__(self, clock: object = time.monotonic, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._max_keys = max_keys

    def _now(self) -> float:
        clock = self._clock
        assert callable(clock)
        value = clock()
        assert isinstance(value, float)
        return value

    def _bucket(self, scope: str, kind: str, capacity: int, now: float) -> _Bucket:
        key = (scope, kind)
        bucket = self._buckets.get(key)
        if bucket is None or bucket.capacity != capacity:
            if len(self._buckets) >= self._max_keys:
                self._buckets.clear()  # idle buckets are full anyway; start over
            bucket = self._buckets[key] = _Bucket(float(capacity), float(capacity), now)
        else:
            bucket.refill(now)
        return bucket

    def acquire(self, limits: list[Limit], tokens: int) -> dict[str, str]:
        """Take one request and ``tokens`` from every scope, or raise RateLimited; the
        ``x-ratelimit-*`` headers of the buckets after the take."""
        now = self._now()
        taken: list[tuple[_Bucket, float]] = []
        waits: list[tuple[float, str]] = []
        # The bucket of each kind with the least left: the one the headers describe.
        requests: _Bucket | None = None
        tokens_bucket: _Bucket | None = None
        for limit in limits:
            if limit.rpm is not None:
                bucket = self._bucket(limit.scope, "requests", limit.rpm, now)
                waits.append((bucket.wait_for(1), f"{limit.rpm} requests per minute"))
                taken.append((bucket, 1))
                if requests is None or bucket.level < requests.level:
                    requests = bucket
            if limit.tpm is not None:
                bucket = self._bucket(limit.scope, "tokens", limit.tpm, now)
                waits.append((bucket.wait_for(tokens), f"{limit.tpm} tokens per minute"))
                taken.append((bucket, tokens))
                if tokens_bucket is None or bucket.level < tokens_bucket.level:
                    tokens_bucket = bucket
        wait, what = max(waits, default=(0.0, ""))
        if wait > 0:
            raise RateLimited(
                f"rate limit of {what} reached",
                max(1, math.ceil(wait)),
                _headers(requests, tokens_bucket),
            )
        for bucket, amount in taken:
            bucket.level -= amount
        return _headers(requests, tokens_bucket)

    def refund(self, limits: list[Limit], tokens: int) -> None:
        """Give back tokens a call reserved but did not use."""
        if tokens <= 0:
            return
        now = self._now()
        for limit in limits:
            if limit.tpm is not None:
                bucket = self._bucket(limit.scope, "tokens", limit.tpm, now)
                bucket.level = min(bucket.capacity, bucket.level + tokens)
