"""Rules of allocation epochs: ``epoch.open`` and ``epoch.close`` (operator only), and
``epoch.expire``, the steps of a close that the ledger signs itself.

What they do is set-based (``ubc.epochs.service`` over ``ubc.ledger.bulk``); the rules
check that the epoch may open or close now and say so as data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ubc.epochs.payloads import EpochClose, EpochExpire, EpochOpen
from ubc.errors import BadRequest, NotFound, StateConflict
from ubc.rules import (
    Change,
    Lookup,
    Plan,
    RuleContext,
    RuleSpec,
    Signers,
    require_ledger,
    require_operator,
)
from ubc.rules.payload import parse_timestamp

# An epoch is ``opening`` while its allocations are applied, then ``open``, then
# ``closing`` while its expiry steps run, then ``closed``. Only one is not closed at a time.
OPEN_STATES = ("opening", "open", "closing")
# After every member address in code-point order (";" follows ":"): a close's first step
# that a journal records without a ``through`` covered every member account.
END_OF_MEMBERS = "member;"


class EpochsLookup(Lookup, Protocol):
    def asset_exists(self, code: str) -> bool: ...

    def latest_epoch(self) -> tuple[int, str] | None:
        """The number and status of the latest epoch, if any."""
        ...

    def epoch_state(self, number: int) -> tuple[str, str] | None:
        """The status and asset of an epoch, if it exists."""
        ...


@dataclass(frozen=True, slots=True)
class EpochOpened(Change):
    """The epoch's allocations fixed; applied at once up to ``allocate_at_once`` members
    (None: however many), else in the background."""

    payload: EpochOpen
    allocate_at_once: int | None


@dataclass(frozen=True, slots=True)
class EpochClosed(Change):
    """The close, and its first step: expire what the first member accounts (in address
    order) can spend above the cap; the epoch is ``closed`` if that was all of them, else
    ``closing`` until ``epoch.expire`` steps have covered the rest. ``through``: where
    the first step ends, as the journal recorded it (a re-run); None on the server, which
    chooses. ``held_elsewhere``: holds of model calls pending on those accounts at this
    moment (address → amount; they are not journaled), which limit expiries as any
    pending hold does: none on the server, the journal's record in a re-run."""

    payload: EpochClose
    held_elsewhere: Mapping[str, int] = field(default_factory=dict)
    through: str | None = None


@dataclass(frozen=True, slots=True)
class EpochExpired(Change):
    """A later step of a close: the same over the member accounts in the step's range."""

    payload: EpochExpire
    held_elsewhere: Mapping[str, int] = field(default_factory=dict)


def epoch_open(look: EpochsLookup, ctx: RuleContext, payload: EpochOpen, signers: Signers) -> Plan:
    require_operator(payload, signers)
    if parse_timestamp(payload.ends_at) <= parse_timestamp(payload.starts_at):
        raise BadRequest("ends_at must be after starts_at")
    if not look.asset_exists(payload.asset):
        raise NotFound(f"no asset {payload.asset}", detail={"asset": payload.asset})
    latest = look.latest_epoch()
    if latest is not None:
        number, status = latest
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
    return Plan(changes=(EpochOpened(payload, ctx.allocate_at_once),))


def epoch_close(
    look: EpochsLookup, ctx: RuleContext, payload: EpochClose, signers: Signers
) -> Plan:
    require_operator(payload, signers)
    state = look.epoch_state(payload.epoch)
    if state is None:
        raise NotFound(f"no epoch {payload.epoch}", detail={"epoch": payload.epoch})
    status = state[0]
    if status in ("closing", "closed"):
        raise StateConflict(
            f"epoch {payload.epoch} is already {status}",
            detail={"epoch": payload.epoch, "status": status},
        )
    if status != "open":
        raise StateConflict(
            f"epoch {payload.epoch} is still {status}: its allocations are being applied",
            detail={"epoch": payload.epoch, "status": status},
        )
    held, through = _recorded_step(ctx, payload.id)
    return Plan(changes=(EpochClosed(payload, held, through),))


def epoch_expire(
    look: EpochsLookup, ctx: RuleContext, payload: EpochExpire, signers: Signers
) -> Plan:
    """A step of a close. That ``after`` is where the previous step ended is checked by
    the writer, which reads the close's progress in the same transaction."""
    require_ledger(payload, signers)
    state = look.epoch_state(payload.epoch)
    if state is None:
        raise NotFound(f"no epoch {payload.epoch}", detail={"epoch": payload.epoch})
    if state[0] != "closing":
        raise StateConflict(
            f"epoch {payload.epoch} is {state[0]}, not closing",
            detail={"epoch": payload.epoch, "status": state[0]},
        )
    if payload.through < payload.after:
        raise BadRequest("through must not come before after", detail={"after": payload.after})
    held, _ = _recorded_step(ctx, payload.id)
    return Plan(changes=(EpochExpired(payload, held),))


