"""Group commit: concurrent envelope submissions share one transaction.

Every HTTP request puts its envelopes on a queue; one writer task takes whatever is
waiting (up to ``max_batch`` envelopes) and, in a worker thread, decodes and verifies
the batch (``precheck``, before any lock), applies it with one ``submit`` in one
transaction, and answers each caller. Under load, batches grow by themselves; idle, a
single envelope commits at once.

The precheck of small requests runs once per batch in the writer's thread rather than once
per request in a thread of its own (large requests keep theirs, which overlaps the writer's
work on the batch before): measured with ``scripts/bench_envelopes.py`` (single envelopes, 32
clients, 2 workers, PostgreSQL), a thread hand-off per request cost more server CPU than
it saved, and every extra thread competing for the GIL delays the writer's thread each
time it wakes from a round trip while it holds the journal lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from sqlalchemy.orm import Session, sessionmaker

from ubc import metrics
from ubc.clock import SYSTEM_CLOCK, Clock
from ubc.db import as_unavailable, run_unit_of_work
from ubc.envelopes.service import LedgerContext, Outcome, Prechecked, precheck, submit

# Requests of at least this many envelopes are prechecked apart (see ``submit``).
PRECHECK_APART = 32

# How long a group waits, at most, for as many envelopes as the group before it had (see
# ``GroupCommitWriter._fill``).
LINGER_SECONDS = 0.002


@dataclass(frozen=True, slots=True)
class _Raw:
    """A client's envelope as received, to be decoded and verified by the writer."""

    value: object


