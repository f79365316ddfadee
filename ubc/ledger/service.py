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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import BigInteger, Label, and_, case, func, insert, select, text
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from ubc.clock import SYSTEM_CLOCK
from ubc.db import on_postgresql, table
from ubc.errors import (
    AccountNotFound,
    BadRequest,
    BatchFailed,
    IdempotencyConflict,
    StoredError,
    UbcError,
)
from ubc.ledger._sql import LedgerDriver, PostingRow, RequestRow, TransferRow
from ubc.ledger.engine import MAX_COUNTER as MAX_COUNTER
from ubc.ledger.engine import MAX_MEMO as MAX_MEMO
from ubc.ledger.engine import MAX_OPERATIONS as MAX_OPERATIONS
from ubc.ledger.engine import NON_NEGATIVE_KINDS as NON_NEGATIVE_KINDS
from ubc.ledger.engine import SYSTEM_ACCOUNTS as SYSTEM_ACCOUNTS
from ubc.ledger.engine import AccountState, Hold, Postings
from ubc.ledger.engine import Effect as Effect
from ubc.ledger.engine import HoldState as HoldState
from ubc.ledger.engine import Phase as Phase
from ubc.ledger.engine import TransferKind as TransferKind
from ubc.ledger.engine import parse_address as parse_address
from ubc.ledger.models import Account, Asset, Posting, Request, Transfer
from ubc.rules.effects import Leg as Leg
from ubc.rules.effects import Operation as Operation
from ubc.rules.effects import Post as Post
from ubc.rules.effects import Void as Void

accounts_t = table(Account)
transfers_t = table(Transfer)
postings_t = table(Posting)
requests_t = table(Request)
assets_t = table(Asset)


@dataclass(frozen=True, slots=True)
class LedgerRequest:
    """A linked batch under one client id: all its operations apply, or none."""

    id: str
    operations: tuple[Operation, ...]
    payload_hash: bytes = b""

    def fingerprint(self) -> bytes:
        return self.payload_hash or operations_fingerprint(self.operations)


@dataclass(frozen=True, slots=True)
class Applied:
    request_id: str
    effects: tuple[Effect, ...]
    # The request id was applied before with the same payload (idempotency).
    repeated: bool = False


Outcome = Applied | UbcError


@dataclass(frozen=True, slots=True)
class Prefetched:
    """Rows a caller has already locked and read in this transaction for the next
    :func:`apply_many` (the envelope writer reads them in its head lock's round trip):
    the accounts it asked for by asset and address (locked, in id order, and found), and
    the request ids it asked for with the rows found."""

    addresses: Mapping[str, frozenset[str]]
    accounts: Sequence[AccountState]
    request_ids: frozenset[str]
    requests: Mapping[str, tuple[bytes, str, str]]


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
    return [
        Balance(
            address,
            r.asset,
            r.debits_posted,
            r.credits_posted,
            r.debits_pending,
            r.credits_pending,
        )
        for r in rows
    ]


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
    ids = [row.id for row in session.execute(account_ids)]
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
    # Each row unpacked by name, in the select's order: a page has up to 1000 rows, and
    # attribute access on a Row costs about twenty times a tuple read.
    items = [
        HistoryItem(
            posting_id=posting_id,
            transfer_id=transfer_id,
            kind=kind,
            phase=phase,
            asset=row_asset,
            side=side,
            counterparty=credit_address if side == "D" else debit_address,
            posted=posted,
            pending=pending,
            balance_after=balance_after,
            available_after=available_after,
            memo=memo,
            created_at=created_at,
        )
        for (
            posting_id,
            transfer_id,
            kind,
            phase,
            row_asset,
            side,
            debit_address,
            credit_address,
            posted,
            pending,
            balance_after,
            available_after,
            memo,
            created_at,
        ) in rows[:limit]
    ]
    next_cursor = items[-1].posting_id if len(rows) > limit else None
    return items, next_cursor


