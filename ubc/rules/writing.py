"""The write path as the domains see it: its context, its answers, and its interfaces.

The write path itself (``ubc.envelopes``: decode, verify, group commit, apply, journal)
sits above the domains. A domain whose own work ends in a journal entry (the market's
offer expiry and stored withdrawals, the gateway's usage and hold expiry) depends only on
what is here: the data types, signing a payload, and the small interfaces
(:class:`Submit`, :class:`Precheck`, :class:`InternalWriter`) that ``ubc.envelopes``
implements and ``ubc.app`` (the top) hands in. ``ubc.envelopes.service`` re-exports the
names of this module, where they were first defined.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from nacl.signing import SigningKey

from ubc.errors import UbcError
from ubc.rules.payload import Payload, format_timestamp, payload_json
from ubc.signing import (
    Envelope,
    NoteSigner,
    canonical_json,
    key_id,
    payload_type_for,
    sign_envelope,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


@dataclass(frozen=True, slots=True)
class LedgerContext:
    """What the write path needs to know about this ledger."""

    origin: str
    ledger_public_key: bytes
    operator_keys: dict[str, bytes]
    enrollment: str
    skew: timedelta
    assets: tuple[str, ...]
    # The server signs with it; an auditor replaying a journal has only the public key.
    ledger_key: SigningKey | None = None
    # How long a member-signed withdrawal may wait for the operator's countersignature.
    withdrawal_window: timedelta = timedelta(days=7)

    @property
    def ledger_keyid(self) -> str:
        return key_id(self.ledger_public_key)

    @property
    def note_signer(self) -> NoteSigner:
        if self.ledger_key is None:
            raise RuntimeError("this context has no ledger signing key")
        return NoteSigner(self.origin, self.ledger_key)


@dataclass(slots=True)
class Receipt:
    """The answer to an accepted envelope: ``{seq, id, type, effects}``."""

    id: str
    type: str
    effects: list[dict[str, Any]]
    seq: int = -1
    actor: str = ""
    # Accounts the entry concerns: their owners may read it.
    accounts: frozenset[str] = frozenset()
    # Instead of effects, for an epoch over many members (count and total per tier).
    summary: dict[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        body = {"seq": self.seq, "id": self.id, "type": self.type, "effects": self.effects}
        if self.summary is not None:
            body["summary"] = self.summary
        return body


@dataclass(frozen=True, slots=True)
class Accepted:
    """An accepted envelope; ``repeated`` when its id was accepted before (idempotency)."""

    receipt: Receipt
    repeated: bool

    @property
    def status_code(self) -> int:
        return 200 if self.repeated else 201


Outcome = Accepted | UbcError


@dataclass(slots=True)
class Decoded:
    """An envelope decoded: its payload validated against the schema of its type."""

    index: int
    envelope: Envelope
    type: str
    payload: Payload
    payload_hash: bytes


@dataclass(frozen=True, slots=True)
class Prechecked:
    """An envelope decoded and its signatures verified before the write transaction.

    ``internal`` marks the server's own ledger-signed envelopes (usage, expiries).
    """

    decoded: Decoded | UbcError
    verified: frozenset[str]
    internal: bool = False


def payload_hash(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


def sign_payload(payload: Payload, type_: str, keys: Sequence[SigningKey]) -> Envelope:
    """The DSSE envelope of ``payload`` (RFC 8785 canonical bytes) signed by ``keys``."""
    body = canonical_json(payload_json(payload))
    return sign_envelope(payload_type_for(type_), body, keys)


P = TypeVar("P", bound=Payload)


def ledger_payload(ctx: LedgerContext, kind: type[P], now: datetime, **fields: Any) -> P:
    """A payload the ledger itself writes (``actor`` ``ledger``, a fresh id, created
    ``now``) with ``fields``, checked against its type ``kind``."""
    common = {
        "ledger": ctx.origin,
        "id": str(uuid.uuid4()),
        "created_at": format_timestamp(now),
        "actor": "ledger",
    }
    return kind.model_validate({**common, **fields})


def sign_internal(ctx: LedgerContext, payload: Payload, type_: str) -> Prechecked:
    """The server's own envelope: ``payload`` signed with the ledger key, ready to submit
    (its signature is not checked again: it was made just now)."""
    assert ctx.ledger_key is not None
    envelope = sign_payload(payload, type_, [ctx.ledger_key])
    return Prechecked(
        Decoded(-1, envelope, type_, payload, payload_hash(envelope.payload)),
        frozenset({ctx.ledger_keyid}),
        internal=True,
    )


# --- the interfaces ubc.envelopes implements ---------------------------------------------


class Submit(Protocol):
    """Check, apply and journal envelopes in the caller's unit of work
    (``ubc.envelopes.service.submit``)."""

    def __call__(
        self,
        session: Session,
        ctx: LedgerContext,
        raws: Sequence[object],
        *,
        now: datetime | None = None,
        internal: bool = False,
    ) -> list[Outcome]: ...


class Precheck(Protocol):
    """Decode envelopes and verify their signatures, before any rule
    (``ubc.envelopes.service.precheck``)."""

    def __call__(
        self, session: Session, ctx: LedgerContext, raws: Sequence[object]
    ) -> list[Prechecked]: ...


class InternalWriter(Protocol):
    """The group-commit writer as the server's own envelopes reach it
    (``ubc.envelopes.writer.GroupCommitWriter``)."""

    async def submit_internal(
        self, items: Sequence[Prechecked | Callable[[], Prechecked]]
    ) -> list[Outcome]: ...
