"""Rules of the compute market (stub)."""

from __future__ import annotations

from ubc.envelopes.payloads import Payload
from ubc.envelopes.rules import Plan, Signers, State
from ubc.errors import BadRequest


def offer_create(state: State, payload: Payload, signers: Signers) -> Plan:
    raise BadRequest("offer.create is not implemented yet")


def offer_fill(state: State, payload: Payload, signers: Signers) -> Plan:
    raise BadRequest("offer.fill is not implemented yet")


def offer_cancel(state: State, payload: Payload, signers: Signers) -> Plan:
    raise BadRequest("offer.cancel is not implemented yet")


def offer_expire(state: State, payload: Payload, signers: Signers) -> Plan:
    raise BadRequest("offer.expire is not implemented yet")