def flow_sums(flows: Mapping[str, tuple[str, str]]) -> list[Label[int]]:
    """Per ``name → (transfer kind, posting side)``, the sum of what postings of that kind
    and side posted, labelled ``name``, for a ``GROUP BY`` over postings joined to their
    transfers (a side of one account fits its 64-bit counter: BIGINT, not NUMERIC)."""
    p, t = postings_t, transfers_t
    return [
        sql_cast(
            func.coalesce(
                func.sum(case((and_(t.c.kind == kind, p.c.side == side), p.c.posted), else_=0)),
                0,
            ),
            BigInteger,
        ).label(name)
        for name, (kind, side) in flows.items()
    ]


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
    prefetched: Prefetched | None = None,
    pending: list[tuple[str, Sequence[Any]]] | None = None,
) -> list[Outcome]:
    """Apply every request in one transaction; one outcome per request, in order.

    Each request is all-or-nothing. A failed request is recorded so that its id stays
    failed. With ``atomic`` the whole list is one unit: the first failure raises
    :class:`BatchFailed` naming its index, and nothing is written.

    ``prefetched`` rows are not read again. With ``pending`` (PostgreSQL) the statements
    that write the rows are added to it (see :meth:`LedgerDriver.write`): the caller sends
    them before anything reads these tables again in the transaction.
    """
    if not requests:
        return []
    batch = _Batch(session, now or SYSTEM_CLOCK.now())
    batch.load(requests, prefetched)
    outcomes: list[Outcome] = []
    for index, request in enumerate(requests):
        outcome = batch.apply_request(request)
        if atomic and isinstance(outcome, UbcError):
            raise BatchFailed(index, outcome)
        outcomes.append(outcome)
    batch.write(pending)
    return outcomes


def prefetch_statement(
    session: Session, addresses_by_asset: Mapping[str, Sequence[str]]
) -> tuple[str, list[Any]]:
    """The statement that locks these accounts as :func:`apply_many` would (in id order),
    for a caller that sends it with its own reads; its rows go to :func:`prefetched`."""
    return LedgerDriver(session).lock_accounts_statement(addresses_by_asset, ())


def prefetched(
    addresses_by_asset: Mapping[str, Sequence[str]],
    account_rows: Sequence[Sequence[Any]],
    request_ids: Iterable[str],
    requests: Mapping[str, tuple[bytes, str, str]],
) -> Prefetched:
    """What the next :func:`apply_many` need not read: the rows of
    :func:`prefetch_statement` for these addresses, and the requests recorded among
    ``request_ids`` (``requests``: the rows found, by id), read after the accounts' lock
    or under a lock that every writer of these ids takes first."""
    return Prefetched(
        {asset: frozenset(names) for asset, names in addresses_by_asset.items()},
        LedgerDriver.account_states(account_rows),
        frozenset(request_ids),
        dict(requests),
    )


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
    if on_postgresql(session):
        stmt = stmt.with_for_update(skip_locked=True)
    due = [row.id for row in session.execute(stmt)]
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


