"""Rules of causes: registration by the operator, and what stewards may do.

``cause.register`` and ``cause.update`` are signed by the operator; their stewards must
be existing members (any status: a suspended steward simply cannot sign). Registering
opens ``cause:<slug>`` in every asset of the ledger. Donations are plain transfers to
``cause:<slug>`` (kind ``donation``: see ``ubc.ledger.rules.transfer``); a steward signs
transfers and API-key grants from the cause's account, which
:func:`ubc.rules.require_steward` authorizes.

Causes change only through envelopes that apply alone (no ledger operations), so every
later envelope of the same batch sees them: no per-batch cache is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ubc.causes.payloads import CauseRegister, CauseUpdate
from ubc.errors import BadRequest, Conflict, NotFound
from ubc.rules import Change, Lookup, Plan, RuleContext, RuleSpec, Signers, require_operator

CAUSE_PREFIX = "cause:"


def cause_address(slug: str) -> str:
    return f"{CAUSE_PREFIX}{slug}"


class CausesLookup(Lookup, Protocol):
    def cause_exists(self, slug: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class CauseStored(Change):
    """A cause registered (``created``, with its accounts in ``assets``) or updated, and
    its stewards (sorted) replacing the previous ones."""

    slug: str
    name: str
    description: str
    envelope_id: str
    stewards: tuple[str, ...]
    created: bool
    assets: tuple[str, ...] = ()


def cause_register(
    look: CausesLookup, ctx: RuleContext, payload: CauseRegister, signers: Signers
) -> Plan:
    require_operator(payload, signers)
    if look.cause_exists(payload.slug):
        raise Conflict(f"cause {payload.slug} is already registered", detail={"slug": payload.slug})
    stewards = _check_stewards(look, payload.stewards)
    stored = CauseStored(
        payload.slug,
        payload.name,
        payload.description,
        payload.id,
        stewards,
        created=True,
        assets=ctx.assets,
    )
    return Plan(accounts=frozenset({cause_address(payload.slug)}), changes=(stored,))


def cause_update(
    look: CausesLookup, ctx: RuleContext, payload: CauseUpdate, signers: Signers
) -> Plan:
    require_operator(payload, signers)
    if not look.cause_exists(payload.slug):
        raise NotFound(f"no cause {payload.slug}", detail={"slug": payload.slug})
    stewards = _check_stewards(look, payload.stewards)
    stored = CauseStored(
        payload.slug, payload.name, payload.description, payload.id, stewards, created=False
    )
    return Plan(accounts=frozenset({cause_address(payload.slug)}), changes=(stored,))


RULES = (
    RuleSpec("cause.register", CauseRegister, cause_register),
    RuleSpec("cause.update", CauseUpdate, cause_update),
)


def _check_stewards(look: CausesLookup, handles: list[str]) -> tuple[str, ...]:
    if len(set(handles)) != len(handles):
        raise BadRequest("stewards are listed twice", detail={"stewards": handles})
    for handle in handles:
        if look.member(handle) is None:
            raise NotFound(
                f"no member {handle}: stewards must be members", detail={"handle": handle}
            )
    return tuple(sorted(handles))
