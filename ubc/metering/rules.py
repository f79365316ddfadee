"""Rules of metered calls: ``usage`` posts a call's hold for its cost, ``hold.expire``
releases one that timed out unbilled. Both are signed by the ledger key alone.

A call's hold is a reservation, not journaled (DESIGN section 5): the live ledger has it
in its tables, placed by the gateway. A re-run of the journal has not; the entry's record
(:class:`ubc.rules.Recorded`, supplied by the auditor) says what it was, and the rule
asks for it to be placed first (:class:`ubc.rules.HoldPlacement`).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol

from ubc.errors import BadRequest, Forbidden, NotFound
from ubc.metering.payloads import HoldExpire, Usage
from ubc.rules import (
    Change,
    HoldPlacement,
    Leg,
    Lookup,
    Operation,
    Plan,
    Post,
    RuleContext,
    RuleSpec,
    Signers,
    Void,
    require_ledger,
)

#: The asset models are priced in and paid with.
COMPUTE_ASSET = "CU"
# How long a hold re-placed from a journal's record lives (it is settled at once).
_RECORDED_HOLD = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Grant:
    """What usage looks at of an API-key grant (never changes once granted)."""

    account: str
    scopes: str
    models: str | None
    spend_cap_per_epoch: int | None


class MeteringLookup(Lookup, Protocol):
    def grant(self, key_hash: str) -> Grant | None: ...

    def spend_epoch(self) -> int:
        """The epoch a call's spend counts toward: the latest opened (0 before the first)."""
        ...

    def spent(self, key_hash: str, epoch: int) -> int:
        """What the key spent in ``epoch``, with the usage planned before in the batch."""
        ...


@dataclass(frozen=True, slots=True)
class UsageRecorded(Change):
    """One billed call, as ``usage_records`` keeps it (written once per batch)."""

    request_id: str
    envelope_id: str
    account: str
    key_hash: str
    model: str
    epoch: int
    input_tokens: int
    output_tokens: int
    held: int
    cost: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SpendAdded(Change):
    """A capped key spent ``amount`` more in ``epoch``."""

    key_hash: str
    epoch: int
    amount: int


@dataclass(frozen=True, slots=True)
class CallSettled(Change):
    """A call in flight is settled: it leaves ``gateway_holds`` (once per batch)."""

    request_id: str


#: The scope an API key needs for metered model calls.
MODELS_SCOPE = "models"


def grant_refusal(
    scopes: Collection[str], models: Collection[str] | None, model: str | None
) -> Literal["scope", "model"] | None:
    """Why a grant may not call ``model`` (``None``: not checked yet, the scope only):
    ``"scope"`` without the ``models`` scope, ``"model"`` when its model list leaves the
    model out; ``None`` when it may. The endpoint (before the hold) and the ``usage``
    rule (server and auditor) both ask this."""
    if MODELS_SCOPE not in scopes:
        return "scope"
    if model is not None and models is not None and model not in models:
        return "model"
    return None


def key_refusal(
    revoked: bool, expires_at: datetime | None, now: datetime
) -> Literal["revoked", "expired"] | None:
    """Why a key cannot be used at ``now`` (revoked, or past its expiry); ``None`` when it
    can. The endpoint (from its 2 s cache of grants) and the hold (under the grant's row
    lock) both ask this."""
    if revoked:
        return "revoked"
    if expires_at is not None and expires_at <= now:
        return "expired"
    return None


