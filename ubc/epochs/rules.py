"""Rules of allocation epochs: ``epoch.open`` and ``epoch.close`` (operator only).

What they do is set-based (``ubc.epochs.service`` over ``ubc.ledger.bulk``); the rules
check that the epoch may open or close now and say so as data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ubc.epochs.payloads import EpochClose, EpochOpen
from ubc.errors import BadRequest, NotFound, StateConflict
from ubc.rules import Change, Lookup, Plan, RuleContext, RuleSpec, Signers, require_operator
from ubc.rules.payload import parse_timestamp

OPEN_STATES = ("opening", "open")


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
    """Expire what members can spend above the cap. ``held_elsewhere``: holds pending
    outside the ledger's tables at this moment (address → amount), which limit expiries
    as a pending hold does: none on the server, the journal's record in a re-run."""

    payload: EpochClose
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
    if status == "closed":
        raise StateConflict(f"epoch {payload.epoch} is already closed")
    if status != "open":
        raise StateConflict(
            f"epoch {payload.epoch} is still {status}: its allocations are being applied",
            detail={"epoch": payload.epoch, "status": status},
        )
    # Holds are not journaled; the close's entry records those that limited an expiry.
    record = ctx.record_of(payload.id)
    summary = (record.summary if record is not None else None) or {}
    held = summary.get("held", {})
    return Plan(changes=(EpochClosed(payload, held),))


RULES = (
    RuleSpec("epoch.open", EpochOpen, epoch_open),
    RuleSpec("epoch.close", EpochClose, epoch_close),
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
    epoch: int, asset: str, members: int, total: int, held: Mapping[str, int]
) -> dict[str, Any]:
    """The journal's summary of an ``epoch.close``: what expired, and the holds that
    limited it (address → amount), if any."""
    summary: dict[str, Any] = {"epoch": epoch, "asset": asset, "members": members, "total": total}
    if held:
        summary["held"] = dict(sorted(held.items()))
    return summary


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
