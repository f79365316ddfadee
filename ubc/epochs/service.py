"""Allocation epochs for a million members: set-based writes, applied in batches.

``epoch.open`` fixes, in the transaction that journals it, which members it allocates to
(every member active at that moment whose tier has an allocation) by one
``INSERT ... SELECT`` into ``epoch_allocations``; the journal entry carries a summary
(members and total per tier) instead of a million effects. The allocations are then
applied in batches of legs (``apply_allocations``), each one transaction of a few
set-based statements, while the ledger stays open for other writes; progress is on
``GET /api/epochs/{n}``. Crediting later than the entry is safe: a credit can only make
later spending possible, never fail it. The auditor derives the same allocations from its
replay and applies them at once.

``epoch.close`` expires, for every member account of the epoch's asset, what the member
could still spend above ``carryover_cap`` (available = posted − pending holds, so compute
held by an unfinished model call is never expired and nobody goes below zero). It runs
whole in the transaction that journals it, so the auditor sees the same balances.

Transfers are named ``<envelope id>:<leg>`` with legs numbered by handle (open) or
address (close), so the auditor can derive them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from ubc.dbtypes import UTCDateTime
from ubc.epochs.payloads import EpochClose, EpochOpen
from ubc.epochs.rules import (
    EpochClosed,
    EpochOpened,
    check_recorded_hold,
    close_summary,
    open_summary,
)
from ubc.errors import NotFound, StateConflict
from ubc.ledger import bulk
from ubc.rules.payload import parse_timestamp

CHUNK = 50_000


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
            "expired": self.expired,
        }


def apply_opened(session: Session, change: EpochOpened, now: datetime) -> dict[str, Any]:
    """What ``epoch.open`` does: its allocations fixed, and applied at once when there are
    at most ``allocate_at_once`` of them; the journal's summary."""
    payload = change.payload
    summary = open_epoch(session, payload, payload.id, now=now)
    if change.allocate_at_once is None or summary["members"] <= change.allocate_at_once:
        apply_all_allocations(session, payload.epoch, now=now)
    return summary


def apply_closed(session: Session, change: EpochClosed, now: datetime) -> dict[str, Any]:
    """What ``epoch.close`` does; the journal's summary."""
    return close_epoch(
        session, change.payload, change.payload.id, now=now, held_elsewhere=change.held_elsewhere
    )


def open_epoch(
    session: Session, payload: EpochOpen, envelope_id: str, *, now: datetime
) -> dict[str, Any]:
    """Fix the epoch's allocations (one set-based statement); the journal's summary."""
    tiers = sorted(payload.allocations)
    params: dict[str, Any] = {"epoch": payload.epoch, "asset": payload.asset}
    cases = []
    for i, tier in enumerate(tiers):
        params[f"t{i}"] = tier
        params[f"a{i}"] = payload.allocations[tier]
        cases.append(f"WHEN :t{i} THEN :a{i}")
    tier_list = ", ".join(f":t{i}" for i in range(len(tiers)))
    order = f"m.handle{bulk.binary_order(session)}"
    session.execute(
        text(
            "INSERT INTO epoch_allocations (epoch, leg, account_id, tier, amount) "
            f"SELECT :epoch, ROW_NUMBER() OVER (ORDER BY {order}) - 1, "
            "a.id, "
            "m.tier, "
            f"CASE m.tier {' '.join(cases)} END "
            "FROM members m JOIN accounts a "
            "ON a.address = 'member:' || m.handle AND a.asset = :asset "
            f"WHERE m.status = 'active' AND m.tier IN ({tier_list})"
        ),
        params,
    )
    by_tier = {
        str(r.tier): (int(r.members), int(r.total))
        for r in session.execute(
            text(
                "SELECT tier, count(*) AS members, sum(amount) AS total FROM epoch_allocations "
                "WHERE epoch = :epoch GROUP BY tier"
            ),
            {"epoch": payload.epoch},
        )
    }
    members = sum(c for c, _ in by_tier.values())
    total = sum(t for _, t in by_tier.values())
    session.execute(
        text(
            "INSERT INTO epochs (number, asset, allocations, carryover_cap, starts_at, ends_at, "
            "status, open_envelope_id, close_envelope_id, opened_at, closed_at, members, "
            "applied, issued, expired_members, expired, first_posting, last_posting) "
            "VALUES (:epoch, :asset, :allocations, :cap, :starts_at, :ends_at, :status, "
            ":envelope, NULL, :now, NULL, :members, 0, :total, 0, 0, "
            "(SELECT coalesce(max(id), 0) FROM postings), NULL)"
        ).bindparams(*_timestamps("starts_at", "ends_at", "now")),
        {
            "epoch": payload.epoch,
            "asset": payload.asset,
            "allocations": json.dumps(payload.allocations, sort_keys=True),
            "cap": payload.carryover_cap,
            "starts_at": parse_timestamp(payload.starts_at),
            "ends_at": parse_timestamp(payload.ends_at),
            "status": "opening" if members else "open",
            "envelope": envelope_id,
            "now": now,
            "members": members,
            "total": total,
        },
    )
    return open_summary(payload, by_tier)


