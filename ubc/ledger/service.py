"""The double-entry core: transfers, linked batches, holds, idempotency, history.

A caller hands ``apply_many`` a list of :class:`LedgerRequest`; each request is a
linked batch of operations that commits or fails as a whole, and the whole list is
applied in one database transaction (group commit). Accounts are locked once per
call, in ascending id order, so concurrent writers never deadlock on PostgreSQL;
on SQLite ``BEGIN IMMEDIATE`` serialises writers. Balances are computed in memory
under those locks and written back in bulk, one statement per table.

Idempotency is by request id: the same id with the same payload answers the
original outcome (success or failure), a different payload is a conflict.

Services flush; the caller commits (one unit of work per request or command).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import insert, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from ubc.clock import SYSTEM_CLOCK
from ubc.errors import (
    AccountNotFound,
    BadRequest,
    BatchFailed,
    IdempotencyConflict,
    InsufficientFunds,
    StateConflict,
    StoredError,
    TransferNotFound,
    UbcError,
)
from ubc.ledger._sql import LedgerDriver, PostingRow, RequestRow, TransferRow
from ubc.ledger.models import Account, Asset, Posting, Request, Transfer
from ubc.rules.effects import Leg as Leg
from ubc.rules.effects import Operation as Operation
from ubc.rules.effects import Post as Post
from ubc.rules.effects import Void as Void

MAX_COUNTER = 2**63 - 1
MAX_MEMO = 256
MAX_OPERATIONS = 10_000

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

accounts_t = Account.__table__  # type: ignore[attr-defined]
transfers_t = Transfer.__table__  # type: ignore[attr-defined]
postings_t = Posting.__table__  # type: ignore[attr-defined]
requests_t = Request.__table__  # type: ignore[attr-defined]
assets_t = Asset.__table__  # type: ignore[attr-defined]


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


@dataclass(frozen=True, slots=True)
class LedgerRequest:
    """A linked batch under one client id: all its operations apply, or none."""

    id: str
    operations: tuple[Operation, ...]
    payload_hash: bytes = b""

    def fingerprint(self) -> bytes:
        return self.payload_hash or operations_fingerprint(self.operations)


@dataclass(frozen=True, slots=True)
class Effect:
    """What one operation did, in the journal's words (DESIGN section 5)."""

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


@dataclass(frozen=True, slots=True)
class Applied:
    request_id: str
    effects: tuple[Effect, ...]
    # The request id was applied before with the same payload (idempotency).
    repeated: bool = False


Outcome = Applied | UbcError


@dataclass(frozen=True, slots=True)
class Balance:
    address: str
    asset: str
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int

    @property
    def posted(self) -> int:
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        return self.credits_posted - self.debits_posted - self.debits_pending


@dataclass(frozen=True, slots=True)
class HistoryItem:
    posting_id: int
    transfer_id: str
    kind: str
    phase: str
    asset: str
    side: str
    counterparty: str
    posted: int
    pending: int
    balance_after: int
    available_after: int
    memo: str | None
    created_at: datetime

    @property
    def amount(self) -> int:
        """The signed change of the posted balance, from this account's side."""
        return self.posted if self.side == "C" else -self.posted


# --- accounts and assets -------------------------------------------------------------


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


def ensure_assets(session: Session, assets: dict[str, int]) -> None:
    """Create the assets that do not exist yet (code → display scale)."""
    if not assets:
        return
    rows = [{"code": code, "scale": scale} for code, scale in assets.items()]
    session.execute(_insert_ignore(session, assets_t, ["code"]), rows)


def open_accounts(
    session: Session, pairs: Iterable[tuple[str, str]], *, now: datetime | None = None
) -> None:
    """Create (address, asset) accounts that do not exist yet; existing ones are kept."""
    created_at = now or SYSTEM_CLOCK.now()
    rows = []
    for address, asset in sorted(set(pairs)):
        kind, _ = parse_address(address)
        rows.append(
            {
                "address": address,
                "asset": asset,
                "non_negative": kind in NON_NEGATIVE_KINDS,
                "debits_posted": 0,
                "credits_posted": 0,
                "debits_pending": 0,
                "credits_pending": 0,
                "created_at": created_at,
            }
        )
    if rows:
        session.execute(_insert_ignore(session, accounts_t, ["address", "asset"]), rows)


