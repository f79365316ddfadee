"""Requests and tokens per minute per API key: token buckets in the serving process.

Each API key has a bucket of requests and one of tokens, refilled continuously at the
limit per minute; a call takes one request and its token estimate (prompt bound plus
``max_tokens``), and gets back what it did not use when it ends. The grant's ``rpm`` and
``tpm`` apply to the key across models; a model's defaults from the models file apply
to each key on that model. Buckets live in one process: with N server processes a key
gets up to N times its limit (documented in the README).
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
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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

    def acquire(self, limits: list[Limit], tokens: int) -> None:
        """Take one request and ``tokens`` from every scope, or raise RateLimited."""
        now = self._now()
        taken: list[tuple[_Bucket, float]] = []
        waits: list[tuple[float, str]] = []
        for limit in limits:
            if limit.rpm is not None:
                bucket = self._bucket(limit.scope, "requests", limit.rpm, now)
                waits.append((bucket.wait_for(1), f"{limit.rpm} requests per minute"))
                taken.append((bucket, 1))
            if limit.tpm is not None:
                bucket = self._bucket(limit.scope, "tokens", limit.tpm, now)
                waits.append((bucket.wait_for(tokens), f"{limit.tpm} tokens per minute"))
                taken.append((bucket, tokens))
        wait, what = max(waits, default=(0.0, ""))
        if wait > 0:
            raise RateLimited(f"rate limit of {what} reached", max(1, math.ceil(wait)))
        for bucket, amount in taken:
            bucket.level -= amount

    def refund(self, limits: list[Limit], tokens: int) -> None:
        """Give back tokens a call reserved but did not use."""
        if tokens <= 0:
            return
        now = self._now()
        for limit in limits:
            if limit.tpm is not None:
                bucket = self._bucket(limit.scope, "tokens", limit.tpm, now)
                bucket.level = min(bucket.capacity, bucket.level + tokens)
