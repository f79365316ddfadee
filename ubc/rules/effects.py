"""What a rule returns: the ledger operations it derives and the state it changes, as data.

A rule never writes. It returns a :class:`Plan`; the write path's applier carries it out
(``ubc.envelopes.applier``): the operations through the one posting engine
(``ubc.ledger``), the changes through the writer each domain registers for its change
types, holds the journal does not carry placed first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class Leg:
    """A new transfer. With ``timeout`` it is a hold (pending) that expires by itself.

    A hold with ``min_amount`` reserves as much of ``amount`` as the debit account can
    afford, and fails only when that is less than ``min_amount`` (the model endpoint
    clamps a call's ``max_tokens`` to it); its effect records the amount held.
    """

    debit: str
    credit: str
    asset: str
    amount: int
    kind: str
    memo: str | None = None
    timeout: timedelta | None = None
    min_amount: int | None = None


@dataclass(frozen=True, slots=True)
class Post:
    """Post a hold for ``amount`` (default: all of it); the rest is released."""

    pending_id: str
    amount: int | None = None


@dataclass(frozen=True, slots=True)
class Void:
    """Release a hold. ``expired`` marks the release done by the expiry sweeper."""

    pending_id: str
    expired: bool = False


Operation = Leg | Post | Void


class Change:
    """A change of state a rule wants made (a member created, a grant stored, …).

    Each domain subclasses it with frozen dataclasses of its own and registers a writer
    for each (``ubc.envelopes.registry``); the rule only describes the change.
    """

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HoldPlacement:
    """A hold the journal never carried, placed just before the plan's operations.

    Holds are reservations, not journaled (DESIGN section 5): a re-run of a journal
    re-places the hold a ``usage`` or ``hold.expire`` entry settles, from what the entry
    records (:attr:`ubc.rules.context.RuleContext.recorded`), as of ``at``.
    """

    request_id: str
    leg: Leg
    at: datetime


@dataclass(frozen=True, slots=True)
class Plan:
    """What an accepted payload does.

    ``operations`` move value (one linked ledger request named by the envelope id);
    ``changes`` change state once the operations applied (or on their own, in a
    savepoint, when there are none); ``holds`` are placed before the operations;
    ``accounts`` are the accounts the journal entry concerns beyond those the operations
    touch (their owners may read it).
    """

    operations: tuple[Operation, ...] = ()
    accounts: frozenset[str] = frozenset()
    changes: tuple[Change, ...] = ()
    holds: tuple[HoldPlacement, ...] = ()