class _Batch(Postings):
    """The in-memory state of one group commit: the posting engine over the locked rows,
    recording the rows each applied request writes."""

    def __init__(self, session: Session, now: datetime) -> None:
        super().__init__({}, {})
        self.session = session
        self.now = now
        self.driver = LedgerDriver(session)
        self.stamp = self.driver.timestamp(now)
        self.accounts_by_id: dict[int, AccountState] = {}
        self.known: dict[str, tuple[bytes, str, str]] = {}
        self.done: dict[str, tuple[bytes, Outcome]] = {}
        self.transfers: list[TransferRow] = []
        self.postings: list[PostingRow] = []
        self.request_rows: list[RequestRow] = []
        # What the request being applied writes, kept once it applies.
        self._transfers: list[TransferRow] = []
        self._postings: list[PostingRow] = []

    # -- loading: pending transfers first, then accounts, each in sorted order --

    def load(self, requests: Sequence[LedgerRequest], prefetched: Prefetched | None) -> None:
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
        account_ids: set[int] = set()
        for _, debit_id, credit_id, *_rest in hold_rows:
            account_ids.update((debit_id, credit_id))
        request_ids = {r.id for r in requests}
        accounts: list[AccountState] = []
        request_rows: list[tuple[str, bytes, str, str]] = []
        if prefetched is not None:
            # Accounts asked for and not found are asked again with the rest (an error).
            accounts.extend(prefetched.accounts)
            found = {(a.address, a.asset) for a in prefetched.accounts}
            addresses = {
                asset: missing
                for asset, names in addresses.items()
                if (missing := {n for n in names if (n, asset) not in found})
            }
            account_ids -= {a.id for a in prefetched.accounts}
            request_rows.extend(
                (request_id, *prefetched.requests[request_id])
                for request_id in request_ids & prefetched.requests.keys()
            )
            request_ids -= prefetched.request_ids
        if addresses or account_ids or request_ids:
            more_accounts, more_requests = self.driver.lock_accounts_and_requests(
                {asset: sorted(names) for asset, names in addresses.items()},
                sorted(account_ids),
                sorted(request_ids),
            )
            accounts.extend(more_accounts)
            request_rows.extend(more_requests)
        for account in accounts:
            self.accounts[(account.address, account.asset)] = account
            self.accounts_by_id[account.id] = account
        for hold_id, debit_id, credit_id, asset, amount, kind, state, timeout_at in hold_rows:
            self.holds[hold_id] = Hold(
                id=hold_id,
                debit=self.accounts_by_id[debit_id],
                credit=self.accounts_by_id[credit_id],
                asset=asset,
                amount=amount,
                kind=kind,
                state=state,
                timeout_at=timeout_at,
            )
        for request_id, payload_hash, status, result in request_rows:
            self.known[request_id] = (payload_hash, status, result)

    # -- applying --

    def apply_request(self, request: LedgerRequest) -> Outcome:
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
        try:
            effects = self.apply(request.id, request.operations, self.now)
        except UbcError as error:
            self._remember(request.id, fingerprint, "failed", error)
            return error
        self.transfers.extend(self._transfers)
        self.postings.extend(self._postings)
        self._transfers.clear()
        self._postings.clear()
        applied = Applied(request.id, tuple(effects))
        self._remember(request.id, fingerprint, "applied", applied)
        return applied

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
        timeout_at = None
        if hold is not None and hold.timeout_at is not None:
            timeout_at = self.driver.timestamp(hold.timeout_at)
        stamp = self.stamp
        self._transfers.append(
            (
                transfer_id,
                debit.id,
                credit.id,
                effect.asset,
                effect.amount,
                effect.kind,
                effect.phase,
                effect.pending_id,
                HoldState.pending if hold is not None else None,
                timeout_at,
                memo,
                stamp,
            )
        )
        debit.dirty = credit.dirty = True
        self._postings.append(
            (debit.id, transfer_id, "D", posted, pending, debit.balance, debit.available, stamp)
        )
        self._postings.append(
            (credit.id, transfer_id, "C", posted, pending, credit.balance, credit.available, stamp)
        )

    def on_undo(self) -> None:
        self._transfers.clear()
        self._postings.clear()

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

    def write(self, pending: list[tuple[str, Sequence[Any]]] | None = None) -> None:
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
            pending,
        )


# What ``_encode_outcome`` stores for an applied request of 0 to 15 legs (json.dumps'
# bytes, computed once: every applied request of a group commit writes one).
_LEGS = {n: json.dumps({"legs": n}) for n in range(16)}


def _encode_outcome(outcome: Outcome) -> str:
    """A failure's error; for an applied request its number of legs, whose transfers are
    ``<id>:0`` … ``<id>:<n-1>`` (the effects are read back from them on a repeat)."""
    if isinstance(outcome, Applied):
        return _LEGS.get(len(outcome.effects)) or json.dumps({"legs": len(outcome.effects)})
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
    # Unpacked by name (the select's order): this runs on the group commit's repeats.
    by_id = {
        transfer_id: Effect(
            transfer_id, kind, debit_address, credit_address, asset, amount, phase, pending_id
        )
        for (
            transfer_id,
            kind,
            debit_address,
            credit_address,
            asset,
            amount,
            phase,
            pending_id,
        ) in rows
    }
    return tuple(by_id[i] for i in ids)


def _insert_ignore(session: Session, table: Any, keys: list[str]) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING on either engine."""
    if on_postgresql(session):
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=keys)
    return sqlite.insert(table).on_conflict_do_nothing(index_elements=keys)