def apply_allocations(
    session: Session, number: int, *, now: datetime, limit: int | None = None
) -> int:
    """Apply the next batch of an opening epoch's allocations; how many were applied."""
    epoch = session.execute(
        text(
            "SELECT asset, open_envelope_id, members, applied, status FROM epochs WHERE number = :n"
        ),
        {"n": number},
    ).first()
    if epoch is None or epoch.status != "opening":
        return 0
    asset, envelope_id, members, applied = (
        str(epoch.asset),
        str(epoch.open_envelope_id),
        int(epoch.members),
        int(epoch.applied),
    )
    lo, hi = applied, min(applied + (limit or CHUNK), members)
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
            "SELECT CASE WHEN open_envelope_id = :id THEN applied ELSE expired_members END "
            "AS legs FROM epochs WHERE open_envelope_id = :id OR close_envelope_id = :id"
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
    envelope_id: str,
    *,
    now: datetime,
    held_elsewhere: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Expire what members can spend above the cap, whole, in this transaction.

    Holds pending at this moment are not journaled, so the summary records those that
    limited an expiry (``held``: address → amount held). ``held_elsewhere`` are holds
    pending outside the ledger's tables (a re-run of the journal passes the recorded
    ones): they limit the expiries as pending holds do, and are what the summary records.
    """
    asset = _close_asset(session, payload)
    cap = session.execute(
        text("SELECT carryover_cap FROM epochs WHERE number = :n"), {"n": payload.epoch}
    ).scalar_one()
    count = total = 0
    held: dict[str, int] = {}
    elsewhere: dict[str, int] = {}
    if cap is not None and held_elsewhere:
        elsewhere = dict(held_elsewhere)
        _check_recorded_holds(session, asset, elsewhere, int(cap))
    if cap is not None:
        with bulk.pending_elsewhere(session, asset, elsewhere):
            expired_account = bulk.account_id(session, "system:expired", asset)
            bulk.lock_above(session, asset, int(cap), expired_account)
            members = bulk.above_cap_legs(session, payload.epoch, asset, int(cap))
            window = bulk.LegWindow("epoch_expiries", payload.epoch, 0, members)
            count, total = bulk.move(
                session,
                window,
                envelope_id,
                asset,
                source=expired_account,
                kind="expiry",
                source_is_debit=False,
                now=now,
            )
        # Every hold that made a member's expiry smaller (or none at all).
        held = elsewhere or bulk.held_above(session, asset, int(cap))
    session.execute(
        text(
            "UPDATE epochs SET status = 'closed', close_envelope_id = :envelope, "
            "closed_at = :now, expired_members = :count, expired = :total, "
            "last_posting = (SELECT coalesce(max(id), 0) FROM postings) WHERE number = :n"
        ).bindparams(*_timestamps("now")),
        {"envelope": envelope_id, "now": now, "count": count, "total": total, "n": payload.epoch},
    )
    return close_summary(payload.epoch, asset, count, total, held)


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


def _check_recorded_holds(session: Session, asset: str, held: dict[str, int], cap: int) -> None:
    """A journal's recorded holds must be possible: on member accounts with more than the
    cap posted, each positive and at most what the account held available."""
    for address, amount in held.items():
        check_recorded_hold(address, amount, bulk.member_available(session, address, asset), cap)


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
    "last_posting"
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
