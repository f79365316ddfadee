"""Allocation epochs for a million members: set-based writes, in bounded steps.

``epoch.open`` counts, in the transaction that journals it, the members it allocates to
(every member active at that moment whose tier has an allocation); the journal entry
carries that summary (members and total per tier) instead of a million effects. An epoch
of at most ``CHUNK`` members is fixed and credited in the same transaction. A larger one
is ``opening``: the server's background task fixes the allocations of ``CHUNK`` handles
at a time into ``epoch_allocations`` (``fix_allocations``: each member as it was at the
entry, kept in ``epoch_fixes`` by ``before_member_change`` when it changes before its
step) and credits them in batches of legs (``apply_allocations``), each its own
transaction of a few set-based statements, while the ledger stays open for other writes;
progress is on ``GET /api/epochs/{n}``. Crediting later than the entry is safe: a credit
can only make later spending possible, never fail it. The auditor derives the same
allocations from its replay and applies them at once.

``epoch.close`` expires, for every member account of the epoch's asset, what the member
could still spend above ``carryover_cap`` (available = posted − pending holds, so compute
held by an unfinished model call is never expired and nobody goes below zero). It runs in
steps over the member accounts in address order, each in the transaction that journals
it, so that no step holds the journal's lock for long and the auditor sees the same
balances at every step: the close entry covers the first ``STEP`` accounts; if more are
left the epoch is ``closing`` and the ledger journals ``epoch.expire`` steps over the next
``STEP`` each (``next_close_step``, run by the server's background task). A member's
expiry is computed at the position of the step whose range holds its address. A crash
between steps resumes from the close's cursor (the last step's ``through``).

Transfers are named ``<envelope id>:<leg>`` with legs numbered by handle (open) or
address within a step (close), so the auditor can derive them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from ubc.db import on_postgresql
from ubc.dbtypes import UTCDateTime
from ubc.epochs.payloads import EpochClose, EpochExpire, EpochOpen
from ubc.epochs.rules import (
    EpochClosed,
    EpochExpired,
    EpochOpened,
    check_held_in_step,
    check_recorded_hold,
    check_step,
    close_summary,
    expire_summary,
    open_summary,
)
from ubc.errors import NotFound, StateConflict, UbcError
from ubc.ledger import bulk
from ubc.rules.payload import parse_timestamp
from ubc.rules.writing import LedgerContext, Submit, ledger_payload, sign_internal

#: Allocation legs applied per transaction (each locks its members' accounts meanwhile).
CHUNK = 10_000
#: Member accounts per close step (each holds the journal's lock meanwhile).
STEP = 10_000


@dataclass(frozen=True, slots=True)
class EpochInfo:
    number: int
    asset: str
    allocations: dict[str, int]
    carryover_cap: int | None
    starts_at: datetime
    ends_at: datetime
    status: str
    opened_at: datetime
    closed_at: datetime | None
    members: int
    applied: int
    issued: int
    expired_members: int
    expired: int
    first_posting: int = 0
    last_posting: int | None = None
    close_cursor: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.number,
            "asset": self.asset,
            "allocations": self.allocations,
            "carryover_cap": self.carryover_cap,
            "starts_at": self.starts_at.isoformat(),
            "ends_at": self.ends_at.isoformat(),
            "status": self.status,
            "opened_at": self.opened_at.isoformat(),
            "closed_at": None if self.closed_at is None else self.closed_at.isoformat(),
            "members": self.members,
            "applied": self.applied,
            "issued": self.issued,
            "expired_members": self.expired_members,
            "close_cursor": self.close_cursor,
            "expired": self.expired,
        }


def apply_opened(session: Session, change: EpochOpened, now: datetime) -> dict[str, Any]:
    """What ``epoch.open`` does: the journal's summary; and every allocation fixed and
    applied at once when there are at most ``allocate_at_once`` of them, else in steps."""
    return open_epoch(session, change.payload, now=now, at_once=change.allocate_at_once)


def apply_closed(session: Session, change: EpochClosed, now: datetime) -> dict[str, Any]:
    """What ``epoch.close`` does (the close and its first step); the journal's summary."""
    return close_epoch(
        session,
        change.payload,
        now=now,
        held_elsewhere=change.held_elsewhere,
        through=change.through,
    )


def apply_expired(session: Session, change: EpochExpired, now: datetime) -> dict[str, Any]:
    """What an ``epoch.expire`` step does; the journal's summary."""
    return expire_step(session, change.payload, now=now, held_elsewhere=change.held_elsewhere)


