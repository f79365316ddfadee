"""The posting engine: what one linked request does to balances and holds, in memory.

One implementation of every per-operation rule of the ledger: amounts are integers in
range, a leg's accounts exist and differ, a non-negative account never goes below zero
of what it has available, no counter leaves the 64-bit range, a hold is posted, voided
or expired once and only as its state and timeout allow, and a request applies all its
operations or none. The server's group commit (:mod:`ubc.ledger.service`) runs it under
its row locks and then writes the rows it recorded; the auditor's in-memory re-run
(:mod:`ubc.audit.memory`) runs it over its dicts. Neither repeats a check of its own.

A subclass records what each operation wrote through :meth:`Postings.on_transfer` (one
transfer, its two postings follow from the accounts' counters); the records of a
request that fails are dropped by :meth:`Postings.on_undo`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

from ubc.errors import (
    AccountNotFound,
    BadRequest,
    InsufficientFunds,
    StateConflict,
    TransferNotFound,
    UbcError,
)
from ubc.rules.effects import Leg, Operation, Post

MAX_COUNTER = 2**63 - 1
MAX_MEMO = 256
MAX_OPERATIONS = 10_000
MAX_REQUEST_ID = 96

_ADDRESS = re.compile(r"^(member|cause|system|market):([a-z0-9][a-z0-9_-]{0,63})$")
NON_NEGATIVE_KINDS = frozenset({"member", "cause", "market"})
SYSTEM_ACCOUNTS = (
    "system:issuance",
    "system:consumption",
    "system:expired",
    "system:fees",
    "system:deposits",
    "market:escrow",
)


class TransferKind(StrEnum):
    allocation = "allocation"
    transfer = "transfer"
    donation = "donation"
    usage = "usage"
    expiry = "expiry"
    trade = "trade"
    deposit = "deposit"
    withdrawal = "withdrawal"
    fee = "fee"


class Phase(StrEnum):
    posted = "posted"
    pending = "pending"
    post = "post"
    void = "void"


class HoldState(StrEnum):
    pending = "pending"
    posted = "posted"
    voided = "voided"
    expired = "expired"


_KINDS = frozenset(TransferKind.__members__)
_NO_TIME = timedelta(0)


class Effect(NamedTuple):
    """What one operation did, in the journal's words (DESIGN section 5). A named tuple:
    one is made per operation on the hottest path of the server and of the auditor."""

    transfer_id: str
    kind: str
    debit: str
    credit: str
    asset: str
    amount: int
    phase: str
    pending_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "transfer_id": self.transfer_id,
            "kind": self.kind,
            "debit": self.debit,
            "credit": self.credit,
            "asset": self.asset,
            "amount": self.amount,
            "phase": self.phase,
        }
        if self.pending_id is not None:
            body["pending_id"] = self.pending_id
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Effect:
        return cls(
            transfer_id=body["transfer_id"],
            kind=body["kind"],
            debit=body["debit"],
            credit=body["credit"],
            asset=body["asset"],
            amount=body["amount"],
            phase=body["phase"],
            pending_id=body.get("pending_id"),
        )


@dataclass(slots=True)
class AccountState:
    """One account's four counters (and its database id, 0 in memory)."""

    id: int
    address: str
    asset: str
    non_negative: bool
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0
    dirty: bool = False

    def counters(self) -> tuple[int, int, int, int]:
        return (self.debits_posted, self.credits_posted, self.debits_pending, self.credits_pending)

    def restore(self, counters: tuple[int, int, int, int]) -> None:
        (self.debits_posted, self.credits_posted, self.debits_pending, self.credits_pending) = (
            counters
        )

    @property
    def balance(self) -> int:
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        return self.credits_posted - self.debits_posted - self.debits_pending


@dataclass(slots=True)
class Hold:
    """A pending transfer: what it holds, between which accounts, until when."""

    id: str
    debit: AccountState
    credit: AccountState
    asset: str
    amount: int
    kind: str
    state: str
    timeout_at: datetime | None
    new: bool = False
    dirty: bool = False


