"""The auditor's in-memory ledger state: every domain's lookup over dicts, and an applier.

``ubc audit verify`` re-runs a journal through the same rules the server runs (the
registry's rules, unchanged); only the state they read and the applier that carries out
their plans live here instead of in a database:

- balances per (address, asset) and holds, changed only by the ledger's posting engine
  (``ubc.ledger.engine.Postings``, the one the server's group commit runs: the same
  checks, effects and errors);
- members, keys, grants, causes, offers, external references, the configuration, spend
  per key and epoch, and epochs, with the bulk allocation of ``epoch.open`` and the
  expiry of ``epoch.close`` derived exactly as ``ubc.epochs.service`` over
  ``ubc.ledger.bulk`` derives them (legs numbered by handle, by address);
- envelope ids (idempotency): a compact open-addressing table of 64-bit hashes of the
  id and of the payload hash (12 bytes per slot), the only part that grows with entries.

State grows with members, accounts and pending holds, not with entries: resolved holds
are dropped. Transfers and postings are kept only when a comparison with a live ledger
asks for them (``keep_rows``).
"""

from __future__ import annotations

import json
from array import array
from bisect import bisect_right, insort
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ubc.audit.workers import id_hash as _id_hash
from ubc.causes.rules import CausesLookup, CauseStored, cause_address
from ubc.epochs.rules import (
    END_OF_MEMBERS,
    EpochClosed,
    EpochExpired,
    EpochOpened,
    EpochsLookup,
    allocation_for,
    check_held_in_step,
    check_recorded_hold,
    check_step,
    close_summary,
    expire_summary,
    expiry_for,
    open_summary,
)
from ubc.errors import (
    IdempotencyConflict,
    NotFound,
    StateConflict,
    UbcError,
)
from ubc.ledger.engine import (
    NON_NEGATIVE_KINDS,
    SYSTEM_ACCOUNTS,
    AccountState,
    Effect,
    Hold,
    Postings,
    parse_address,
)
from ubc.ledger.rules import ConfigStored, LedgerLookup, RefClaimed, RefUse
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
from ubc.rules import Change, KeyInfo, MemberInfo, Plan
from ubc.rules.payload import parse_timestamp
from ubc.signing import decode_public_key


@dataclass(slots=True)
class Epoch:
    number: int
    asset: str
    cap: int | None
    status: str
    # While closing: the last member address a step has expired.
    cursor: str = ""