def open_system_accounts(session: Session, assets: Iterable[str]) -> None:
    open_accounts(session, [(address, asset) for asset in assets for address in SYSTEM_ACCOUNTS])


def balances(session: Session, address: str) -> list[Balance]:
    """The balances of ``address`` in every asset it holds (AccountNotFound if none)."""
    rows = session.execute(
        select(
            accounts_t.c.asset,
            accounts_t.c.debits_posted,
            accounts_t.c.credits_posted,
            accounts_t.c.debits_pending,
            accounts_t.c.credits_pending,
        )
        .where(accounts_t.c.address == address)
        .order_by(accounts_t.c.asset)
    ).all()
    if not rows:
        raise AccountNotFound(f"no account {address}", detail={"address": address})
    return [Balance(address, r[0], r[1], r[2], r[3], r[4]) for r in rows]


def history(
    session: Session,
    address: str,
    *,
    asset: str | None = None,
    cursor: int | None = None,
    limit: int = 50,
) -> tuple[list[HistoryItem], int | None]:
    """Postings of ``address``, newest first; pass the returned cursor for the next page."""
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be between 1 and 1000", detail={"limit": limit})
    account_ids = select(accounts_t.c.id).where(accounts_t.c.address == address)
    if asset is not None:
        account_ids = account_ids.where(accounts_t.c.asset == asset)
    ids = [row[0] for row in session.execute(account_ids)]
    if not ids:
        raise AccountNotFound(f"no account {address}", detail={"address": address})
    debit_acct = aliased(accounts_t)
    credit_acct = aliased(accounts_t)
    stmt = (
        select(
            postings_t.c.id,
            postings_t.c.transfer_id,
            transfers_t.c.kind,
            transfers_t.c.phase,
            transfers_t.c.asset,
            postings_t.c.side,
            debit_acct.c.address,
            credit_acct.c.address,
            postings_t.c.posted,
            postings_t.c.pending,
            postings_t.c.balance_after,
            postings_t.c.available_after,
            transfers_t.c.memo,
            postings_t.c.created_at,
        )
        .join(transfers_t, transfers_t.c.id == postings_t.c.transfer_id)
        .join(debit_acct, debit_acct.c.id == transfers_t.c.debit_account_id)
        .join(credit_acct, credit_acct.c.id == transfers_t.c.credit_account_id)
        .where(postings_t.c.account_id.in_(ids))
        .order_by(postings_t.c.id.desc())
        .limit(limit + 1)
    )
    if cursor is not None:
        stmt = stmt.where(postings_t.c.id < cursor)
    rows = session.execute(stmt).all()
    items = [
        HistoryItem(
            posting_id=r[0],
            transfer_id=r[1],
            kind=r[2],
            phase=r[3],
            asset=r[4],
            side=r[5],
            counterparty=r[7] if r[5] == "D" else r[6],
            posted=r[8],
            pending=r[9],
            balance_after=r[10],
            available_after=r[11],
            memo=r[12],
            created_at=r[13],
        )
        for r in rows[:limit]
    ]
    next_cursor = items[-1].posting_id if len(rows) > limit else None
    return items, next_cursor


# --- the write path --------------------------------------------------------------------


def apply(session: Session, request: LedgerRequest, *, now: datetime | None = None) -> Applied:
    """Apply one linked batch; raise its error (a failure is still recorded: commit it)."""
    outcome = apply_many(session, [request], now=now)[0]
    if isinstance(outcome, UbcError):
        raise outcome
    return outcome


def apply_many(
    session: Session,
    requests: Sequence[LedgerRequest],
    *,
    now: datetime | None = None,
    atomic: bool = False,
) -> list[Outcome]:
    """Apply every request in one transaction; one outcome per request, in order.

    Each request is all-or-nothing. A failed request is recorded so that its id stays
    failed. With ``atomic`` the whole list is one unit: the first failure raises
    :class:`BatchFailed` naming its index, and nothing is written.
    """
    if not requests:
        return []
    batch = _Batch(session, now or SYSTEM_CLOCK.now())
    batch.load(requests)
    outcomes: list[Outcome] = []
    for index, request in enumerate(requests):
        outcome = batch.apply(request)
        if atomic and isinstance(outcome, UbcError):
            raise BatchFailed(index, outcome)
        outcomes.append(outcome)
    batch.write()
    return outcomes