class Postings:
    """Accounts and holds, and the one way operations change them."""

    def __init__(
        self,
        accounts: dict[tuple[str, str], AccountState],
        holds: dict[str, Hold],
    ) -> None:
        self.accounts = accounts
        self.holds = holds

    # -- what a subclass records --

    def on_transfer(
        self,
        transfer_id: str,
        debit: AccountState,
        credit: AccountState,
        effect: Effect,
        posted: int,
        pending: int,
        hold: Hold | None,
        memo: str | None,
    ) -> None:
        """One transfer was made: ``posted`` and ``pending`` are what its two postings
        add to each side's counters (``hold`` is the hold it placed, if any)."""

    def on_undo(self) -> None:
        """The request being applied failed: forget what it recorded."""

    # -- applying --

    def apply(
        self, request_id: str, operations: Sequence[Operation], now: datetime
    ) -> list[Effect]:
        """Every operation of one request, or none: its effects, or its error raised with
        every account and hold as it was before."""
        saved: dict[int, tuple[AccountState, tuple[int, int, int, int]]] = {}
        saved_holds: dict[str, tuple[Hold, str]] = {}
        new_holds: list[str] = []
        effects: list[Effect] = []
        try:
            if not request_id or len(request_id) > MAX_REQUEST_ID:
                raise BadRequest(f"request id must be 1 to {MAX_REQUEST_ID} characters")
            if not 1 <= len(operations) <= MAX_OPERATIONS:
                raise BadRequest(
                    f"a request holds 1 to {MAX_OPERATIONS} operations",
                    detail={"operations": len(operations)},
                )
            for index, op in enumerate(operations):
                transfer_id = f"{request_id}:{index}"
                if isinstance(op, Leg):
                    self._leg(saved, new_holds, effects, transfer_id, op, now)
                elif isinstance(op, Post):
                    self._resolve(
                        saved, saved_holds, effects, transfer_id, op.pending_id, op.amount,
                        HoldState.posted, now,
                    )  # fmt: skip
                else:
                    state = HoldState.expired if op.expired else HoldState.voided
                    self._resolve(
                        saved, saved_holds, effects, transfer_id, op.pending_id, None, state,
                        now,
                    )  # fmt: skip
        except UbcError:
            for account, counters in saved.values():
                account.restore(counters)
            for hold, was in saved_holds.values():
                hold.state = was
            for hold_id in new_holds:
                self.holds.pop(hold_id, None)
            self.on_undo()
            raise
        return effects

    #: Whether :meth:`move_many` reports each leg to :meth:`on_transfer` (a million legs
    #: cost a second or two that only a subclass keeping rows needs).
    record_bulk = False

    def move_many(
        self,
        envelope_id: str,
        legs: Sequence[tuple[AccountState, int]],
        source: AccountState,
        kind: str,
        *,
        source_is_debit: bool = True,
    ) -> tuple[int, int]:
        """An epoch's bulk move, leg by leg, as :mod:`ubc.ledger.bulk` writes it in SQL:
        leg ``i`` is the posted transfer ``<envelope_id>:<i>`` from ``source`` to each
        account (or from each account to ``source``). The amounts were computed by the
        epoch's rules within what each account has, so no leg is refused. Returns the
        number of legs and their total."""
        total = 0
        record = self.record_bulk
        for leg, (account, amount) in enumerate(legs):
            total += amount
            if source_is_debit:
                debit, credit = source, account
                account.credits_posted += amount
            else:
                debit, credit = account, source
                account.debits_posted += amount
            if record:
                transfer_id = f"{envelope_id}:{leg}"
                effect = Effect(transfer_id, kind, debit.address, credit.address,
                                source.asset, amount, Phase.posted)  # fmt: skip
                self.on_transfer(transfer_id, debit, credit, effect, amount, 0, None, None)
        if source_is_debit:
            source.debits_posted += total
        else:
            source.credits_posted += total
        return len(legs), total

    def account(self, address: str, asset: str) -> AccountState:
        account = self.accounts.get((address, asset))
        if account is None:
            parse_address(address)
            raise AccountNotFound(
                f"no account {address} for asset {asset}",
                detail={"address": address, "asset": asset},
            )
        return account

    def _leg(
        self,
        saved: dict[int, tuple[AccountState, tuple[int, int, int, int]]],
        new_holds: list[str],
        effects: list[Effect],
        transfer_id: str,
        op: Leg,
        now: datetime,
    ) -> None:
        check_amount(op.amount)
        if op.kind not in _KINDS:
            raise BadRequest(f"unknown transfer kind {op.kind!r}", detail={"kind": op.kind})
        if op.debit == op.credit:
            raise BadRequest("debit and credit accounts must differ", detail={"account": op.debit})
        if op.memo is not None and len(op.memo) > MAX_MEMO:
            raise BadRequest(f"memo longer than {MAX_MEMO} characters")
        timeout = op.timeout
        if timeout is not None and timeout <= _NO_TIME:
            raise BadRequest("a hold's timeout must be positive")
        debit = self.account(op.debit, op.asset)
        credit = self.account(op.credit, op.asset)
        if id(debit) not in saved:
            saved[id(debit)] = (debit, debit.counters())
        if id(credit) not in saved:
            saved[id(credit)] = (credit, credit.counters())
        pending = timeout is not None
        amount = op.amount
        if op.min_amount is not None:
            if not pending:
                raise BadRequest("only a hold may reserve a flexible amount")
            check_amount(op.min_amount)
            if debit.non_negative:
                amount = max(min(amount, debit.available), 0)
            if amount < op.min_amount:
                raise InsufficientFunds(
                    f"{debit.address} has {amount} {debit.asset} available, {op.min_amount} needed",
                    detail={
                        "account": debit.address,
                        "asset": debit.asset,
                        "available": amount,
                        "amount": op.min_amount,
                        "shortfall": op.min_amount - amount,
                    },
                )
        if pending:
            debit.debits_pending += amount
            credit.credits_pending += amount
        else:
            debit.debits_posted += amount
            credit.credits_posted += amount
        check_debit(debit, amount)
        check_overflow(credit)
        effect = Effect(
            transfer_id,
            op.kind,
            op.debit,
            op.credit,
            op.asset,
            amount,
            Phase.pending if pending else Phase.posted,
        )
        effects.append(effect)
        hold = None
        if timeout is not None:
            hold = Hold(
                transfer_id,
                debit,
                credit,
                op.asset,
                amount,
                op.kind,
                HoldState.pending,
                now + timeout,
                new=True,
            )
            self.holds[transfer_id] = hold
            new_holds.append(transfer_id)
            self.on_transfer(transfer_id, debit, credit, effect, 0, amount, hold, op.memo)
        else:
            self.on_transfer(transfer_id, debit, credit, effect, amount, 0, None, op.memo)

    def _resolve(
        self,
        saved: dict[int, tuple[AccountState, tuple[int, int, int, int]]],
        saved_holds: dict[str, tuple[Hold, str]],
        effects: list[Effect],
        transfer_id: str,
        pending_id: str,
        amount: int | None,
        to_state: HoldState,
        now: datetime,
    ) -> None:
        hold = self.holds.get(pending_id)
        if hold is None:
            raise TransferNotFound(f"no hold {pending_id}", detail={"pending_id": pending_id})
        if hold.state != HoldState.pending:
            raise StateConflict(
                f"hold {pending_id} is already {hold.state}",
                detail={"pending_id": pending_id, "state": hold.state},
            )
        expired = hold.timeout_at is not None and hold.timeout_at <= now
        if expired and to_state != HoldState.expired:
            raise StateConflict(
                f"hold {pending_id} has expired",
                detail={"pending_id": pending_id, "state": HoldState.expired},
            )
        if to_state == HoldState.expired and not expired:
            raise StateConflict(f"hold {pending_id} has not expired yet")
        if to_state == HoldState.posted:
            posted = hold.amount if amount is None else amount
            check_amount(posted)
            if posted > hold.amount:
                raise BadRequest(
                    f"cannot post {posted}: the hold is for {hold.amount}",
                    detail={"pending_id": pending_id, "held": hold.amount, "amount": posted},
                )
        else:
            posted = 0
        debit, credit = hold.debit, hold.credit
        if id(debit) not in saved:
            saved[id(debit)] = (debit, debit.counters())
        if id(credit) not in saved:
            saved[id(credit)] = (credit, credit.counters())
        if pending_id not in saved_holds:
            saved_holds[pending_id] = (hold, hold.state)
        debit.debits_pending -= hold.amount
        credit.credits_pending -= hold.amount
        debit.debits_posted += posted
        credit.credits_posted += posted
        check_overflow(credit)
        check_overflow(debit)
        hold.state = to_state
        hold.dirty = True
        is_post = to_state == HoldState.posted
        effect = Effect(
            transfer_id,
            hold.kind,
            debit.address,
            credit.address,
            hold.asset,
            posted if is_post else hold.amount,
            Phase.post if is_post else Phase.void,
            pending_id,
        )
        effects.append(effect)
        self.on_transfer(transfer_id, debit, credit, effect, posted, -hold.amount, None, None)


