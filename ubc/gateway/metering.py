"""Metering: a hold before every model call, a ``usage`` entry after it.

Before a call the endpoint holds an upper bound of its cost on the caller's account (a
pending transfer to ``system:consumption``); the hold can shrink to what the account (and
the key's spend cap) can still afford, down to a minimum, and the call's ``max_tokens``
is clamped to it. After the call a ledger-signed ``usage`` entry posts the actual cost
and releases the rest. A hold whose call never settles (the server died) expires by
itself and is journaled as ``hold.expire``, unbilled.

Holds of concurrent calls share one transaction (:class:`HoldWriter`, group commit), and
the ledger core checks each against the account's available balance under its lock, so
concurrent calls can never spend more than the balance.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from ubc import metrics
from ubc.clock import SYSTEM_CLOCK, Clock
from ubc.db import on_postgresql, run_unit_of_work, table
from ubc.db.driver import Driver
from ubc.errors import Forbidden, UbcError, Unauthenticated
from ubc.gateway.models import ApiKeySpend, GatewayHold
from ubc.ledger import service as ledger
from ubc.ledger.models import Transfer
from ubc.ledger.service import LedgerRequest, Leg
from ubc.members.models import ApiKey, Member
from ubc.metering import rules
from ubc.metering.payloads import HoldExpire, Usage
from ubc.metering.store import spend_epoch_query
from ubc.rules.writing import LedgerContext, Prechecked, Submit, ledger_payload, sign_internal

apikeys_t = table(ApiKey)
members_t = table(Member)
spend_t = table(ApiKeySpend)
holds_t = table(GatewayHold)
transfers_t = table(Transfer)


class SpendCapReached(UbcError):
    status = 402
    type = "spend_cap_reached"


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """Reserve up to ``want`` CU (at least ``need``) for the call ``request_id``."""

    request_id: str
    account: str
    key_hash: str
    model: str
    want: int
    need: int


@dataclass(frozen=True, slots=True)
class Held:
    request_id: str
    amount: int


def new_request_id() -> str:
    return str(uuid.uuid4())


def place_holds(
    session: Session,
    requests: Sequence[HoldRequest],
    *,
    now: datetime,
    timeout: timedelta,
) -> list[Held | UbcError]:
    """Place every request's hold in this transaction; one outcome per request.

    Each grant is checked again here, under its row lock: not revoked, not expired, its
    member active, and its spend cap for the epoch (what usage entries have posted plus
    the holds still open) not exceeded.
    """
    keys = sorted({r.key_hash for r in requests})
    # One round trip: the grants (locked on PostgreSQL, so that concurrent holds of one
    # key check its spend cap in turn), their members' status, and the spend epoch.
    query = (
        select(
            apikeys_t.c.key_hash,
            apikeys_t.c.account,
            apikeys_t.c.revoked,
            apikeys_t.c.expires_at,
            apikeys_t.c.spend_cap_per_epoch,
            members_t.c.status,
            spend_epoch_query().label("epoch"),
        )
        .select_from(
            apikeys_t.outerjoin(
                members_t, members_t.c.handle == func.substr(apikeys_t.c.account, 8)
            )
        )
        .where(apikeys_t.c.key_hash.in_(keys))
        .order_by(apikeys_t.c.key_hash)
    )
    if on_postgresql(session):
        query = query.with_for_update(of=apikeys_t)
    rows = session.execute(query).all()
    grants = {row.key_hash: row for row in rows}
    status = {row.account[7:]: row.status for row in rows if row.account.startswith("member:")}
    epoch = int(rows[0].epoch or 0) if rows else 0
    capped = sorted(k for k, g in grants.items() if g.spend_cap_per_epoch is not None)
    committed: dict[str, int] = {}
    if capped:
        for key_hash, spent in session.execute(
            select(spend_t.c.key_hash, spend_t.c.spent).where(
                spend_t.c.key_hash.in_(capped), spend_t.c.epoch == epoch
            )
        ):
            committed[key_hash] = int(spent)
        for key_hash, open_held in session.execute(
            text(
                "SELECT key_hash, sum(held) FROM gateway_holds "
                "WHERE epoch = :epoch AND key_hash IN :keys GROUP BY key_hash"
            ).bindparams(bindparam("keys", expanding=True)),
            {"epoch": epoch, "keys": capped},
        ):
            committed[key_hash] = committed.get(key_hash, 0) + int(open_held)
    outcomes: list[Held | UbcError | None] = []
    pending: list[tuple[int, HoldRequest, LedgerRequest]] = []
    for index, request in enumerate(requests):
        grant = grants.get(request.key_hash)
        try:
            refusal = (
                "revoked"
                if grant is None
                else rules.key_refusal(grant.revoked, grant.expires_at, now)
            )
            if refusal == "revoked":
                raise Unauthenticated("unknown or revoked API key")
            if refusal == "expired":
                raise Unauthenticated("this API key has expired")
            assert grant is not None
            if grant.account != request.account:
                raise Forbidden("the key is granted on another account")
            if grant.account.startswith("member:") and status.get(grant.account[7:]) != "active":
                raise Forbidden(f"{grant.account} is not active: its API keys are disabled")
            want = request.want
            cap = grant.spend_cap_per_epoch
            if cap is not None:
                left = cap - committed.get(request.key_hash, 0)
                if left < request.need:
                    raise SpendCapReached(
                        f"this key's spend cap of {cap} CU per epoch is reached",
                        detail={"cap": cap, "left": max(left, 0), "needed": request.need},
                    )
                want = min(want, left)
                committed[request.key_hash] = committed.get(request.key_hash, 0) + want
        except UbcError as error:
            outcomes.append(error)
            continue
        leg = Leg(
            request.account,
            "system:consumption",
            rules.COMPUTE_ASSET,
            want,
            "usage",
            timeout=timeout,
            min_amount=request.need,
        )
        outcomes.append(None)
        pending.append(
            (index, request, LedgerRequest(rules.hold_request_id(request.request_id), (leg,)))
        )
    applied = ledger.apply_many(session, [p[2] for p in pending], now=now)
    driver = Driver(session)
    new_rows: list[tuple[Any, ...]] = []
    stamp = driver.timestamp(now)
    for (index, request, _), outcome in zip(pending, applied, strict=True):
        if isinstance(outcome, UbcError):
            outcomes[index] = outcome
            continue
        amount = outcome.effects[0].amount
        outcomes[index] = Held(request.request_id, amount)
        new_rows.append(
            (
                request.request_id,
                request.account,
                request.key_hash,
                request.model,
                epoch,
                amount,
                stamp,
            )
        )
    driver.insert(
        "gateway_holds",
        "request_id, account, key_hash, model, epoch, held, created_at",
        new_rows,
    )
    return [o for o in outcomes if o is not None]


def usage_envelope(
    ctx: LedgerContext,
    *,
    request_id: str,
    account: str,
    key_hash: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    held: int,
    cost: int,
    now: datetime,
) -> Prechecked:
    """The ledger-signed ``usage`` entry of a finished call (``cost``: see
    :func:`ubc.metering.rules.call_cost`)."""
    payload = ledger_payload(
        ctx,
        Usage,
        now,
        account=account,
        key_hash=key_hash,
        request_id=request_id,
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        held=held,
        cost=cost,
    )
    return sign_internal(ctx, payload, "usage")


def expire_due_holds(
    session: Session,
    ctx: LedgerContext,
    *,
    submit: Submit,
    now: datetime | None = None,
    limit: int = 500,
) -> int:
    """Journal a ``hold.expire`` for every model-call hold past its timeout (unbilled),
    through the write path's ``submit`` (``ubc.envelopes.service.submit``)."""
    now = now or SYSTEM_CLOCK.now()
    due = [
        row.id
        for row in session.execute(
            select(transfers_t.c.id)
            .where(
                text("state = 'pending'"),
                transfers_t.c.timeout_at <= now,
                transfers_t.c.id.startswith("hold:"),
            )
            .order_by(transfers_t.c.timeout_at)
            .limit(limit)
        )
    ]
    if not due:
        return 0
    items = [
        sign_internal(ctx, ledger_payload(ctx, HoldExpire, now, hold_id=hold_id), "hold.expire")
        for hold_id in due
    ]
    outcomes = submit(session, ctx, items, now=now)
    return sum(1 for o in outcomes if not isinstance(o, UbcError))