def expire_holds(session: Session, *, now: datetime | None = None, limit: int = 1000) -> int:
    """Release every hold whose timeout has passed; returns how many were released.

    Runs in the server's background loop and at start-up, so holds left by a crash
    release by themselves.
    """
    now = now or SYSTEM_CLOCK.now()
    stmt = (
        select(transfers_t.c.id)
        # A literal predicate, so that PostgreSQL uses the partial index of open holds.
        .where(
            text("state = 'pending'"),
            transfers_t.c.timeout_at <= now,
            # Model calls' holds expire through journaled hold.expire entries instead.
            ~transfers_t.c.id.startswith("hold:"),
        )
        # By timeout, the partial index's order: ordering by id would scan every transfer.
        .order_by(transfers_t.c.timeout_at)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    due = [row[0] for row in session.execute(stmt)]
    if not due:
        return 0
    requests = [
        LedgerRequest(id=f"expire:{pending_id}", operations=(Void(pending_id, expired=True),))
        for pending_id in due
    ]
    outcomes = apply_many(session, requests, now=now)
    return sum(1 for o in outcomes if isinstance(o, Applied) and not o.repeated)


def record(
    session: Session,
    request_id: str,
    payload_hash: bytes,
    outcome: Outcome,
    *,
    now: datetime | None = None,
) -> None:
    """Remember the outcome of a request that moved no value (its id is taken from now on)."""
    session.execute(
        insert(requests_t).values(
            id=request_id,
            payload_hash=payload_hash,
            status="applied" if isinstance(outcome, Applied) else "failed",
            result=_encode_outcome(outcome),
            created_at=now or SYSTEM_CLOCK.now(),
        )
    )


def decode_outcome(session: Session, request_id: str, status: str, result: str) -> Outcome:
    """The outcome stored for a request id (a failure comes back as :class:`StoredError`)."""
    if status == "applied":
        return Applied(request_id, _effects_of(session, request_id, result))
    body = cast(dict[str, Any], json.loads(result))
    return StoredError(body["status"], body["type"], body["message"], body.get("detail"))


def operations_fingerprint(operations: Sequence[Operation]) -> bytes:
    """A stable hash of a request's operations, used when the caller gives no payload hash.

    The dataclasses' reprs name every field with its value, so equal operations give
    equal bytes.
    """
    return hashlib.sha256(repr(tuple(operations)).encode()).digest()


# --- internals --------------------------------------------------------------------------


@dataclass(slots=True)
class _AccountState:
    id: int
    address: str
    asset: str
    non_negative: bool
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
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
class _HoldState:
    id: str
    debit: _AccountState
    credit: _AccountState
    asset: str
    amount: int
    kind: str
    state: str
    timeout_at: datetime | None
    new: bool = False
    dirty: bool = False


@dataclass(slots=True)
class _Scratch:
    """What one request changed, so that a failure can undo it in memory."""

    saved_accounts: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    saved_holds: dict[str, str] = field(default_factory=dict)
    new_holds: list[str] = field(default_factory=list)
    transfers: list[TransferRow] = field(default_factory=list)
    postings: list[PostingRow] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)