def _recorded_step(ctx: RuleContext, envelope_id: str) -> tuple[dict[str, int], str | None]:
    """In a re-run, what the journal recorded of a close step: the holds of model calls
    that limited an expiry (they are not journaled), and where a close's first step ended
    if it did not close the epoch."""
    record = ctx.record_of(envelope_id)
    summary = (record.summary if record is not None else None) or {}
    held = summary.get("held", {})
    through = summary.get("through")
    if not isinstance(held, dict) or not (through is None or isinstance(through, str)):
        raise BadRequest("the entry's summary does not say what the close step did")
    if record is not None and through is None:
        through = END_OF_MEMBERS
    return held, through


RULES = (
    RuleSpec("epoch.open", EpochOpen, epoch_open),
    RuleSpec("epoch.close", EpochClose, epoch_close),
    RuleSpec("epoch.expire", EpochExpire, epoch_expire, submit="ledger"),
)


# --- what an open and a close compute, for the set-based SQL and the auditor alike ------
#
# ``ubc.epochs.service`` computes allocations and expiries in set-based SQL over every
# member at once; the auditor's in-memory state computes them member by member. Both
# build their summaries and check a journal's recorded holds with these functions, and the
# SQL's per-member arithmetic is the one :func:`allocation_for` and :func:`expiry_for` say.


def allocation_for(status: str, tier: str | None, allocations: Mapping[str, int]) -> int | None:
    """What an epoch allocates to a member: its tier's amount if it is active and its tier
    has one, else nothing."""
    if status != "active" or tier is None:
        return None
    return allocations.get(tier)


def expiry_for(available: int, held_elsewhere: int, cap: int) -> int:
    """What a close expires of a member's account: what it can spend above the cap, less
    what holds outside the ledger's tables keep (never below zero)."""
    return max(available - held_elsewhere - cap, 0)


def open_summary(payload: EpochOpen, by_tier: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """The journal's summary of an ``epoch.open``: members and total, per tier too."""
    return {
        "epoch": payload.epoch,
        "asset": payload.asset,
        "members": sum(count for count, _ in by_tier.values()),
        "total": sum(total for _, total in by_tier.values()),
        "tiers": {
            tier: {
                "members": by_tier.get(tier, (0, 0))[0],
                "amount": payload.allocations[tier],
                "total": by_tier.get(tier, (0, 0))[1],
            }
            for tier in sorted(payload.allocations)
        },
    }


def close_summary(
    epoch: int, asset: str, members: int, total: int, held: Mapping[str, int], through: str | None
) -> dict[str, Any]:
    """The journal's summary of an ``epoch.close``: what its first step expired, the holds
    that limited it (address → amount), if any, and, if the epoch is still closing, where
    that step ended (``through``)."""
    summary: dict[str, Any] = {"epoch": epoch, "asset": asset, "members": members, "total": total}
    if held:
        summary["held"] = dict(sorted(held.items()))
    if through is not None:
        summary["through"] = through
    return summary


def expire_summary(
    epoch: int, asset: str, members: int, total: int, held: Mapping[str, int], closed: bool
) -> dict[str, Any]:
    """The journal's summary of an ``epoch.expire`` step: what expired, the holds that
    limited it (address → amount), if any, and whether this step closed the epoch."""
    summary: dict[str, Any] = {
        "epoch": epoch,
        "asset": asset,
        "members": members,
        "total": total,
        "closed": closed,
    }
    if held:
        summary["held"] = dict(sorted(held.items()))
    return summary


def check_step(number: int, status: str, cursor: str | None, after: str) -> None:
    """A later step of a close must continue it: the epoch is closing and the step starts
    where the close has come to."""
    if status != "closing":
        raise StateConflict(f"epoch {number} is {status}, not closing")
    if cursor != after:
        raise StateConflict(
            f"the close of epoch {number} has reached {cursor!r}, not {after!r}",
            detail={"epoch": number, "cursor": cursor},
        )


def check_held_in_step(held: Mapping[str, int], after: str, through: str) -> None:
    """The holds a journal's close step records are on accounts of that step."""
    for address in held:
        if not after < address <= through:
            raise StateConflict(
                f"the close records a hold on {address}, outside its step",
                detail={"address": address},
            )


def check_recorded_hold(address: str, amount: object, available: int | None, cap: int) -> None:
    """A hold a journal's close records must be possible: on a member account (whose
    ``available`` is known) with more than the cap available, positive and at most what
    the account had available."""
    if (
        not isinstance(amount, int)
        or isinstance(amount, bool)
        or available is None
        or not 0 < amount <= available
        or available <= cap
    ):
        raise StateConflict(
            f"the close records an impossible hold of {amount!r} on {address}",
            detail={"address": address, "held": amount},
        )
