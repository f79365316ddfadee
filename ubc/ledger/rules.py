"""Rules of the ledger's own payload types: moving value, and the ledger's configuration.

``ledger.genesis`` and ``ledger.config`` live here because what they set is the ledger's
own state (its assets, its system accounts, the configuration in force that every domain
reads: model prices, the market fee, the CU price), and their type names say so. Genesis
is entry 0, written once by :func:`ubc.envelopes.service.write_genesis`: it has a schema
but no rule, and never comes through the write path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ubc.errors import BadRequest, Forbidden, IdempotencyConflict, MissingSignature, StateConflict
from ubc.ledger.payloads import Deposit, LedgerConfig, LedgerGenesis, TransferPayload, Withdrawal
from ubc.rules import (
    Change,
    Leg,
    Lookup,
    Plan,
    RuleContext,
    RuleSpec,
    Signers,
    active_member,
    actor_handle,
    require_operator,
    require_status,
    require_steward,
)
from ubc.rules.payload import payload_json


@dataclass(frozen=True, slots=True)
class RefUse:
    """Who used an external reference: an envelope, or one planned earlier in the batch."""

    envelope_id: str
    earlier_in_batch: bool = False


class LedgerLookup(Lookup, Protocol):
    def external_ref(self, ref: str) -> RefUse | None:
        """The use of a deposit's or withdrawal's external reference, if any."""
        ...


@dataclass(frozen=True, slots=True)
class RefClaimed(Change):
    """An external reference taken by a deposit or withdrawal (once per ledger)."""

    ref: str
    envelope_id: str


@dataclass(frozen=True, slots=True)
class ConfigStored(Change):
    """A new configuration in force from this envelope on."""

    envelope_id: str
    body: dict[str, Any]


def transfer(
    look: LedgerLookup, ctx: RuleContext, payload: TransferPayload, signers: Signers
) -> Plan:
    handle = active_member(look, payload.actor, signers)
    own = f"member:{handle}"
    if payload.from_.startswith("cause:"):
        require_steward(look, payload.from_, handle)
    elif payload.from_ != own:
        raise Forbidden(
            f"{payload.actor} may not move funds of {payload.from_}",
            detail={"account": payload.from_},
        )
    if payload.to == payload.from_:
        raise BadRequest("a transfer needs two different accounts")
    kind = "donation" if payload.to.startswith("cause:") else "transfer"
    leg = Leg(payload.from_, payload.to, payload.asset, payload.amount, kind, payload.memo)
    return Plan(operations=(leg,))


def deposit(look: LedgerLookup, ctx: RuleContext, payload: Deposit, signers: Signers) -> Plan:
    require_operator(payload, signers)
    _claim_ref(look, payload.external_ref, payload.id)
    leg = Leg(
        "system:deposits",
        payload.to,
        payload.asset,
        payload.amount,
        "deposit",
        f"external_ref {payload.external_ref}",
    )
    return Plan(operations=(leg,), changes=(RefClaimed(payload.external_ref, payload.id),))


def withdrawal(look: LedgerLookup, ctx: RuleContext, payload: Withdrawal, signers: Signers) -> Plan:
    owner = actor_handle(payload.from_) if payload.from_.startswith("member:") else None
    if owner is None:
        raise Forbidden("withdrawals are from member accounts")
    if not signers.operator or owner not in signers.current:
        raise MissingSignature(
            "a withdrawal needs the signatures of the account owner and of the operator",
            detail={"owner_signed": owner in signers.current, "operator_signed": signers.operator},
        )
    if payload.actor not in ("operator", payload.from_):
        raise Forbidden(f"actor {payload.actor} did not sign this withdrawal")
    require_status(look, owner)
    _claim_ref(look, payload.external_ref, payload.id)
    leg = Leg(
        payload.from_,
        "system:deposits",
        payload.asset,
        payload.amount,
        "withdrawal",
        f"external_ref {payload.external_ref}",
    )
    return Plan(operations=(leg,), changes=(RefClaimed(payload.external_ref, payload.id),))


def ledger_config(
    look: LedgerLookup, ctx: RuleContext, payload: LedgerConfig, signers: Signers
) -> Plan:
    """A change of prices, market fee or CU price (ledger key and an operator key)."""
    if not signers.ledger or not signers.operator:
        raise MissingSignature("ledger.config needs the signatures of the ledger and the operator")
    if payload.actor != "ledger":
        raise Forbidden("actor must be ledger")
    body = payload_json(payload)
    current = look.config()
    for name in ("ledger_public_key", "operator_public_keys", "enrollment", "assets"):
        if body[name] != current.get(name):
            raise StateConflict(
                f"ledger.config cannot change {name} (only models, market_fee_bps and "
                "cu_price_usd)",
                detail={"field": name},
            )
    return Plan(changes=(ConfigStored(payload.id, body),))


RULES = (
    RuleSpec("ledger.genesis", LedgerGenesis, None, submit="genesis"),
    RuleSpec("ledger.config", LedgerConfig, ledger_config, submit="ledger"),
    RuleSpec("transfer", TransferPayload, transfer),
    RuleSpec("deposit", Deposit, deposit),
    RuleSpec("withdrawal", Withdrawal, withdrawal),
)


def _claim_ref(look: LedgerLookup, ref: str, envelope_id: str) -> None:
    used = look.external_ref(ref)
    if used is None:
        return
    if used.earlier_in_batch:
        raise IdempotencyConflict(f"external_ref {ref!r} is already used in this batch")
    if used.envelope_id != envelope_id:
        raise IdempotencyConflict(
            f"external_ref {ref!r} was already used by envelope {used.envelope_id}",
            detail={"external_ref": ref, "envelope_id": used.envelope_id},
        )