class _Batch:
    """The in-memory state of one group commit."""

    def __init__(self, session: Session, now: datetime) -> None:
        self.session = session
        self.now = now
        self.driver = LedgerDriver(session)
        self.stamp = self.driver.timestamp(now)
        self.accounts: dict[tuple[str, str], _AccountState] = {}
        self.accounts_by_id: dict[int, _AccountState] = {}
        self.holds: dict[str, _HoldState] = {}
        self.known: dict[str, tuple[bytes, str, str]] = {}
        self.done: dict[str, tuple[bytes, Outcome]] = {}
        self.transfers: list[TransferRow] = []
        self.postings: list[PostingRow] = []
        self.request_rows: list[RequestRow] = []

    # -- loading: pending transfers first, then accounts, each in sorted order --

    def load(self, requests: Sequence[LedgerRequest]) -> None:
        addresses: dict[str, set[str]] = {}
        pending_ids: set[str] = set()
        for request in requests:
            for op in request.operations:
                if isinstance(op, Leg):
                    wanted = addresses.setdefault(op.asset, set())
                    wanted.add(op.debit)
                    wanted.add(op.credit)
                else:
                    pending_ids.add(op.pending_id)
        hold_rows = self.driver.lock_holds(sorted(pending_ids)) if pending_ids else []
        account_ids = sorted({r[1] for r in hold_rows} | {r[2] for r in hold_rows})
        account_rows, request_rows = self.driver.lock_accounts_and_requests(
            {asset: sorted(names) for asset, names in addresses.items()},
            account_ids,
            sorted({r.id for r in requests}),
        )
        for row in account_rows:
            account = _AccountState(*row)
            self.accounts[(account.address, account.asset)] = account
            self.accounts_by_id[account.id] = account
        for r in hold_rows:
            self.holds[r[0]] = _HoldState(
                id=r[0],
                debit=self.accounts_by_id[r[1]],
                credit=self.accounts_by_id[r[2]],
                asset=r[3],
                amount=r[4],
                kind=r[5],
                state=r[6],
                timeout_at=r[7],
            )
        for request_id, payload_hash, status, result in request_rows:
            self.known[request_id] = (payload_hash, status, result)

    # -- applying --

    def apply(self, request: LedgerRequest) -> Outcome:
        fingerprint = request.fingerprint()
        seen = self.done.get(request.id)
        if seen is None and request.id in self.known:
            stored_hash, status, result = self.known[request.id]
            seen = (stored_hash, decode_outcome(self.session, request.id, status, result))
        if seen is not None:
            stored_hash, outcome = seen
            if stored_hash != fingerprint:
                return IdempotencyConflict(
                    f"id {request.id} was already used with a different payload",
                    detail={"id": request.id},
                )
            if isinstance(outcome, Applied):
                return Applied(outcome.request_id, outcome.effects, repeated=True)
            return outcome
        scratch = _Scratch()
        try:
            self._validate(request)
            for index, op in enumerate(request.operations):
                transfer_id = f"{request.id}:{index}"
                if isinstance(op, Leg):
                    self._leg(scratch, request.id, transfer_id, op)
                elif isinstance(op, Post):
                    self._resolve(
                        scratch, request.id, transfer_id, op.pending_id, op.amount, HoldState.posted
                    )
                else:
                    state = HoldState.expired if op.expired else HoldState.voided
                    self._resolve(scratch, request.id, transfer_id, op.pending_id, None, state)
        except UbcError as error:
            self._undo(scratch)
            self._remember(request.id, fingerprint, "failed", error)
            return error
        self.transfers.extend(scratch.transfers)
        self.postings.extend(scratch.postings)
        applied = Applied(request.id, tuple(scratch.effects))
        self._remember(request.id, fingerprint, "applied", applied)
        return applied

    def _validate(self, request: LedgerRequest) -> None:
        if not request.id or len(request.id) > 96:
            raise BadRequest("request id must be 1 to 96 characters")
        if not 1 <= len(request.operations) <= MAX_OPERATIONS:
            raise BadRequest(
                f"a request holds 1 to {MAX_OPERATIONS} operations",
                detail={"operations": len(request.operations)},
            )

    def _leg(self, scratch: _Scratch, request_id: str, transfer_id: str, op: Leg) -> None:
        _check_amount(op.amount)
        if op.kind not in TransferKind.__members__:
            raise BadRequest(f"unknown transfer kind {op.kind!r}", detail={"kind": op.kind})
        if op.debit == op.credit:
            raise BadRequest("debit and credit accounts must differ", detail={"account": op.debit})
        if op.memo is not None and len(op.memo) > MAX_MEMO:
            raise BadRequest(f"memo longer than {MAX_MEMO} characters")
        if op.timeout is not None and op.timeout <= timedelta(0):
            raise BadRequest("a hold's timeout must be positive")
        debit = self._account(op.debit, op.asset)
        credit = self._account(op.credit, op.asset)
        self._save(scratch, debit)
        self._save(scratch, credit)
        pending = op.timeout is not None
        amount = op.amount
        if op.min_amount is not None:
            if not pending:
                raise BadRequest("only a hold may reserve a flexible amount")
            _check_amount(op.min_amount)
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
        self._check(debit, amount)
        self._check_overflow(credit)
        timeout_at = self.now + op.timeout if op.timeout is not None else None
        phase = Phase.pending if pending else Phase.posted
        scratch.transfers.append(
            (
                transfer_id,
                debit.id,
                credit.id,
                op.asset,
                amount,
                op.kind,
                phase,
                None,
                HoldState.pending if pending else None,
                None if timeout_at is None else self.driver.timestamp(timeout_at),
                op.memo,
                self.stamp,
            )
        )
        posted, held = (0, amount) if pending else (amount, 0)
        self._posting(scratch, debit, transfer_id, "D", posted, held)
        self._posting(scratch, credit, transfer_id, "C", posted, held)
        scratch.effects.append(
            Effect(transfer_id, op.kind, op.debit, op.credit, op.asset, amount, phase)
        )
        if pending:
            assert timeout_at is not None
            self.holds[transfer_id] = _HoldState(
                transfer_id,
                debit,
                credit,
                op.asset,
                amount,
                op.kind,
                HoldState.pending,
                timeout_at,
                new=True,
            )
            scratch.new_holds.append(transfer_id)

    def _resolve(
        self,
        scratch: _Scratch,
        request_id: str,
        transfer_id: str,
        pending_id: str,
        amount: int | None,
        to_state: HoldState,
    ) -> None:
        hold = self.holds.get(pending_id)
        if hold is None:
            raise TransferNotFound(f"no hold {pending_id}", detail={"pending_id": pending_id})
        if hold.state != HoldState.pending:
            raise StateConflict(
                f"hold {pending_id} is already {hold.state}",
                detail={"pending_id": pending_id, "state": hold.state},
            )
        expired = hold.timeout_at is not None and hold.timeout_at <= self.now
        if expired and to_state != HoldState.expired:
            raise StateConflict(
                f"hold {pending_id} has expired",
                detail={"pending_id": pending_id, "state": HoldState.expired},
            )
        if to_state == HoldState.expired and not expired:
            raise StateConflict(f"hold {pending_id} has not expired yet")
        if to_state == HoldState.posted:
            posted = hold.amount if amount is None else amount
            _check_amount(posted)
            if posted > hold.amount:
                raise BadRequest(
                    f"cannot post {posted}: the hold is for {hold.amount}",
                    detail={"pending_id": pending_id, "held": hold.amount, "amount": posted},
                )
        else:
            posted = 0
        debit, credit = hold.debit, hold.credit
        self._save(scratch, debit)
        self._save(scratch, credit)
        scratch.saved_holds.setdefault(hold.id, hold.state)
        debit.debits_pending -= hold.amount
        credit.credits_pending -= hold.amount
        debit.debits_posted += posted
        credit.credits_posted += posted
        self._check_overflow(credit)
        self._check_overflow(debit)
        hold.state = to_state
        hold.dirty = True
        phase = Phase.post if to_state == HoldState.posted else Phase.void
        amount_out = posted if to_state == HoldState.posted else hold.amount
        scratch.transfers.append(
            (
                transfer_id,
                debit.id,
                credit.id,
                hold.asset,
                amount_out,
                hold.kind,
                phase,
                pending_id,
                None,
                None,
                None,
                self.stamp,
            )
        )
        self._posting(scratch, debit, transfer_id, "D", posted, -hold.amount)
        self._posting(scratch, credit, transfer_id, "C", posted, -hold.amount)
        scratch.effects.append(
            Effect(
                transfer_id,
                hold.kind,
                debit.address,
                credit.address,
                hold.asset,
                amount_out,
                phase,
                pending_id,
            )
        )

    def _account(self, address: str, asset: str) -> _AccountState:
        account = self.accounts.get((address, asset))
        if account is None:
            parse_address(address)
            raise AccountNotFound(
                f"no account {address} for asset {asset}",
                detail={"address": address, "asset": asset},
            )
        return account

    def _check(self, debit: _AccountState, amount: int) -> None:
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
        self._check_overflow(debit)

    @staticmethod
    def _check_overflow(account: _AccountState) -> None:
        if max(account.counters()) > MAX_COUNTER:
            raise StateConflict(
                f"account {account.address} would exceed the 64-bit counter range",
                detail={"account": account.address},
            )

    def _posting(
        self,
        scratch: _Scratch,
        account: _AccountState,
        transfer_id: str,
        side: str,
        posted: int,
        pending: int,
    ) -> None:
        account.dirty = True
        scratch.postings.append(
            (
                account.id,
                transfer_id,
                side,
                posted,
                pending,
                account.balance,
                account.available,
                self.stamp,
            )
        )

    @staticmethod
    def _save(scratch: _Scratch, account: _AccountState) -> None:
        if account.id not in scratch.saved_accounts:
            scratch.saved_accounts[account.id] = account.counters()

    def _undo(self, scratch: _Scratch) -> None:
        for account_id, counters in scratch.saved_accounts.items():
            self.accounts_by_id[account_id].restore(counters)
        for hold_id, state in scratch.saved_holds.items():
            self.holds[hold_id].state = state
        for hold_id in scratch.new_holds:
            self.holds.pop(hold_id, None)

    def _remember(self, request_id: str, fingerprint: bytes, status: str, outcome: Outcome) -> None:
        if isinstance(outcome, UbcError):
            # A later repeat in this batch answers like one from the database would.
            self.done[request_id] = (
                fingerprint,
                StoredError(
                    outcome.status_code, outcome.error_type, outcome.message, outcome.detail
                ),
            )
        else:
            self.done[request_id] = (fingerprint, outcome)
        self.request_rows.append(
            (request_id, fingerprint, status, _encode_outcome(outcome), self.stamp)
        )

    # -- writing: one bulk statement per table --

    def write(self) -> None:
        dirty = sorted((a for a in self.accounts_by_id.values() if a.dirty), key=lambda a: a.id)
        self.driver.write(
            self.transfers,
            self.postings,
            [
                (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending, a.id)
                for a in dirty
            ],
            # Holds created earlier in this batch are inserted first, so one pass covers all.
            [(h.state, h.id) for h in self.holds.values() if h.dirty],
            self.request_rows,
        )