class IdTable:
    """Ids seen, each with a fingerprint of its payload: open addressing over two arrays,
    a 64-bit hash of the id and a 32-bit one of the payload (12 bytes per slot).

    A collision of two 64-bit id hashes among a journal's ids is as unlikely as a SHA-256
    prefix collision (about 3 in 10^8 for a billion pairs); 32 bits of the payload's hash
    only tell a repeat of an accepted envelope from a reuse of its id with another
    payload, both of which an auditor reports. This table is the only part of the state
    that grows with the journal's entries.
    """

    def __init__(self, expected: int = 0) -> None:
        # Sized once for the ids expected (at most three quarters full), never grown.
        size = 1 << max(12, (4 * max(expected, 1) // 3).bit_length())
        self.mask = size - 1
        self.keys = array("Q", bytes(8 * size))
        self.values = array("I", bytes(4 * size))
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
        self._put(_id_hash(key), fingerprint_value(fingerprint))

    def put_hash(self, h: int, fingerprint: bytes) -> None:
        self._put(h, fingerprint_value(fingerprint))

    def _put(self, h: int, value: int) -> None:
        if (self.count + 1) * 4 > (self.mask + 1) * 3:
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
        self.values = array("I", bytes(4 * size))
        self.count = 0
        for i, k in enumerate(keys):
            if k:
                self._put(k, values[i])


def fingerprint_value(fingerprint: bytes) -> int:
    """The 32 bits of a payload's hash the id table keeps."""
    return int.from_bytes(fingerprint[:4], "little")


@dataclass(slots=True)
class MemoryState:
    """Every domain's lookup, over dicts; and what an applier changes."""

    keep_rows: bool = False
    accounts: dict[tuple[str, str], AccountState] = field(default_factory=dict)
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
    # Per asset whose epoch is closing: its member addresses in code-point order.
    closing: dict[str, list[str]] = field(default_factory=dict)
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
    engine: _Engine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = _Engine(self)

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
                if asset in self.closing and address.startswith("member:"):
                    insort(self.closing[asset], address)
                self.accounts[(address, asset)] = AccountState(
                    0, address, asset, kind in NON_NEGATIVE_KINDS
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
        elif isinstance(change, EpochExpired):
            return self._expire_step(change)
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
    ) -> list[Effect] | UbcError:
        """One linked request through the ledger's posting engine: its effects, or its
        error. ``new``: the caller knows the id is not taken."""
        hashed = _id_hash(request_id) if id_hash is None else id_hash
        seen = None if new else self.ids.get_hash(hashed)
        if seen is not None:
            if seen != fingerprint_value(fingerprint):
                return IdempotencyConflict(
                    f"id {request_id} was already used with a different payload",
                    detail={"id": request_id},
                )
            return []
        engine = self.engine
        try:
            effects = engine.apply(request_id, operations, now)
        except UbcError as error:
            self.ids.put_hash(hashed, fingerprint)
            return error
        engine.applied()
        self.ids.put_hash(hashed, fingerprint)
        return effects

    # --- epochs: the ledger's bulk moves ---

    def _open_epoch(self, change: EpochOpened, now: datetime) -> dict[str, Any]:
        payload = change.payload
        legs: list[tuple[AccountState, str, int]] = []
        for handle in sorted(self.members):
            info = self.members[handle]
            amount = allocation_for(info.status, info.tier, payload.allocations)
            account = self.accounts.get((f"member:{handle}", payload.asset))
            if amount is None or account is None or info.tier is None:
                continue
            legs.append((account, info.tier, amount))
        by_tier: dict[str, tuple[int, int]] = {}
        for _, tier, amount in legs:
            count, total = by_tier.get(tier, (0, 0))
            by_tier[tier] = (count + 1, total + amount)
        issuance = self.accounts[("system:issuance", payload.asset)]
        self._move(payload.id, [(a, amount) for a, _, amount in legs], issuance, "allocation")
        self.epochs[payload.epoch] = Epoch(
            payload.epoch, payload.asset, payload.carryover_cap, "open"
        )
        parse_timestamp(payload.starts_at)
        return open_summary(payload, by_tier)

    def _epoch(self, number: int) -> Epoch:
        epoch = self.epochs.get(number)
        if epoch is None:
            raise NotFound(f"no epoch {number}", detail={"epoch": number})
        return epoch

    def _close_epoch(self, change: EpochClosed) -> dict[str, Any]:
        payload = change.payload
        epoch = self._epoch(payload.epoch)
        if epoch.status != "open":
            raise StateConflict(f"epoch {payload.epoch} is {epoch.status}")
        asset = epoch.asset
        epoch.status = "closing"
        if epoch.cap is None:
            self._closed(epoch)
            return close_summary(payload.epoch, asset, 0, 0, {}, None)
        self.closing[asset] = sorted(
            address
            for (address, code) in self.accounts
            if code == asset and address.startswith("member:")
        )
        # The server chose where the first step ends; the journal records it.
        through = END_OF_MEMBERS if change.through is None else change.through
        count, total, held, closed = self._expire_range(
            epoch, payload.id, "", through, change.held_elsewhere
        )
        return close_summary(payload.epoch, asset, count, total, held, None if closed else through)

    def _expire_step(self, change: EpochExpired) -> dict[str, Any]:
        payload = change.payload
        epoch = self._epoch(payload.epoch)
        check_step(payload.epoch, epoch.status, epoch.cursor, payload.after)
        count, total, held, closed = self._expire_range(
            epoch, payload.id, payload.after, payload.through, change.held_elsewhere
        )
        return expire_summary(payload.epoch, epoch.asset, count, total, held, closed)

    def _expire_range(
        self,
        epoch: Epoch,
        envelope_id: str,
        after: str,
        through: str,
        held_elsewhere: Mapping[str, int],
    ) -> tuple[int, int, dict[str, int], bool]:
        """One step of a close, as ``ubc.epochs.service`` computes it in SQL."""
        asset, cap = epoch.asset, epoch.cap
        assert cap is not None
        addresses = self.closing[asset]
        start, end = bisect_right(addresses, after), bisect_right(addresses, through)
        elsewhere = dict(held_elsewhere)
        check_held_in_step(elsewhere, after, through)
        for address, amount in elsewhere.items():
            account = self.accounts.get((address, asset))
            available = (
                account.available if account is not None and address.startswith("member:") else None
            )
            check_recorded_hold(address, amount, available, cap)
        legs: list[tuple[AccountState, int]] = []
        for address in addresses[start:end]:
            account = self.accounts[(address, asset)]
            expires = expiry_for(account.available, elsewhere.get(address, 0), cap)
            if expires:
                legs.append((account, expires))
        expired = self.accounts[("system:expired", asset)]
        count, total = self._move(envelope_id, legs, expired, "expiry", source_is_debit=False)
        epoch.cursor = through
        closed = end == len(addresses)
        if closed:
            self._closed(epoch)
        return count, total, elsewhere, closed

    def _closed(self, epoch: Epoch) -> None:
        """The epoch is closed: what the market reads of it from now on."""
        epoch.status = "closed"
        asset = epoch.asset
        self.closing.pop(asset, None)
        if epoch.cap is None:
            return
        sellers = {
            o.seller for o in self.offers.values() if o.status == "open" and o.sell_asset == asset
        }
        self.close_balances.append(
            {s: self.accounts[(s, asset)].balance for s in sellers if (s, asset) in self.accounts}
        )
        self.capped.setdefault(asset, []).append((epoch.cap, len(self.close_balances) - 1))

    def _move(
        self,
        envelope_id: str,
        legs: list[tuple[AccountState, int]],
        source: AccountState,
        kind: str,
        *,
        source_is_debit: bool = True,
    ) -> tuple[int, int]:
        moved = self.engine.move_many(
            envelope_id, legs, source, kind, source_is_debit=source_is_debit
        )
        self.engine.applied()
        return moved

    # --- reading the result ---

    def balances(self) -> dict[tuple[str, str], int]:
        return {key: a.balance for key, a in self.accounts.items()}

    def invariants(self) -> tuple[dict[str, tuple[int, int]], list[tuple[str, str]]]:
        """Per asset the sums of posted and pending balances; non-negative accounts below 0."""
        sums: dict[str, tuple[int, int]] = {}
        negative = []
        for (address, asset), a in sorted(self.accounts.items()):
            posted, pending = sums.get(asset, (0, 0))
            sums[asset] = (posted + a.balance, pending + a.credits_pending - a.debits_pending)
            if a.non_negative and a.available < 0:
                negative.append((address, asset))
        return sums, negative


class _Engine(Postings):
    """The ledger's posting engine over the state's accounts and holds. Settled holds
    leave the state (only pending ones are read again); transfers and postings are kept
    in comparable form when the state keeps rows."""

    def __init__(self, state: MemoryState) -> None:
        super().__init__(state.accounts, state.holds)
        self.state = state
        self.record_bulk = state.keep_rows
        self.settled: list[str] = []
        self.rows: list[tuple[str, tuple[Any, ...], tuple[tuple[str, str, int, int], ...]]] = []

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
        pending_id = effect.pending_id
        if pending_id is not None:
            self.settled.append(pending_id)
        if self.state.keep_rows and effect.phase in ("posted", "post"):
            transfer = (
                debit.address, credit.address, effect.asset, effect.amount, effect.kind,
                effect.phase, pending_id, None,
            )  # fmt: skip
            postings = (
                (debit.address, "D", posted, pending),
                (credit.address, "C", posted, pending),
            )
            self.rows.append((transfer_id, transfer, postings))

    def on_undo(self) -> None:
        self.settled.clear()
        self.rows.clear()

    def applied(self) -> None:
        """The request applied: drop the holds it settled, keep its rows."""
        for hold_id in self.settled:
            self.holds.pop(hold_id, None)
        self.settled.clear()
        if self.rows:
            transfers, postings = self.state.transfers, self.state.postings
            for transfer_id, transfer, legs in self.rows:
                transfers[(transfer_id,)] = transfer
                for address, side, posted, pending in legs:
                    key = (transfer_id, address, side)
                    old = postings.get(key, (0, 0))
                    postings[key] = (old[0] + posted, old[1] + pending)
            self.rows.clear()


def _implements(
    state: MemoryState,
) -> tuple[LedgerLookup, MembersLookup, EpochsLookup, CausesLookup, MarketLookup, MeteringLookup]:
    """Checked by mypy: the in-memory state is every domain's lookup."""
    return (state, state, state, state, state, state)
