"""Rules of causes: registration by the operator, and what stewards may do (stub)."""

from __future__ import annotations

from ubc.envelopes.payloads import Payload
from ubc.envelopes.rules import Plan, Signers, State
from ubc.errors import BadRequest, Forbidden


def cause_register(state: State, payload: Payload, signers: Signers) -> Plan:
    raise BadRequest("cause.register is not implemented yet")


def cause_update(state: State, payload: Payload, signers: Signers) -> Plan:
    raise BadRequest("cause.update is not implemented yet")


def require_steward(state: State, account: str, handle: str) -> None:
    """Forbidden unless ``member:handle`` is a steward of the cause ``account``."""
    raise Forbidden(f"only a steward of {account} may act for it", detail={"account": account})