def _check_amount(amount: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise BadRequest("amounts are integers", detail={"amount": repr(amount)})
    if not 1 <= amount <= MAX_COUNTER:
        raise BadRequest(f"amount must be between 1 and {MAX_COUNTER}", detail={"amount": amount})


def _encode_outcome(outcome: Outcome) -> str:
    """A failure's error; for an applied request its number of legs, whose transfers are
    ``<id>:0`` … ``<id>:<n-1>`` (the effects are read back from them on a repeat)."""
    if isinstance(outcome, Applied):
        return json.dumps({"legs": len(outcome.effects)})
    return json.dumps(
        {
            "status": outcome.status_code,
            "type": outcome.error_type,
            "message": outcome.message,
            "detail": outcome.detail,
        }
    )


def leg_ids(session: Session, request_id: str) -> list[str]:
    """The transfer ids of an applied request's legs, in order (empty if none)."""
    result = session.execute(
        select(requests_t.c.result).where(
            requests_t.c.id == request_id, requests_t.c.status == "applied"
        )
    ).scalar_one_or_none()
    if not result:
        return []
    return [f"{request_id}:{i}" for i in range(int(json.loads(result)["legs"]))]


def _effects_of(session: Session, request_id: str, result: str) -> tuple[Effect, ...]:
    legs = int(json.loads(result)["legs"]) if result else 0
    if legs == 0:
        return ()
    ids = [f"{request_id}:{i}" for i in range(legs)]
    debit = aliased(accounts_t)
    credit = aliased(accounts_t)
    rows = session.execute(
        select(
            transfers_t.c.id,
            transfers_t.c.kind,
            debit.c.address,
            credit.c.address,
            transfers_t.c.asset,
            transfers_t.c.amount,
            transfers_t.c.phase,
            transfers_t.c.pending_id,
        )
        .join(debit, debit.c.id == transfers_t.c.debit_account_id)
        .join(credit, credit.c.id == transfers_t.c.credit_account_id)
        .where(transfers_t.c.id.in_(ids))
    ).all()
    by_id = {row[0]: Effect(*row) for row in rows}
    return tuple(by_id[i] for i in ids)


def _insert_ignore(session: Session, table: Any, keys: list[str]) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING on either engine."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=keys)
    return sqlite.insert(table).on_conflict_do_nothing(index_elements=keys)
