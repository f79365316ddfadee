"""The ledger's time: one injectable clock.

Everything the ledger decides by the time (a ``created_at`` inside the window, a hold or
an offer past its expiry, a withdrawal inside its approval window, the moment a batch
applies and is journaled) reads it from a :class:`Clock`. The server holds one
(``app.state.clock``, :class:`SystemClock` unless ``create_app`` is given another) and
reads it once per unit of work, at the outer layer (a request, a writer batch, a sweep
round), passing ``now`` down to the services.

Tests give the server a :class:`ManualClock` and move time with ``advance(seconds)``
instead of sleeping. What is measured on the wall clock on purpose (socket and request
timeouts, retry pauses, rate-limit windows, caches) does not read this clock.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    def now(self) -> datetime:
        """The current moment, timezone-aware UTC."""
        ...


class SystemClock:
    """The wall clock (UTC)."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """A clock that stands still until moved: ``advance(seconds)`` or ``set(moment)``.

    Starts at ``start`` (default: the wall clock's moment of its creation). Safe to read
    and move from several threads (a served app's worker threads and the test's own).
    """

    def __init__(self, start: datetime | None = None) -> None:
        moment = start if start is not None else datetime.now(UTC)
        if moment.tzinfo is None:
            raise ValueError("a ManualClock starts at an aware datetime")
        self._now = moment.astimezone(UTC)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> datetime:
        """Move forward by ``seconds`` (never backwards); returns the new moment."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        with self._lock:
            self._now += timedelta(seconds=seconds)
            return self._now

    def set(self, moment: datetime) -> None:
        """Jump to ``moment`` (not before the current one)."""
        if moment.tzinfo is None:
            raise ValueError("an aware datetime is needed")
        with self._lock:
            if moment < self._now:
                raise ValueError("time only moves forward")
            self._now = moment.astimezone(UTC)

    def __repr__(self) -> str:
        return f"ManualClock({self.now().isoformat()})"