def check_amount(amount: int) -> None:
    """An amount is an integer from 1 to the counters' range (not a bool)."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise BadRequest("amounts are integers", detail={"amount": repr(amount)})
    if not 1 <= amount <= MAX_COUNTER:
        raise BadRequest(f"amount must be between 1 and {MAX_COUNTER}", detail={"amount": amount})


def check_debit(debit: AccountState, amount: int) -> None:
    """After ``amount`` left ``debit``: a non-negative account still has nothing below zero
    available, and no counter left the range."""
    if debit.non_negative and debit.available < 0:
        raise InsufficientFunds(
            f"{debit.address} has {debit.available + amount} {debit.asset} available, "
            f"{amount} needed",
            detail={
                "account": debit.address,
                "asset": debit.asset,
                "available": debit.available + amount,
                "amount": amount,
                "shortfall": -debit.available,
            },
        )
    check_overflow(debit)


def check_overflow(account: AccountState) -> None:
    if (
        account.debits_posted > MAX_COUNTER
        or account.credits_posted > MAX_COUNTER
        or account.debits_pending > MAX_COUNTER
        or account.credits_pending > MAX_COUNTER
    ):
        raise StateConflict(
            f"account {account.address} would exceed the 64-bit counter range",
            detail={"account": account.address},
        )


def parse_address(address: str) -> tuple[str, str]:
    """Split ``kind:name``; raise BadRequest for anything else."""
    match = _ADDRESS.match(address)
    if match is None:
        raise BadRequest(
            f"invalid account address {address!r}: expected member:, cause:, system: or "
            "market: followed by [a-z0-9_-]",
            detail={"address": address},
        )
    return match.group(1), match.group(2)