def open_epoch(
    session: Session, payload: EpochOpen, *, now: datetime, at_once: int | None = None
) -> dict[str, Any]:
    """The open, in the transaction that journals it: count, per tier, the members it
    allocates to (every member active now whose tier has an allocation); the journal's
    summary. With at most ``at_once`` of them (None: however many) their allocations are
    fixed and applied here too; else :func:`fix_allocations` fixes them in steps by handle,
    each member as it was at this entry (:func:`before_member_change` keeps that state
    for a member that changes before its step), and :func:`apply_allocations` credits
    them."""
    tiers = _tiers(payload.allocations)
    # Every member has an account in every asset (made with the member; the assets are
    # fixed at genesis), so the members are counted without their accounts: a fifth of
    # the time at a million, under the journal's lock. Fixing joins the accounts, and
    # checks that it fixed as many as were counted.
    by_tier = {
        str(r.tier): (int(r.members), int(r.members) * payload.allocations[str(r.tier)])
        for r in session.execute(
            text(
                "SELECT tier, count(*) AS members FROM members "
                f"WHERE status = 'active' AND tier IN ({tiers.names}) GROUP BY tier"
            ),
            tiers.params,
        )
    }
    members = sum(c for c, _ in by_tier.values())
    total = sum(t for _, t in by_tier.values())
    whole = at_once is None or members <= at_once
    session.execute(
        text(
            "INSERT INTO epochs (number, asset, allocations, carryover_cap, starts_at, ends_at, "
            "status, open_envelope_id, close_envelope_id, opened_at, closed_at, members, "
            "applied, issued, expired_members, expired, first_posting, last_posting, "
            "fix_cursor, fixed) "
            "VALUES (:epoch, :asset, :allocations, :cap, :starts_at, :ends_at, :status, "
            ":envelope, NULL, :now, NULL, :members, 0, :total, 0, 0, "
            "(SELECT coalesce(max(id), 0) FROM postings), NULL, :cursor, 0)"
        ).bindparams(*_timestamps("starts_at", "ends_at", "now")),
        {
            "epoch": payload.epoch,
            "asset": payload.asset,
            "allocations": json.dumps(payload.allocations, sort_keys=True),
            "cap": payload.carryover_cap,
            "starts_at": parse_timestamp(payload.starts_at),
            "ends_at": parse_timestamp(payload.ends_at),
            "status": "opening" if members else "open",
            "envelope": payload.id,
            "now": now,
            "members": members,
            "total": total,
            "cursor": None if whole or not members else "",
        },
    )
    if whole and members:
        fixed = _fix_range(session, payload.epoch, "", None)
        if fixed != members:
            raise StateConflict(
                f"epoch {payload.epoch}: {fixed} allocations fixed, {members} members counted"
            )
        session.execute(
            text("UPDATE epochs SET fixed = :fixed WHERE number = :n"),
            {"fixed": fixed, "n": payload.epoch},
        )
        apply_all_allocations(session, payload.epoch, now=now)
    return open_summary(payload, by_tier)


def fix_allocations(session: Session, number: int, *, limit: int | None = None) -> bool:
    """Fix the allocations of the next ``limit`` handles (default ``CHUNK``) of an opening
    epoch, each member as it was at the open's entry; False if nothing was left to fix.
    Its own transaction: it locks the epoch's row (one fixer at a time) and no account."""
    row = session.execute(
        _for_update(
            session,
            "SELECT fix_cursor, fixed, members FROM epochs "
            "WHERE number = :n AND status = 'opening'",
        ),
        {"n": number},
    ).first()
    if row is None or row.fix_cursor is None:
        return False
    after, order = str(row.fix_cursor), bulk.binary_order(session)
    ends = session.execute(
        text(
            f"SELECT handle FROM members WHERE handle{order} > :after{order} "
            f"ORDER BY handle{order} LIMIT 1 OFFSET :skip"
        ),
        {"after": after, "skip": (limit or CHUNK) - 1},
    ).scalar_one_or_none()
    through = None if ends is None else str(ends)
    fixed = int(row.fixed) + _fix_range(session, number, after, through)
    left = through is not None and (
        session.execute(
            text(f"SELECT 1 FROM members WHERE handle{order} > :through{order} LIMIT 1"),
            {"through": through},
        ).first()
        is not None
    )
    # Every member the entry counted is fixed: whoever is left was not one of them.
    left = left and fixed < int(row.members)
    if not left and fixed != int(row.members):
        raise StateConflict(
            f"epoch {number}: {fixed} allocations fixed, the open counted {row.members}"
        )
    session.execute(
        text("UPDATE epochs SET fix_cursor = :cursor, fixed = :fixed WHERE number = :n"),
        {"cursor": through if left else None, "fixed": fixed, "n": number},
    )
    session.execute(
        text(f"DELETE FROM epoch_fixes WHERE epoch = :n AND (:all OR handle{order} <= :through)"),
        {"n": number, "all": not left, "through": through or ""},
    )
    return True