@dataclass(slots=True)
class _Job:
    raws: Sequence[object]
    atomic: bool
    future: asyncio.Future[list[Outcome]] = field(repr=False)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class GroupCommitWriter:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        ctx: LedgerContext,
        *,
        read_sessions: sessionmaker[Session] | None = None,
        max_batch: int = 1000,
        linger: float = LINGER_SECONDS,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.read_sessions = read_sessions or sessions
        self.ctx = ctx
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[list[Outcome]] | None = None
        self.linger = linger
        # Envelopes waiting in the queue; the size of the last group; the future a
        # lingering group waits on (set once ``_wanted`` envelopes are waiting).
        self._queued = 0
        self._last_size = 1
        self._filled: asyncio.Future[None] | None = None
        self._wanted = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A batch already in its thread finishes and commits (its callers are gone, but
        # what was accepted is not half-done), before the engines are disposed.
        if self._inflight is not None:
            with contextlib.suppress(Exception):
                await self._inflight

    async def submit(self, raws: Sequence[object], *, atomic: bool = False) -> list[Outcome]:
        """Apply ``raws``; atomic submissions run alone and raise BatchFailed whole."""
        items: Sequence[object]
        if len(raws) >= PRECHECK_APART:
            # A large request is decoded and verified in a thread of its own, while the
            # writer applies what came before it.
            items = await asyncio.to_thread(self._precheck, raws)
        else:
            # Small ones by the writer's thread, a batch at a time, before it takes the
            # journal lock (``_apply``): one thread hand-off per batch, not per request.
            items = [_Raw(raw) for raw in raws]
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self._put(_Job(items, atomic, future))
        return await future

    async def submit_internal(
        self, items: Sequence[Prechecked | Callable[[], Prechecked]]
    ) -> list[Outcome]:
        """Apply the server's own signed envelopes (see ``sign_internal``); a callable is
        called in the writer's thread, to build and sign the envelope off the event loop."""
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self._put(_Job(items, False, future))
        return await future

    def _put(self, job: _Job) -> None:
        self._queue.put_nowait(job)
        self._queued += len(job.raws)
        filled = self._filled
        if filled is not None and not filled.done() and self._queued >= self._wanted:
            filled.set_result(None)

    def _take(self, job: _Job) -> _Job:
        self._queued -= len(job.raws)
        return job

    async def _fill(self, size: int) -> None:
        """Let a group that has ``size`` envelopes wait, at most ``linger`` seconds, until
        as many are waiting as the group before it had.

        Under load, the callers a group answers come back together, but one at a time:
        taking only the first of them made every other group small (measured with 32
        clients, 2 workers, PostgreSQL: groups of 3, 6, 11 and 12 in turn), and each group
        costs a turn of the journal lock, which the group of the other worker waits for.
        Idle or at low concurrency the last group was small, so nothing waits."""
        wanted = min(self._last_size, self.max_batch) - size
        # A large request does not wait: it was prechecked apart, and is a group by itself.
        if self.linger <= 0 or size >= PRECHECK_APART or wanted <= 0 or self._queued >= wanted:
            return
        loop = asyncio.get_running_loop()
        filled: asyncio.Future[None] = loop.create_future()
        self._filled, self._wanted = filled, wanted
        timer = loop.call_later(self.linger, _settle, filled)
        try:
            await filled
        finally:
            timer.cancel()
            self._filled = None

    def _precheck(self, raws: Sequence[object]) -> list[Prechecked]:
        with self.read_sessions() as session:
            return precheck(session, self.ctx, raws)

    async def _loop(self) -> None:
        while True:
            first = self._take(await self._queue.get())
            jobs = [first]
            if not first.atomic:
                size = len(first.raws)
                try:
                    await self._fill(size)
                except asyncio.CancelledError:
                    # Stopped while waiting: the envelope taken was not applied.
                    first.future.cancel()
                    raise
                while not self._queue.empty() and size < self.max_batch:
                    job = self._take(self._queue.get_nowait())
                    if job.atomic:
                        # run it on its own right after this batch
                        await self._run([job])
                        continue
                    jobs.append(job)
                    size += len(job.raws)
            await self._run(jobs)

    async def _run(self, jobs: list[_Job]) -> None:
        raws = [raw for job in jobs for raw in job.raws]
        self._last_size = len(raws)
        started = time.perf_counter()
        try:
            self._inflight = asyncio.ensure_future(
                asyncio.to_thread(self._apply, raws, jobs[0].atomic)
            )
            outcomes = await asyncio.shield(self._inflight)
        except Exception as exc:  # answer every caller, keep the writer alive
            # A database unreachable or full answers each caller 503 (nothing was applied).
            error = as_unavailable(exc) or exc
            metrics.observe_failed_commit(raws, error)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        metrics.observe_commit(raws, outcomes, started)
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(outcomes[start : start + len(job.raws)])
            start += len(job.raws)

    def _apply(self, raws: list[object], atomic: bool) -> list[Outcome]:
        # In place: the batch's list then holds what was applied (server envelopes built,
        # clients' decoded), which the metrics read by payload type.
        raws[:] = [raw() if callable(raw) else raw for raw in raws]
        clients = [i for i, raw in enumerate(raws) if isinstance(raw, _Raw)]
        if clients:
            checked = self._precheck([cast(_Raw, raws[i]).value for i in clients])
            for i, item in zip(clients, checked, strict=True):
                raws[i] = item
        # BatchFailed of an atomic batch leaves the unit of work rolled back: nothing applies.
        # ``idempotent``: if the connection is lost while committing, the batch runs again
        # on a new connection. That is safe because every envelope is keyed by its id: had
        # the first commit happened, the second run finds each id in ``requests`` (and the
        # journal) with the same payload hash and answers the recorded outcome as a repeat,
        # applying and journaling nothing twice. The server's own envelopes were built and
        # signed above, once, so a second run sees the same ids too.
        return run_unit_of_work(
            self.sessions,
            # The ledger's time, read once per batch (each attempt of the unit of work).
            # The batch's rows go with the commit (``commit_sends``).
            lambda session: submit(
                session, self.ctx, raws, atomic=atomic, now=self.clock.now(), commit_sends=True
            ),
            idempotent=True,
        )
