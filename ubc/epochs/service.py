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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from ubc.dbtypes import UTCDateTime
from ubc.envelopes.payloads import EpochClose, EpochOpen, parse_timestamp
from ubc.errors import BadRequest, NotFound, StateConflict
from ubc.ledger._sql import Driver

CHUNK = 50_000
OPEN_STATES = ("opening", "open")


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


def check_open(session: Session, payload: EpochOpen) -> None:
    """Refuse an epoch that may not open now (raises; changes nothing)."""
    if parse_timestamp(payload.ends_at) <= parse_timestamp(payload.starts_at):
        raise BadRequest("ends_at must be after starts_at")
    known = session.execute(
        text("SELECT count(*) FROM assets WHERE code = :code"), {"code": payload.asset}
    ).scalar_one()
    if not known:
        raise NotFound(f"no asset {payload.asset}", detail={"asset": payload.asset})
    row = session.execute(
        text("SELECT number, status FROM epochs ORDER BY number DESC LIMIT 1")
    ).first()
    if row is None:
        return
    number, status = int(row[0]), str(row[1])
    if number == payload.epoch:
        raise StateConflict(
            f"epoch {number} was already opened", detail={"epoch": number, "status": status}
        )
    if status in OPEN_STATES:
        raise StateConflict(
            f"epoch {number} is still {status}: close it before opening another",
            detail={"epoch": number, "status": status},
        )
    if payload.epoch < number:
        raise StateConflict(
            f"epochs count up: {payload.epoch} comes before the last one, {number}",
            detail={"epoch": payload.epoch, "last": number},
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
    session.execute(
        text(
            "INSERT INTO epoch_allocations (epoch, leg, account_id, tier, amount) "
            f"SELECT :epoch, ROW_NUMBER() OVER (ORDER BY m.handle{_binary(session)}) - 1, a.id, "
            "m.tier, "
            f"CASE m.tier {' '.join(cases)} END "
            "FROM members m JOIN accounts a "
            "ON a.address = 'member:' || m.handle AND a.asset = :asset "
            f"WHERE m.status = 'active' AND m.tier IN ({tier_list})"
        ),
        params,
    )
    by_tier = {
        str(r[0]): (int(r[1]), int(r[2]))
        for r in session.execute(
            text(
                "SELECT tier, count(*), sum(amount) FROM epoch_allocations "
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
    return {
        "epoch": payload.epoch,
        "asset": payload.asset,
        "members": members,
        "total": total,
        "tiers": {
            tier: {
                "members": by_tier.get(tier, (0, 0))[0],
                "amount": payload.allocations[tier],
                "total": by_tier.get(tier, (0, 0))[1],
            }
            for tier in tiers
        },
    }


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
    if epoch is None or epoch[4] != "opening":
        return 0
    asset, envelope_id, members, applied = (
        str(epoch[0]),
        str(epoch[1]),
        int(epoch[2]),
        int(epoch[3]),
    )
    lo, hi = applied, min(applied + (limit or CHUNK), members)
    issuance = _account_id(session, "system:issuance", asset)
    window = {"n": number, "lo": lo, "hi": hi}
    if session.get_bind().dialect.name == "postgresql":
        # Row locks in ascending id order, like every other writer: no deadlocks.
        session.execute(
            text(
                # One index lookup per leg (an OR would walk the whole primary key), and
                # the locked ids counted on the server instead of sent to the client.
                "SELECT count(*) FROM (SELECT id FROM accounts WHERE id IN "
                "(SELECT account_id FROM epoch_allocations WHERE epoch = :n AND leg >= :lo "
                "AND leg < :hi UNION ALL SELECT :issuance) ORDER BY id FOR UPDATE) locked"
            ),
            {**window, "issuance": issuance},
        )
    count, total = _move(
        session,
        window,
        envelope_id,
        asset,
        source=issuance,
        table="epoch_allocations",
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
    del total
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
            "FROM epochs WHERE open_envelope_id = :id OR close_envelope_id = :id"
        ),
        {"id": envelope_id},
    ).first()
    count = 0 if row is None else min(int(row[0]), limit)
    return [f"{envelope_id}:{leg}" for leg in range(count)]


def pending_epochs(session: Session) -> list[int]:
    return [
        int(r[0])
        for r in session.execute(text("SELECT number FROM epochs WHERE status = 'opening'"))
    ]


def check_close(session: Session, payload: EpochClose) -> str:
    """Refuse a close that may not happen now; the epoch's asset."""
    row = session.execute(
        text("SELECT status, asset FROM epochs WHERE number = :n"), {"n": payload.epoch}
    ).first()
    if row is None:
        raise NotFound(f"no epoch {payload.epoch}", detail={"epoch": payload.epoch})
    status = str(row[0])
    if status == "closed":
        raise StateConflict(f"epoch {payload.epoch} is already closed")
    if status != "open":
        raise StateConflict(
            f"epoch {payload.epoch} is still {status}: its allocations are being applied",
            detail={"epoch": payload.epoch, "status": status},
        )
    return str(row[1])


def close_epoch(
    session: Session,
    payload: EpochClose,
    envelope_id: str,
    *,
    now: datetime,
    replayed_holds: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Expire what members can spend above the cap, whole, in this transaction.

    Holds pending at this moment are not journaled, so the summary records those that
    limited an expiry (``held``: address → amount held); the auditor's replay passes
    them back as ``replayed_holds`` and derives the same expiries.
    """
    asset = check_close(session, payload)
    cap = session.execute(
        text("SELECT carryover_cap FROM epochs WHERE number = :n"), {"n": payload.epoch}
    ).scalar_one()
    count = total = 0
    held: dict[str, int] = {}
    if cap is not None and replayed_holds:
        held = dict(replayed_holds)
        _check_recorded_holds(session, asset, held, int(cap))
        _shift_pending(session, asset, held, +1)
    if cap is not None:
        expired_account = _account_id(session, "system:expired", asset)
        available = "credits_posted - debits_posted - debits_pending"
        candidates = f"asset = :asset AND address LIKE 'member:%' AND {available} > :cap"
        params = {"asset": asset, "cap": int(cap), "n": payload.epoch}
        if session.get_bind().dialect.name == "postgresql":
            session.execute(
                text(
                    "SELECT count(*) FROM (SELECT id FROM accounts WHERE id = :expired "
                    f"OR ({candidates}) ORDER BY id FOR UPDATE) locked"
                ),
                {**params, "expired": expired_account},
            )
        session.execute(
            text(
                "INSERT INTO epoch_expiries (epoch, leg, account_id, amount) "
                f"SELECT :n, ROW_NUMBER() OVER (ORDER BY address{_binary(session)}) - 1, id, "
                f"{available} - :cap FROM accounts WHERE {candidates}"
            ),
            params,
        )
        members = session.execute(
            text("SELECT count(*) FROM epoch_expiries WHERE epoch = :n"), {"n": payload.epoch}
        ).scalar_one()
        window = {"n": payload.epoch, "lo": 0, "hi": int(members)}
        count, total = _move(
            session,
            window,
            envelope_id,
            asset,
            source=expired_account,
            table="epoch_expiries",
            kind="expiry",
            source_is_debit=False,
            now=now,
        )
        if replayed_holds:
            _shift_pending(session, asset, held, -1)
        else:
            # Every hold that made a member's expiry smaller (or none at all).
            held = {
                str(r[0]): int(r[1])
                for r in session.execute(
                    text(
                        "SELECT address, debits_pending FROM accounts WHERE asset = :asset "
                        "AND address LIKE 'member:%' AND debits_pending > 0 "
                        "AND credits_posted - debits_posted > :cap"
                    ),
                    params,
                )
            }
    session.execute(
        text(
            "UPDATE epochs SET status = 'closed', close_envelope_id = :envelope, "
            "closed_at = :now, expired_members = :count, expired = :total, "
            "last_posting = (SELECT coalesce(max(id), 0) FROM postings) WHERE number = :n"
        ).bindparams(*_timestamps("now")),
        {"envelope": envelope_id, "now": now, "count": count, "total": total, "n": payload.epoch},
    )
    summary: dict[str, Any] = {
        "epoch": payload.epoch,
        "asset": asset,
        "members": count,
        "total": total,
    }
    if held:
        summary["held"] = dict(sorted(held.items()))
    return summary


def _check_recorded_holds(session: Session, asset: str, held: dict[str, int], cap: int) -> None:
    """A journal's recorded holds must be possible: on member accounts with more than the
    cap posted, each positive and at most what the account held available."""
    for address, amount in held.items():
        row = session.execute(
            text(
                "SELECT credits_posted - debits_posted - debits_pending FROM accounts "
                "WHERE address = :address AND asset = :asset AND address LIKE 'member:%'"
            ),
            {"address": address, "asset": asset},
        ).first()
        if (
            not isinstance(amount, int)
            or row is None
            or not 0 < amount <= int(row[0])
            or int(row[0]) <= cap
        ):
            raise StateConflict(
                f"the close records an impossible hold of {amount!r} on {address}",
                detail={"address": address, "held": amount},
            )


def _shift_pending(session: Session, asset: str, held: dict[str, int], sign: int) -> None:
    """Re-create (+1) or remove (−1) the recorded holds' effect on availability, in the
    auditor's replay only, for the duration of the close."""
    session.execute(
        text(
            "UPDATE accounts SET debits_pending = debits_pending + :amount "
            "WHERE address = :address AND asset = :asset"
        ),
        [
            {"amount": sign * amount, "address": address, "asset": asset}
            for address, amount in held.items()
        ],
    )


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
    starts, ends, opened = _utc(row[4]), _utc(row[5]), _utc(row[7])
    assert starts is not None
    assert ends is not None
    assert opened is not None
    return EpochInfo(
        number=int(row[0]),
        asset=str(row[1]),
        allocations=json.loads(row[2]),
        carryover_cap=None if row[3] is None else int(row[3]),
        starts_at=starts,
        ends_at=ends,
        status=str(row[6]),
        opened_at=opened,
        closed_at=_utc(row[8]),
        members=int(row[9]),
        applied=int(row[10]),
        issued=int(row[11]),
        expired_members=int(row[12]),
        expired=int(row[13]),
        first_posting=int(row[14]),
        last_posting=None if row[15] is None else int(row[15]),
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


def _binary(session: Session) -> str:
    """Order strings by code point on both engines, whatever PostgreSQL's collation: the
    auditor derives the same leg numbers from its replay."""
    return ' COLLATE "C"' if session.get_bind().dialect.name == "postgresql" else ""


def _account_id(session: Session, address: str, asset: str) -> int:
    value = session.execute(
        text("SELECT id FROM accounts WHERE address = :address AND asset = :asset"),
        {"address": address, "asset": asset},
    ).scalar_one_or_none()
    if value is None:
        raise NotFound(f"no account {address} for asset {asset}")
    return int(value)


def _move(
    session: Session,
    window: dict[str, int],
    envelope_id: str,
    asset: str,
    *,
    source: int,
    table: str,
    kind: str,
    source_is_debit: bool,
    now: datetime,
) -> tuple[int, int]:
    """Transfers, postings and balances for the legs ``lo <= leg < hi`` of ``table``:
    between each leg's member account and ``source`` (issuance debits, expiry credits)."""
    count, total = session.execute(
        text(
            f"SELECT count(*), coalesce(sum(amount), 0) FROM {table} "
            "WHERE epoch = :n AND leg >= :lo AND leg < :hi"
        ),
        window,
    ).one()
    count, total = int(count), int(total)
    if count == 0:
        return 0, 0
    stamp = _stamp(session, now)
    source_row = session.execute(
        text(
            "SELECT credits_posted - debits_posted, "
            "credits_posted - debits_posted - debits_pending FROM accounts WHERE id = :id"
        ),
        {"id": source},
    ).one()
    balance, available = int(source_row[0]), int(source_row[1])
    params = {
        **window,
        "envelope": envelope_id + ":",
        "asset": asset,
        "source": source,
        "now": stamp,
        "kind": kind,
        "balance": balance,
        "available": available,
    }
    member, other = ("credit_account_id", "debit_account_id")
    if not source_is_debit:
        member, other = other, member
    legs = f"FROM {table} e WHERE e.epoch = :n AND e.leg >= :lo AND e.leg < :hi"
    transfer_id = ":envelope || CAST(e.leg AS VARCHAR(20))"
    session.execute(
        text(
            "INSERT INTO transfers (id, debit_account_id, credit_account_id, asset, amount, "
            "kind, phase, pending_id, state, timeout_at, memo, created_at) "
            f"SELECT {transfer_id}, "
            f"{':source' if other == 'debit_account_id' else 'e.account_id'}, "
            f"{':source' if other == 'credit_account_id' else 'e.account_id'}, "
            f":asset, e.amount, :kind, 'posted', NULL, NULL, NULL, NULL, :now {legs}"
        ),
        params,
    )
    # The member side, computed from balances before this batch's update.
    member_side, sign = ("C", "+") if source_is_debit else ("D", "-")
    session.execute(
        text(
            "INSERT INTO postings (account_id, transfer_id, side, posted, pending, "
            "balance_after, available_after, created_at) "
            f"SELECT e.account_id, {transfer_id}, '{member_side}', e.amount, 0, "
            f"a.credits_posted - a.debits_posted {sign} e.amount, "
            f"a.credits_posted - a.debits_posted - a.debits_pending {sign} e.amount, :now "
            f"FROM {table} e JOIN accounts a ON a.id = e.account_id "
            "WHERE e.epoch = :n AND e.leg >= :lo AND e.leg < :hi"
        ),
        params,
    )
    # The source side: one posting per leg, its balance running in leg order.
    source_side, run = ("D", "-") if source_is_debit else ("C", "+")
    session.execute(
        text(
            "INSERT INTO postings (account_id, transfer_id, side, posted, pending, "
            "balance_after, available_after, created_at) "
            f"SELECT :source, {transfer_id}, '{source_side}', e.amount, 0, "
            f":balance {run} SUM(e.amount) OVER (ORDER BY e.leg), "
            f":available {run} SUM(e.amount) OVER (ORDER BY e.leg), :now {legs}"
        ),
        params,
    )
    column = "credits_posted" if source_is_debit else "debits_posted"
    session.execute(
        text(
            f"UPDATE accounts SET {column} = accounts.{column} + e.amount "
            f"FROM {table} e WHERE accounts.id = e.account_id AND e.epoch = :n "
            "AND e.leg >= :lo AND e.leg < :hi"
        ),
        window,
    )
    source_column = "debits_posted" if source_is_debit else "credits_posted"
    session.execute(
        text(f"UPDATE accounts SET {source_column} = {source_column} + :total WHERE id = :id"),
        {"total": total, "id": source},
    )
    return count, total


def _stamp(session: Session, now: datetime) -> Any:
    return Driver(session).timestamp(now)