def fix_ahead(session: Session, number: int) -> bool:
    """One :func:`fix_allocations` step of an opening epoch if fewer than ``CHUNK`` of its
    fixed allocations wait to be applied; whether it took one."""
    row = session.execute(
        text(
            "SELECT fixed, applied FROM epochs WHERE number = :n AND status = 'opening' "
            "AND fix_cursor IS NOT NULL"
        ),
        {"n": number},
    ).first()
    if row is None or int(row.fixed) - int(row.applied) >= CHUNK:
        return False
    return fix_allocations(session, number)


def before_member_change(session: Session, handle: str) -> None:
    """Keep a member's state for an opening epoch whose allocations are not yet fixed up
    to its handle, before the member changes (or first appears): the epoch allocates by
    the state at its entry. In the member's write transaction, which commits the kept
    state and the change together; a fix step prefers a kept state, so whichever commits
    first, the step fixes the state at the entry. The epoch's row is only read, not
    locked: a write batch that locked it could deadlock with an allocation batch, which
    locks its members' accounts and then that row."""
    row = session.execute(
        text(
            "SELECT number, fix_cursor FROM epochs "
            "WHERE status = 'opening' AND fix_cursor IS NOT NULL"
        )
    ).first()
    if row is None or handle <= str(row.fix_cursor):
        return
    params = {"n": int(row.number), "handle": handle}
    kept = session.execute(
        text("SELECT 1 FROM epoch_fixes WHERE epoch = :n AND handle = :handle"), params
    ).first()
    if kept is not None:
        return
    result = session.execute(
        text(
            "INSERT INTO epoch_fixes (epoch, handle, status, tier) "
            "SELECT :n, handle, status, tier FROM members WHERE handle = :handle"
        ),
        params,
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        session.execute(
            text(
                "INSERT INTO epoch_fixes (epoch, handle, status, tier) "
                "VALUES (:n, :handle, NULL, NULL)"
            ),
            params,
        )


def _fix_range(session: Session, number: int, after: str, through: str | None) -> int:
    """Fix the allocations of the members with ``after < handle <= through`` (None: to
    the last), as they were at the open: legs numbered by handle after those fixed."""
    epoch = session.execute(
        text("SELECT asset, allocations, fixed FROM epochs WHERE number = :n"), {"n": number}
    ).one()
    tiers = _tiers(json.loads(epoch.allocations))
    order = bulk.binary_order(session)
    upto = "" if through is None else f" AND m.handle{order} <= :through{order}"
    result = session.execute(
        text(
            "INSERT INTO epoch_allocations (epoch, leg, account_id, tier, amount) "
            f"SELECT :n, :fixed + ROW_NUMBER() OVER (ORDER BY s.handle{order}) - 1, a.id, "
            f"s.tier, {tiers.amount('s.tier')} FROM ("
            "SELECT m.handle, "
            "CASE WHEN f.handle IS NULL THEN m.status ELSE f.status END AS status, "
            "CASE WHEN f.handle IS NULL THEN m.tier ELSE f.tier END AS tier "
            "FROM members m LEFT JOIN epoch_fixes f ON f.epoch = :n AND f.handle = m.handle "
            f"WHERE m.handle{order} > :after{order}{upto}) s "
            "JOIN accounts a ON a.address = 'member:' || s.handle AND a.asset = :asset "
            f"WHERE s.status = 'active' AND s.tier IN ({tiers.names})"
        ),
        {
            "n": number,
            "fixed": int(epoch.fixed),
            "asset": str(epoch.asset),
            "after": after,
            "through": through,
            **tiers.params,
        },
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class _Tiers:
    """An epoch's tiers as SQL parameters: ``names`` for ``IN (...)``, ``amount(column)``
    the tier's allocation."""

    names: str
    cases: str
    params: dict[str, Any]

    def amount(self, column: str) -> str:
        return f"CASE {column} {self.cases} END"


def _tiers(allocations: Mapping[str, int]) -> _Tiers:
    params: dict[str, Any] = {}
    cases = []
    for i, tier in enumerate(sorted(allocations)):
        params[f"t{i}"], params[f"a{i}"] = tier, allocations[tier]
        cases.append(f"WHEN :t{i} THEN :a{i}")
    names = ", ".join(f":t{i}" for i in range(len(allocations)))
    return _Tiers(names, " ".join(cases), params)


def _for_update(session: Session, sql: str) -> Any:
    """``sql`` with FOR UPDATE on PostgreSQL (SQLite serialises writers anyway)."""
    return text(sql + (" FOR UPDATE" if on_postgresql(session) else ""))


def apply_allocations(
    session: Session, number: int, *, now: datetime, limit: int | None = None
) -> int:
    """Apply the next batch of an opening epoch's fixed allocations; how many were applied."""
    epoch = session.execute(
        text(
            "SELECT asset, open_envelope_id, members, applied, fixed, status FROM epochs "
            "WHERE number = :n"
        ),
        {"n": number},
    ).first()
    if epoch is None or epoch.status != "opening":
        return 0
    asset, envelope_id, applied = (
        str(epoch.asset),
        str(epoch.open_envelope_id),
        int(epoch.applied),
    )
    lo, hi = applied, min(applied + (limit or CHUNK), int(epoch.fixed))
    if hi <= lo:
        return 0
    issuance = bulk.account_id(session, "system:issuance", asset)
    window = bulk.LegWindow("epoch_allocations", number, lo, hi)
    bulk.lock_window(session, window, issuance)
    count, _ = bulk.move(
        session,
        window,
        envelope_id,
        asset,
        source=issuance,
        kind="allocation",
        source_is_debit=True,
        now=now,
    )
    session.execute(
        text(
            "UPDATE epochs SET applied = :hi, status = CASE WHEN :hi >= members THEN 'open' "
            "ELSE status END WHERE number = :n"
        ),
        {"hi": hi, "n": number},
    )
    assert count == hi - lo, (count, lo, hi)
    return count


def apply_all_allocations(session: Session, number: int, *, now: datetime) -> None:
    """Apply every remaining allocation now (the auditor's replay, small epochs)."""
    while apply_allocations(session, number, now=now):
        pass


def leg_ids(session: Session, envelope_id: str, *, limit: int = 1000) -> list[str]:
    """The first ``limit`` transfer ids of an epoch envelope's derived legs (else none)."""
    row = session.execute(
        text(
            "SELECT applied AS legs FROM epochs WHERE open_envelope_id = :id "
            "UNION ALL SELECT legs FROM epoch_close_steps WHERE envelope_id = :id"
        ),
        {"id": envelope_id},
    ).first()
    count = 0 if row is None else min(int(row.legs), limit)
    return [f"{envelope_id}:{leg}" for leg in range(count)]


def pending_epochs(session: Session) -> list[int]:
    return [
        int(r.number)
        for r in session.execute(text("SELECT number FROM epochs WHERE status = 'opening'"))
    ]


def close_epoch(
    session: Session,
    payload: EpochClose,
    *,
    now: datetime,
    held_elsewhere: Mapping[str, int] | None = None,
    through: str | None = None,
    size: int | None = None,
) -> dict[str, Any]:
    """The close and its first step (:func:`expire_step`), over the first ``size`` member
    accounts in address order (default ``STEP``), or up to ``through`` when a re-run
    says where the journal's first step ended. The epoch is closed if that covered every
    member account of the asset, else closing. Without a carryover cap nothing expires
    and it is closed at once."""
    asset = _close_asset(session, payload)
    cap = session.execute(
        text("SELECT carryover_cap FROM epochs WHERE number = :n"), {"n": payload.epoch}
    ).scalar_one()
    session.execute(
        text(
            "UPDATE epochs SET status = 'closing', close_envelope_id = :envelope, "
            "close_cursor = '' WHERE number = :n"
        ),
        {"envelope": payload.id, "n": payload.epoch},
    )
    if cap is None:
        _mark_closed(session, payload.epoch, now)
        return close_summary(payload.epoch, asset, 0, 0, {}, None)
    if through is None:
        through = bulk.next_range_end(session, asset, "", size or STEP) or ""
    count, total, held, closed = _expire_range(
        session, payload.epoch, payload.id, "", through, held_elsewhere, now
    )
    return close_summary(payload.epoch, asset, count, total, held, None if closed else through)


def expire_step(
    session: Session,
    payload: EpochExpire,
    *,
    now: datetime,
    held_elsewhere: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """A later step of a close: expire, for every member account of the asset with
    ``after < address <= through``, what it can spend above the cap now; the step after
    which no member account is left beyond ``through`` closes the epoch."""
    row = session.execute(
        text("SELECT status, asset, close_cursor FROM epochs WHERE number = :n"),
        {"n": payload.epoch},
    ).first()
    if row is None:
        raise NotFound(f"no epoch {payload.epoch}", detail={"epoch": payload.epoch})
    check_step(payload.epoch, str(row.status), row.close_cursor, payload.after)
    count, total, held, closed = _expire_range(
        session, payload.epoch, payload.id, payload.after, payload.through, held_elsewhere, now
    )
    return expire_summary(payload.epoch, str(row.asset), count, total, held, closed)


def _expire_range(
    session: Session,
    number: int,
    envelope_id: str,
    after: str,
    through: str,
    held_elsewhere: Mapping[str, int] | None,
    now: datetime,
) -> tuple[int, int, dict[str, int], bool]:
    """One step of a close, in the transaction that journals it: for every member account
    of the asset with ``after < address <= through`` (code-point order), expire what it
    can spend above the cap now (available = posted - pending holds, so compute held by
    an unfinished model call is never expired and nobody goes below zero). Holds of model
    calls are not journaled, so the step records those that limited an expiry (address ->
    amount held); ``held_elsewhere`` are holds pending outside the ledger's tables (a
    re-run of the journal passes the recorded ones): they limit the expiries as pending
    holds do, and are what is recorded. (count, total, held, whether the epoch closed)."""
    epoch = session.execute(
        text("SELECT asset, carryover_cap, expired_members FROM epochs WHERE number = :n"),
        {"n": number},
    ).one()
    asset, cap, first = str(epoch.asset), int(epoch.carryover_cap), int(epoch.expired_members)
    span = bulk.AddressRange(asset, after, through, cap)
    elsewhere = dict(held_elsewhere or {})
    check_held_in_step(elsewhere, after, through)
    for address, amount in elsewhere.items():
        check_recorded_hold(address, amount, bulk.member_available(session, address, asset), cap)
    with bulk.pending_elsewhere(session, asset, elsewhere):
        expired_account = bulk.account_id(session, "system:expired", asset)
        bulk.lock_range(session, span, expired_account)
        legs = bulk.range_above_cap_legs(session, span, number, first)
        count, total = bulk.move(
            session,
            bulk.LegWindow("epoch_expiries", number, first, first + legs),
            envelope_id,
            asset,
            source=expired_account,
            kind="expiry",
            source_is_debit=False,
            now=now,
            first_leg=first,
        )
        # Every hold of a model call that made a member's expiry smaller (or none at all).
        held = elsewhere or bulk.held_by_calls(session, span)
    session.execute(
        text(
            "UPDATE epochs SET close_cursor = :through, "
            "expired_members = expired_members + :count, expired = expired + :total "
            "WHERE number = :n"
        ),
        {"through": through, "count": count, "total": total, "n": number},
    )
    session.execute(
        text(
            "INSERT INTO epoch_close_steps (envelope_id, epoch, first_leg, legs, through) "
            "VALUES (:id, :n, :first, :legs, :through)"
        ),
        {"id": envelope_id, "n": number, "first": first, "legs": count, "through": through},
    )
    closed = not bulk.member_account_after(session, asset, through)
    if closed:
        _mark_closed(session, number, now)
    return count, total, held, closed


def _mark_closed(session: Session, number: int, now: datetime) -> None:
    session.execute(
        text(
            "UPDATE epochs SET status = 'closed', close_cursor = NULL, closed_at = :now, "
            "last_posting = (SELECT coalesce(max(id), 0) FROM postings) WHERE number = :n"
        ).bindparams(*_timestamps("now")),
        {"now": now, "n": number},
    )


def closing_epochs(session: Session) -> list[tuple[int, str, str]]:
    """The epochs whose close is running: number, asset and how far it has come."""
    return [
        (int(r.number), str(r.asset), str(r.close_cursor or ""))
        for r in session.execute(
            text(
                "SELECT number, asset, close_cursor FROM epochs WHERE status = 'closing' "
                "ORDER BY number"
            )
        )
    ]


def next_close_step(
    session: Session,
    ctx: LedgerContext,
    *,
    now: datetime,
    submit: Submit,
    size: int | None = None,
) -> bool:
    """Journal the next ``epoch.expire`` step of every running close (signed by the
    ledger), each over the next ``size`` member accounts; whether any step was taken.
    A step that another process journaled first is refused by its ``after`` and
    retried from where that one ended."""
    progressed = False
    for number, asset, after in closing_epochs(session):
        through = bulk.next_range_end(session, asset, after, size or STEP)
        payload = ledger_payload(
            ctx,
            EpochExpire,
            now,
            epoch=number,
            after=after,
            through=after if through is None else through,
        )
        (outcome,) = submit(session, ctx, [sign_internal(ctx, payload, "epoch.expire")], now=now)
        progressed = progressed or not isinstance(outcome, UbcError)
    return progressed


def _close_asset(session: Session, payload: EpochClose) -> str:
    """The epoch's asset; StateConflict unless it is open (the rule checked it)."""
    row = session.execute(
        text("SELECT status, asset FROM epochs WHERE number = :n"), {"n": payload.epoch}
    ).first()
    if row is None:
        raise NotFound(f"no epoch {payload.epoch}", detail={"epoch": payload.epoch})
    if str(row.status) != "open":
        raise StateConflict(f"epoch {payload.epoch} is {row.status}")
    return str(row.asset)


def list_epochs(session: Session) -> list[EpochInfo]:
    return [
        _info(r) for r in session.execute(text(f"SELECT {_COLUMNS} FROM epochs ORDER BY number"))
    ]


def get_epoch(session: Session, number: int) -> EpochInfo:
    row = session.execute(
        text(f"SELECT {_COLUMNS} FROM epochs WHERE number = :n"), {"n": number}
    ).first()
    if row is None:
        raise NotFound(f"no epoch {number}", detail={"epoch": number})
    return _info(row)


def current_epoch(session: Session) -> int | None:
    value = session.execute(
        text("SELECT max(number) FROM epochs WHERE status IN ('opening', 'open')")
    ).scalar_one_or_none()
    return None if value is None else int(value)


# --- internals ------------------------------------------------------------------------

_COLUMNS = (
    "number, asset, allocations, carryover_cap, starts_at, ends_at, status, opened_at, "
    "closed_at, members, applied, issued, expired_members, expired, first_posting, "
    "last_posting, close_cursor"
)


def _info(row: Any) -> EpochInfo:
    starts, ends, opened = _utc(row.starts_at), _utc(row.ends_at), _utc(row.opened_at)
    assert starts is not None
    assert ends is not None
    assert opened is not None
    return EpochInfo(
        number=int(row.number),
        asset=str(row.asset),
        allocations=json.loads(row.allocations),
        carryover_cap=None if row.carryover_cap is None else int(row.carryover_cap),
        starts_at=starts,
        ends_at=ends,
        status=str(row.status),
        opened_at=opened,
        closed_at=_utc(row.closed_at),
        members=int(row.members),
        applied=int(row.applied),
        issued=int(row.issued),
        expired_members=int(row.expired_members),
        expired=int(row.expired),
        first_posting=int(row.first_posting),
        last_posting=None if row.last_posting is None else int(row.last_posting),
        close_cursor=None if row.close_cursor is None else str(row.close_cursor),
    )


def _utc(value: Any) -> datetime | None:
    """A timestamp column read through ``text()`` (a string on SQLite) as aware UTC."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(moment, datetime)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _timestamps(*names: str) -> list[Any]:
    return [bindparam(name, type_=UTCDateTime()) for name in names]


# --- reads of the rules' lookup ---------------------------------------------------------


def asset_exists(session: Session, code: str) -> bool:
    count = session.execute(
        text("SELECT count(*) FROM assets WHERE code = :code"), {"code": code}
    ).scalar_one()
    return bool(count)


def latest_epoch(session: Session) -> tuple[int, str] | None:
    row = session.execute(
        text("SELECT number, status FROM epochs ORDER BY number DESC LIMIT 1")
    ).first()
    return None if row is None else (int(row.number), str(row.status))


def epoch_state(session: Session, number: int) -> tuple[str, str] | None:
    row = session.execute(
        text("SELECT status, asset FROM epochs WHERE number = :n"), {"n": number}
    ).first()
    return None if row is None else (str(row.status), str(row.asset))