@dataclass(slots=True)
class _HoldJob:
    request: HoldRequest
    future: asyncio.Future[Held | UbcError] = field(repr=False)


class HoldWriter:
    """Group commit for holds: concurrent calls' holds share one transaction."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        timeout: timedelta,
        max_batch: int = 500,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.timeout = timeout
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_HoldJob] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[list[Held | UbcError]] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight is not None:
            with contextlib.suppress(Exception):
                await self._inflight

    async def hold(self, request: HoldRequest) -> Held | UbcError:
        future: asyncio.Future[Held | UbcError] = asyncio.get_running_loop().create_future()
        await self._queue.put(_HoldJob(request, future))
        return await future

    async def _loop(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            while not self._queue.empty() and len(jobs) < self.max_batch:
                jobs.append(self._queue.get_nowait())
            requests = [job.request for job in jobs]
            started = time.perf_counter()
            try:
                self._inflight = asyncio.ensure_future(asyncio.to_thread(self._apply, requests))
                outcomes = await asyncio.shield(self._inflight)
            except Exception as exc:  # answer every caller, keep the writer alive
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            metrics.observe_batch("holds", len(requests), started)
            for job, outcome in zip(jobs, outcomes, strict=True):
                if not job.future.done():
                    job.future.set_result(outcome)

    def _apply(self, requests: list[HoldRequest]) -> list[Held | UbcError]:
        return run_unit_of_work(
            self.sessions,
            lambda session: place_holds(
                session, requests, now=self.clock.now(), timeout=self.timeout
            ),
        )