def usage_cost(input_tokens: int, output_tokens: int, price: dict[str, int]) -> int:
    """``ceil((input × in_price + output × out_price) / 1000)`` CU (DESIGN section 4)."""
    return -(-(input_tokens * price["input"] + output_tokens * price["output"]) // 1000)


def hold_request_id(request_id: str) -> str:
    """The ledger request of a model call's hold; its one leg is ``<this>:0``."""
    return f"hold:{request_id}"


def call_cost(input_tokens: int, output_tokens: int, price: dict[str, int], held: int) -> int:
    """What a call is billed: its cost at ``price``, never more than its hold."""
    return min(usage_cost(input_tokens, output_tokens, price), held)


def usage(look: MeteringLookup, ctx: RuleContext, payload: Usage, signers: Signers) -> Plan:
    """A metered call: checked against its grant and the prices in force, then its hold is
    posted for ``cost`` (the rest released)."""
    require_ledger(payload, signers)
    grant = look.grant(payload.key_hash)
    if grant is None:
        raise NotFound("no API key grant with this hash", detail={"key_hash": payload.key_hash})
    if grant.account != payload.account:
        raise Forbidden(
            f"the key is granted on {grant.account}, not {payload.account}",
            detail={"account": payload.account, "granted": grant.account},
        )
    models = json.loads(grant.models) if grant.models is not None else None
    refusal = grant_refusal(grant.scopes.split(","), models, payload.model)
    if refusal == "scope":
        raise Forbidden("the key has no `models` scope")
    if refusal == "model":
        raise Forbidden(f"the key may not use model {payload.model}")
    price = look.config().get("models", {}).get(payload.model)
    if price is None:
        raise BadRequest(f"model {payload.model} has no published price")
    expected = call_cost(payload.input_tokens, payload.output_tokens, price, payload.held)
    if payload.cost != expected:
        raise BadRequest(
            f"cost {payload.cost} does not match the prices in force: {expected}",
            detail={"cost": payload.cost, "expected": expected, "price": price},
        )
    epoch = look.spend_epoch()
    cap = grant.spend_cap_per_epoch
    changes: list[Change] = [
        UsageRecorded(
            payload.request_id,
            payload.id,
            payload.account,
            payload.key_hash,
            payload.model,
            epoch,
            payload.input_tokens,
            payload.output_tokens,
            payload.held,
            payload.cost,
            ctx.now,
        ),
        CallSettled(payload.request_id),
    ]
    if cap is not None:
        spent = look.spent(payload.key_hash, epoch)
        if spent + payload.cost > cap:
            raise Forbidden(
                f"the key's spend cap of {cap} per epoch would be exceeded",
                detail={"cap": cap, "spent": spent, "cost": payload.cost},
            )
        # Counted as soon as planned: the next usage of this key in the batch sees it.
        changes.append(SpendAdded(payload.key_hash, epoch, payload.cost))
    hold_id = f"{hold_request_id(payload.request_id)}:0"
    operation: Operation = Post(hold_id, payload.cost) if payload.cost else Void(hold_id)
    holds: tuple[HoldPlacement, ...] = ()
    if ctx.record_of(payload.id) is not None:
        hold = Leg(
            payload.account,
            "system:consumption",
            COMPUTE_ASSET,
            payload.held,
            "usage",
            timeout=_RECORDED_HOLD,
        )
        holds = (HoldPlacement(hold_request_id(payload.request_id), hold, ctx.now),)
    return Plan(
        operations=(operation,),
        accounts=frozenset({payload.account}),
        changes=tuple(changes),
        holds=holds,
    )


def hold_expire(
    look: MeteringLookup, ctx: RuleContext, payload: HoldExpire, signers: Signers
) -> Plan:
    """A model call's hold that timed out: released unbilled (the operator bears it)."""
    require_ledger(payload, signers)
    request_id = payload.hold_id.removeprefix("hold:").removesuffix(":0")
    holds: tuple[HoldPlacement, ...] = ()
    record = ctx.record_of(payload.id)
    if record is not None:
        # The entry's own effect says what the hold was.
        effects = record.effects
        if len(effects) != 1 or effects[0].get("pending_id") != payload.hold_id:
            raise BadRequest("the entry does not record the hold it releases")
        effect = effects[0]
        hold = Leg(
            effect["debit"],
            effect["credit"],
            effect["asset"],
            effect["amount"],
            "usage",
            timeout=timedelta(seconds=1),
        )
        # Placed as of a moment before this entry, so that it has expired by now.
        at = ctx.now - timedelta(seconds=2)
        holds = (HoldPlacement(hold_request_id(request_id), hold, at),)
    return Plan(
        operations=(Void(payload.hold_id, expired=True),),
        changes=(CallSettled(request_id),),
        holds=holds,
    )


RULES = (
    RuleSpec("usage", Usage, usage, submit="ledger"),
    RuleSpec("hold.expire", HoldExpire, hold_expire, submit="ledger"),
)
