"""The auditor's in-memory ledger state: every domain's lookup over dicts, and an applier.

``ubc audit verify`` re-runs a journal through the same rules the server runs (the
registry's rules, unchanged); only the state they read and the applier that carries out
their plans live here instead of in a database:

- balances per (address, asset) with posted and pending counters, holds, the
  non-negative rule of member, cause and market accounts, and the posting engine's
  checks and effects (``ubc.ledger.service._Batch``, mirrored operation by operation);
- members, keys, grants, causes, offers, external references, the configuration, spend
  per key and epoch, and epochs, with the bulk allocation of ``epoch.open`` and the
  expiry of ``epoch.close`` derived exactly as ``ubc.epochs.service`` over
  ``ubc.ledger.bulk`` derives them (legs numbered by handle, by address);
- envelope ids (idempotency): a compact open-addressing table of 64-bit hashes of the
  id and the payload hash (16 bytes per slot), the only part that grows with entries.

State grows with members, accounts and pending holds, not with entries: resolved holds
are dropped. Transfers and postings are kept only when a comparison with a live ledger
asks for them (``keep_rows``).
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ubc.audit.workers import id_hash as _id_hash
from ubc.causes.rules import CausesLookup, CauseStored, cause_address
from ubc.epochs.rules import EpochClosed, EpochOpened, EpochsLookup
from ubc.errors import (
    AccountNotFound,
    BadRequest,
    IdempotencyConflict,
    InsufficientFunds,
    NotFound,
    StateConflict,
    TransferNotFound,
    UbcError,
)
from ubc.ledger.rules import ConfigStored, LedgerLookup, RefClaimed, RefUse
from ubc.ledger.service import (
    MAX_COUNTER,
    MAX_MEMO,
    MAX_OPERATIONS,
    NON_NEGATIVE_KINDS,
    SYSTEM_ACCOUNTS,
    TransferKind,
    parse_address,
)
from ubc.market.rules import MarketLookup, OfferCreated, OfferUpdated, OfferView
from ubc.members.rules import (
    GrantRevoked,
    GrantStored,
    KeyRotated,
    MemberCreated,
    MembersLookup,
    MemberStatusSet,
)
from ubc.metering.rules import Grant, MeteringLookup, SpendAdded
from ubc.rules import Change, KeyInfo, Leg, MemberInfo, Plan, Post
from ubc.rules.payload import parse_timestamp
from ubc.signing import decode_public_key

_TRANSFER_KINDS = frozenset(TransferKind.__members__)


class Account:
    __slots__ = ("address", "asset", "non_negative", "dp", "cp", "dpend", "cpend")

    def __init__(self, address: str, asset: str, non_negative: bool) -> None:
        self.address = address
        self.asset = asset
        self.non_negative = non_negative
        self.dp = self.cp = self.dpend = self.cpend = 0

    @property
    def balance(self) -> int:
        return self.cp - self.dp

    @property
    def available(self) -> int:
        return self.cp - self.dp - self.dpend

    def counters(self) -> tuple[int, int, int, int]:
        return (self.dp, self.cp, self.dpend, self.cpend)

    def restore(self, counters: tuple[int, int, int, int]) -> None:
        self.dp, self.cp, self.dpend, self.cpend = counters


@dataclass(slots=True)
class Hold:
    debit: Account
    credit: Account
    asset: str
    amount: int
    kind: str
    state: str
    timeout_at: datetime | None


@dataclass(slots=True)
class Epoch:
    number: int
    asset: str
    cap: int | None
    status: str


class IdTable:
    """Ids seen, each with a fingerprint: 64-bit hashes in open addressing (two arrays).

    A collision of two 64-bit id hashes among a journal's ids is as unlikely as a SHA-256
    prefix collision; what is stored per id is 16 bytes, not a Python string.
    """

    def __init__(self, expected: int = 0) -> None:
        # Sized once for the ids expected (at most half full), so that it never grows.
        size = 1 << max(12, (2 * max(expected, 1) - 1).bit_length())
        self.mask = size - 1
        self.keys = array("Q", bytes(8 * size))
        self.values = array("Q", bytes(8 * size))
        self.count = 0

    def get(self, key: str) -> int | None:
        return self.get_hash(_id_hash(key))

    def get_hash(self, h: int) -> int | None:
        mask, keys = self.mask, self.keys
        i = h & mask
        while True:
            k = keys[i]
            if k == h:
                return int(self.values[i])
            if k == 0:
                return None
            i = (i + 1) & mask

    def put(self, key: str, fingerprint: bytes) -> None:
        self._put(_id_hash(key), int.from_bytes(fingerprint[:8], "little"))

    def put_hash(self, h: int, fingerprint: bytes) -> None:
        self._put(h, int.from_bytes(fingerprint[:8], "little"))

    def _put(self, h: int, value: int) -> None:
        if (self.count + 1) * 3 > (self.mask + 1) * 2:
            self._grow()
        mask, keys = self.mask, self.keys
        i = h & mask
        while keys[i] != 0 and keys[i] != h:
            i = (i + 1) & mask
        if keys[i] == 0:
            self.count += 1
        keys[i] = h
        self.values[i] = value

    def _grow(self) -> None:
        keys, values = self.keys, self.values
        size = (self.mask + 1) * 2
        self.mask = size - 1
        self.keys = array("Q", bytes(8 * size))
        self.values = array("Q", bytes(8 * size))
        self.count = 0
        for i, k in enumerate(keys):
            if k:
                self._put(k, values[i])


def fingerprint_value(fingerprint: bytes) -> int:
    return int.from_bytes(fingerprint[:8], "little")


@dataclass(slots=True)
class MemoryState:
    """Every domain's lookup, over dicts; and what an applier changes."""

    keep_rows: bool = False
    accounts: dict[tuple[str, str], Account] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    assets: dict[str, int] = field(default_factory=dict)
    members: dict[str, MemberInfo] = field(default_factory=dict)
    keys: dict[str, KeyInfo] = field(default_factory=dict)
    keys_of: dict[str, list[str]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    grants: dict[str, tuple[Grant, bool]] = field(default_factory=dict)
    causes: dict[str, frozenset[str]] = field(default_factory=dict)
    offers: dict[str, OfferView] = field(default_factory=dict)
    spend: dict[tuple[str, int], int] = field(default_factory=dict)
    epochs: dict[int, Epoch] = field(default_factory=dict)
    # Per asset, the capped closes in order: (cap, index into ``close_balances``).
    capped: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # After each capped close, the posted balances of the sellers with open offers.
    close_balances: list[dict[str, int]] = field(default_factory=list)
    config_body: dict[str, Any] = field(default_factory=dict)
    ids: IdTable = field(default_factory=IdTable)
    # What a group of entries (the server's batch) planned: refs and spend.
    group_refs: set[str] = field(default_factory=set)
    group_spent: dict[tuple[str, int], int] = field(default_factory=dict)
    # Transfers and postings in comparable form (``keep_rows`` only).
    transfers: dict[tuple[Any, ...], tuple[Any, ...]] = field(default_factory=dict)
    postings: dict[tuple[Any, ...], tuple[int, int]] = field(default_factory=dict)
    new_keys: list[tuple[str, bytes]] = field(default_factory=list)

    # --- setting up ---

    def genesis(self, envelope_id: str, body: dict[str, Any]) -> None:
        self.config_body = json.loads(json.dumps(body, sort_keys=True))
        for code, spec in sorted(body["assets"].items()):
            self.assets.setdefault(code, int(spec["scale"]))
        self.open_accounts(
            [(address, asset) for asset in sorted(body["assets"]) for address in SYSTEM_ACCOUNTS]
        )

    def open_accounts(self, pairs: list[tuple[str, str]]) -> None:
        for address, asset in sorted(set(pairs)):
            kind, _ = parse_address(address)
            if (address, asset) not in self.accounts:
                self.accounts[(address, asset)] = Account(
                    address, asset, kind in NON_NEGATIVE_KINDS
                )

    def new_group(self) -> None:
        self.group_refs.clear()
        self.group_spent.clear()

    # --- the kernel's reads ---

    def member(self, handle: str) -> MemberInfo | None:
        return self.members.get(handle)

    def key(self, keyid: str) -> KeyInfo | None:
        return self.keys.get(keyid)

    def config(self) -> Mapping[str, Any]:
        return self.config_body

    def stewards(self, cause: str) -> frozenset[str] | None:
        return self.causes.get(cause.removeprefix("cause:"))

    # --- the domains' reads ---

    def external_ref(self, ref: str) -> RefUse | None:
        if ref in self.group_refs:
            return RefUse("", earlier_in_batch=True)
        used = self.refs.get(ref)
        return None if used is None else RefUse(used)

    def grant_exists(self, key_hash: str) -> bool:
        return key_hash in self.grants

    def grant_revoked(self, key_hash: str, account: str) -> bool | None:
        found = self.grants.get(key_hash)
        if found is None or found[0].account != account:
            return None
        return found[1]

    def grant(self, key_hash: str) -> Grant | None:
        found = self.grants.get(key_hash)
        return None if found is None else found[0]

    def spend_epoch(self) -> int:
        return max(self.epochs, default=0)

    def spent(self, key_hash: str, epoch: int) -> int:
        key = (key_hash, epoch)
        return self.spend.get(key, 0) + self.group_spent.get(key, 0)

    def asset_exists(self, code: str) -> bool:
        return code in self.assets

    def latest_epoch(self) -> tuple[int, str] | None:
        if not self.epochs:
            return None
        number = max(self.epochs)
        return number, self.epochs[number].status

    def epoch_state(self, number: int) -> tuple[str, str] | None:
        epoch = self.epochs.get(number)
        return None if epoch is None else (epoch.status, epoch.asset)

    def cause_exists(self, slug: str) -> bool:
        return slug in self.causes

    def offer(self, offer_id: str) -> OfferView | None:
        return self.offers.get(offer_id)

    def capped_closes(self, asset: str) -> int:
        return len(self.capped.get(asset, ()))

    def capped_close_list(self, asset: str) -> list[tuple[int, int]]:
        return list(self.capped.get(asset, ()))

    def posted_balance_at(self, address: str, asset: str, last_posting: int) -> int:
        return self.close_balances[last_posting].get(address, 0)

    # --- applying a plan ---

    def planned(self, plan: Plan) -> None:
        for change in plan.changes:
            if isinstance(change, RefClaimed):
                self.group_refs.add(change.ref)
            elif isinstance(change, SpendAdded):
                key = (change.key_hash, change.epoch)
                self.group_spent[key] = self.group_spent.get(key, 0) + change.amount

    def apply_change(self, change: Change, now: datetime) -> dict[str, Any] | None:
        """One change of state, as its domain's writer makes it; an epoch's summary."""
        if isinstance(change, RefClaimed):
            self.refs[change.ref] = change.envelope_id
        elif isinstance(change, ConfigStored):
            self.config_body = json.loads(json.dumps(change.body, sort_keys=True))
        elif isinstance(change, MemberCreated):
            self.members[change.handle] = MemberInfo(change.handle, change.status, None)
            public = decode_public_key(change.public_key)
            self.keys[change.keyid] = KeyInfo(change.keyid, change.handle, public, True)
            self.keys_of.setdefault(change.handle, []).append(change.keyid)
            self.new_keys.append((change.keyid, public))
            self.open_accounts([(f"member:{change.handle}", a) for a in change.assets])
        elif isinstance(change, KeyRotated):
            for keyid in self.keys_of.get(change.handle, ()):
                info = self.keys[keyid]
                if info.current:
                    self.keys[keyid] = KeyInfo(info.keyid, info.handle, info.public_key, False)
            public = decode_public_key(change.public_key)
            self.keys[change.keyid] = KeyInfo(change.keyid, change.handle, public, True)
            self.keys_of.setdefault(change.handle, []).append(change.keyid)
            self.new_keys.append((change.keyid, public))
        elif isinstance(change, MemberStatusSet):
            if change.handle in self.members:
                self.members[change.handle] = MemberInfo(change.handle, change.status, change.tier)
        elif isinstance(change, GrantStored):
            models = json.dumps(list(change.models)) if change.models is not None else None
            grant = Grant(change.account, change.scopes, models, change.spend_cap_per_epoch)
            self.grants[change.key_hash] = (grant, False)
        elif isinstance(change, GrantRevoked):
            found = self.grants.get(change.key_hash)
            if found is not None:
                self.grants[change.key_hash] = (found[0], True)
        elif isinstance(change, CauseStored):
            self.causes[change.slug] = frozenset(change.stewards)
            if change.created:
                address = cause_address(change.slug)
                self.open_accounts([(address, asset) for asset in change.assets])
        elif isinstance(change, OfferCreated | OfferUpdated):
            self.offers[change.offer.id] = change.offer
        elif isinstance(change, SpendAdded):
            if change.amount:
                key = (change.key_hash, change.epoch)
                self.spend[key] = self.spend.get(key, 0) + change.amount
        elif isinstance(change, EpochOpened):
            return self._open_epoch(change, now)
        elif isinstance(change, EpochClosed):
            return self._close_epoch(change)
        # UsageRecorded, CallSettled, FillRecorded: records of the server's own tables
        # that no rule reads back.
        return None

    # --- the posting engine ---

    def apply_request(
        self,
        request_id: str,
        operations: tuple[Any, ...],
        fingerprint: bytes,
        now: datetime,
        *,
        id_hash: int | None = None,
        new: bool = False,
    ) -> list[dict[str, Any]] | UbcError:
        """One linked request: all its operations, or none (then its error). ``new``: the
        caller knows the id is not taken."""
        hashed = _id_hash(request_id) if id_hash is None else id_hash
        seen = None if new else self.ids.get_hash(hashed)
        if seen is not None:
            if seen != fingerprint_value(fingerprint):
                return IdempotencyConflict(
                    f"id {request_id} was already used with a different payload",
                    detail={"id": request_id},
                )
            return []
        saved: dict[int, tuple[Account, tuple[int, int, int, int]]] = {}
        saved_holds: dict[str, str] = {}
        new_holds: list[str] = []
        effects: list[dict[str, Any]] = []
        rows: list[tuple[str, tuple[Any, ...], list[tuple[str, str, int, int]]]] = []
        try:
            if not request_id or len(request_id) > 96:
                raise BadRequest("request id must be 1 to 96 characters")
            if not 1 <= len(operations) <= MAX_OPERATIONS:
                raise BadRequest(
                    f"a request holds 1 to {MAX_OPERATIONS} operations",
                    detail={"operations": len(operations)},
                )
            for index, op in enumerate(operations):
                transfer_id = f"{request_id}:{index}"
                if isinstance(op, Leg):
                    self._leg(saved, new_holds, effects, rows, transfer_id, op, now)
                elif isinstance(op, Post):
                    self._resolve(
                        saved, saved_holds, effects, rows, transfer_id, op.pending_id,
                        op.amount, "posted", now,
                    )  # fmt: skip
                else:
                    state = "expired" if op.expired else "voided"
                    self._resolve(
                        saved, saved_holds, effects, rows, transfer_id, op.pending_id,
                        None, state, now,
                    )  # fmt: skip
        except UbcError as error:
            for account, counters in saved.values():
                account.restore(counters)
            for hold_id, state in saved_holds.items():
                self.holds[hold_id].state = state
            for hold_id in new_holds:
                self.holds.pop(hold_id, None)
            self.ids.put_hash(hashed, fingerprint)
            return error
        # Settled holds leave the state: only pending ones are ever read again.
        for hold_id in saved_holds:
            if self.holds[hold_id].state != "pending":
                del self.holds[hold_id]
        self.ids.put_hash(hashed, fingerprint)
        if self.keep_rows:
            for transfer_id, transfer, postings in rows:
                self.transfers[(transfer_id,)] = transfer
                for address, side, posted, pending in postings:
                    key = (transfer_id, address, side)
                    old = self.postings.get(key, (0, 0))
                    self.postings[key] = (old[0] + posted, old[1] + pending)
        return effects

    def _account(self, address: str, asset: str) -> Account:
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
        saved: dict[int, tuple[Account, tuple[int, int, int, int]]],
        new_holds: list[str],
        effects: list[dict[str, Any]],
        rows: list[Any],
        transfer_id: str,
        op: Leg,
        now: datetime,
    ) -> None:
        _check_amount(op.amount)
        if op.kind not in _TRANSFER_KINDS:
            raise BadRequest(f"unknown transfer kind {op.kind!r}", detail={"kind": op.kind})
        if op.debit == op.credit:
            raise BadRequest("debit and credit accounts must differ", detail={"account": op.debit})
        if op.memo is not None and len(op.memo) > MAX_MEMO:
            raise BadRequest(f"memo longer than {MAX_MEMO} characters")
        if op.timeout is not None and op.timeout <= timedelta(0):
            raise BadRequest("a hold's timeout must be positive")
        debit = self._account(op.debit, op.asset)
        credit = self._account(op.credit, op.asset)
        if id(debit) not in saved:
            saved[id(debit)] = (debit, debit.counters())
        if id(credit) not in saved:
            saved[id(credit)] = (credit, credit.counters())
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
            debit.dpend += amount
            credit.cpend += amount
        else:
            debit.dp += amount
            credit.cp += amount
        _check(debit, amount)
        _check_overflow(credit)
        phase = "pending" if pending else "posted"
        effects.append(
            {
                "transfer_id": transfer_id,
                "kind": op.kind,
                "debit": op.debit,
                "credit": op.credit,
                "asset": op.asset,
                "amount": amount,
                "phase": phase,
            }
        )
        if pending:
            assert op.timeout is not None
            self.holds[transfer_id] = Hold(
                debit, credit, op.asset, amount, op.kind, "pending", now + op.timeout
            )
            new_holds.append(transfer_id)
        elif self.keep_rows:
            transfer = (op.debit, op.credit, op.asset, amount, op.kind, phase, None, None)
            posting = [(op.debit, "D", amount, 0), (op.credit, "C", amount, 0)]
            rows.append((transfer_id, transfer, posting))

    def _resolve(
        self,
        saved: dict[int, tuple[Account, tuple[int, int, int, int]]],
        saved_holds: dict[str, str],
        effects: list[dict[str, Any]],
        rows: list[Any],
        transfer_id: str,
        pending_id: str,
        amount: int | None,
        to_state: str,
        now: datetime,
    ) -> None:
        hold = self.holds.get(pending_id)
        if hold is None:
            raise TransferNotFound(f"no hold {pending_id}", detail={"pending_id": pending_id})
        if hold.state != "pending":
            raise StateConflict(
                f"hold {pending_id} is already {hold.state}",
                detail={"pending_id": pending_id, "state": hold.state},
            )
        expired = hold.timeout_at is not None and hold.timeout_at <= now
        if expired and to_state != "expired":
            raise StateConflict(
                f"hold {pending_id} has expired",
                detail={"pending_id": pending_id, "state": "expired"},
            )
        if to_state == "expired" and not expired:
            raise StateConflict(f"hold {pending_id} has not expired yet")
        if to_state == "posted":
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
        if id(debit) not in saved:
            saved[id(debit)] = (debit, debit.counters())
        if id(credit) not in saved:
            saved[id(credit)] = (credit, credit.counters())
        saved_holds.setdefault(pending_id, hold.state)
        debit.dpend -= hold.amount
        credit.cpend -= hold.amount
        debit.dp += posted
        credit.cp += posted
        _check_overflow(credit)
        _check_overflow(debit)
        hold.state = to_state
        phase = "post" if to_state == "posted" else "void"
        amount_out = posted if to_state == "posted" else hold.amount
        effects.append(
            {
                "transfer_id": transfer_id,
                "kind": hold.kind,
                "debit": debit.address,
                "credit": credit.address,
                "asset": hold.asset,
                "amount": amount_out,
                "phase": phase,
                "pending_id": pending_id,
            }
        )
        if self.keep_rows and phase == "post":
            transfer = (
                debit.address, credit.address, hold.asset, amount_out, hold.kind, phase,
                pending_id, None,
            )  # fmt: skip
            postings = [
                (debit.address, "D", posted, -hold.amount),
                (credit.address, "C", posted, -hold.amount),
            ]
            rows.append((transfer_id, transfer, postings))

    # --- epochs: the ledger's bulk moves ---

    def _open_epoch(self, change: EpochOpened, now: datetime) -> dict[str, Any]:
        payload = change.payload
        tiers = sorted(payload.allocations)
        legs: list[tuple[Account, str, int]] = []
        for handle in sorted(self.members):
            info = self.members[handle]
            if info.status != "active" or info.tier not in payload.allocations:
                continue
            account = self.accounts.get((f"member:{handle}", payload.asset))
            if account is None:
                continue
            legs.append((account, info.tier, payload.allocations[info.tier]))
        by_tier: dict[str, tuple[int, int]] = {}
        for _, tier, amount in legs:
            count, total = by_tier.get(tier, (0, 0))
            by_tier[tier] = (count + 1, total + amount)
        members = sum(c for c, _ in by_tier.values())
        total = sum(t for _, t in by_tier.values())
        issuance = self.accounts[("system:issuance", payload.asset)]
        self._move(payload.id, [(a, amount) for a, _, amount in legs], issuance, "allocation")
        self.epochs[payload.epoch] = Epoch(
            payload.epoch, payload.asset, payload.carryover_cap, "open"
        )
        parse_timestamp(payload.starts_at)
        return {
            "epoch": payload.epoch,
            "asset": payload.asset,
            "members": members,
            "total": total,
            "tiers": {
                tier: {
                    "members": by_tier.get(tier, (0, 0))[0],
                    "amount": payload.allocations[tier],
                    "total": by_tier.get(tier, (0, 0))[1],
                }
                for tier in tiers
            },
        }

    def _close_epoch(self, change: EpochClosed) -> dict[str, Any]:
        payload = change.payload
        epoch = self.epochs.get(payload.epoch)
        if epoch is None:
            raise NotFound(f"no epoch {payload.epoch}", detail={"epoch": payload.epoch})
        if epoch.status != "open":
            raise StateConflict(f"epoch {payload.epoch} is {epoch.status}")
        asset, cap = epoch.asset, epoch.cap
        count = total = 0
        held: dict[str, int] = {}
        if cap is not None:
            elsewhere = dict(change.held_elsewhere) if change.held_elsewhere else {}
            for address, amount in elsewhere.items():
                account = self.accounts.get((address, asset))
                available = (
                    account.available
                    if account is not None and address.startswith("member:")
                    else None
                )
                if (
                    not isinstance(amount, int)
                    or available is None
                    or not 0 < amount <= available
                    or available <= cap
                ):
                    raise StateConflict(
                        f"the close records an impossible hold of {amount!r} on {address}",
                        detail={"address": address, "held": amount},
                    )
            legs: list[tuple[Account, int]] = []
            for (address, code), account in sorted(self.accounts.items()):
                if code != asset or not address.startswith("member:"):
                    continue
                available = account.available - elsewhere.get(address, 0)
                if available > cap:
                    legs.append((account, available - cap))
            expired = self.accounts[("system:expired", asset)]
            count, total = self._move(payload.id, legs, expired, "expiry", source_is_debit=False)
            held = elsewhere or {
                a.address: a.dpend
                for (address, code), a in self.accounts.items()
                if code == asset
                and address.startswith("member:")
                and a.dpend > 0
                and a.balance > cap
            }
            sellers = {
                o.seller
                for o in self.offers.values()
                if o.status == "open" and o.sell_asset == asset
            }
            self.close_balances.append(
                {
                    s: self.accounts[(s, asset)].balance
                    for s in sellers
                    if (s, asset) in self.accounts
                }
            )
            self.capped.setdefault(asset, []).append((cap, len(self.close_balances) - 1))
        epoch.status = "closed"
        summary: dict[str, Any] = {
            "epoch": payload.epoch,
            "asset": asset,
            "members": count,
            "total": total,
        }
        if held:
            summary["held"] = dict(sorted(held.items()))
        return summary

    def _move(
        self,
        envelope_id: str,
        legs: list[tuple[Account, int]],
        source: Account,
        kind: str,
        *,
        source_is_debit: bool = True,
    ) -> tuple[int, int]:
        total = 0
        for leg, (account, amount) in enumerate(legs):
            total += amount
            if source_is_debit:
                account.cp += amount
            else:
                account.dp += amount
            if self.keep_rows:
                transfer_id = f"{envelope_id}:{leg}"
                debit, credit = (source, account) if source_is_debit else (account, source)
                self.transfers[(transfer_id,)] = (
                    debit.address, credit.address, source.asset, amount, kind, "posted",
                    None, None,
                )  # fmt: skip
                self.postings[(transfer_id, debit.address, "D")] = (amount, 0)
                self.postings[(transfer_id, credit.address, "C")] = (amount, 0)
        if source_is_debit:
            source.dp += total
        else:
            source.cp += total
        return len(legs), total

    # --- reading the result ---

    def balances(self) -> dict[tuple[str, str], int]:
        return {key: a.balance for key, a in self.accounts.items()}

    def invariants(self) -> tuple[dict[str, tuple[int, int]], list[tuple[str, str]]]:
        """Per asset the sums of posted and pending balances; non-negative accounts below 0."""
        sums: dict[str, tuple[int, int]] = {}
        negative = []
        for (address, asset), a in sorted(self.accounts.items()):
            posted, pending = sums.get(asset, (0, 0))
            sums[asset] = (posted + a.balance, pending + a.cpend - a.dpend)
            if a.non_negative and a.available < 0:
                negative.append((address, asset))
        return sums, negative


def _check_amount(amount: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise BadRequest("amounts are integers", detail={"amount": repr(amount)})
    if not 1 <= amount <= MAX_COUNTER:
        raise BadRequest(f"amount must be between 1 and {MAX_COUNTER}", detail={"amount": amount})


def _check(debit: Account, amount: int) -> None:
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
    _check_overflow(debit)


def _check_overflow(account: Account) -> None:
    if max(account.counters()) > MAX_COUNTER:
        raise StateConflict(
            f"account {account.address} would exceed the 64-bit counter range",
            detail={"account": account.address},
        )


def _implements(
    state: MemoryState,
) -> tuple[LedgerLookup, MembersLookup, EpochsLookup, CausesLookup, MarketLookup, MeteringLookup]:
    """Checked by mypy: the in-memory state is every domain's lookup."""
    return (state, state, state, state, state, state)
