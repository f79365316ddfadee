"""The write path's lookup: every domain's reads over the database, for one batch.

It answers as the envelopes planned before in the batch leave the state: what a plan
claims (external references, a capped key's spend) counts as soon as it is planned, what
a change writes once the applier has written it, and an offer an earlier envelope of the
batch touched is read after applying what is planned (``flush``). Members and keys read
once per batch are kept for the batch; configurations by the envelope that set them, and
API-key grants (never changed in what usage reads), are kept in :class:`Caches`, which
the server shares across batches and a re-run of a journal gets fresh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ubc.causes import store as causes_store
from ubc.causes.rules import CausesLookup
from ubc.epochs import service as epochs_service
from ubc.epochs.rules import EpochOpened, EpochsLookup
from ubc.ledger.config import current_config_version
from ubc.ledger.rules import ConfigStored, LedgerLookup, RefClaimed, RefUse
from ubc.market import store as market_store
from ubc.market.rules import MarketLookup, OfferCreated, OfferUpdated, OfferView
from ubc.members import store as members_store
from ubc.members.rules import KeyRotated, MemberCreated, MembersLookup, MemberStatusSet
from ubc.metering import store as metering_store
from ubc.metering.rules import Grant, MeteringLookup, SpendAdded
from ubc.rules import Change, KeyInfo, MemberInfo, Plan
from ubc.signing import decode_public_key

_CACHE_MAX = 100_000
_CONFIGS_MAX = 64


@dataclass(slots=True)
class Caches:
    """What never changes once written: configuration bodies by the envelope that set
    them, API-key grants by key hash."""

    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    grants: dict[str, Grant] = field(default_factory=dict)


#: The server's, shared by every batch of the process.
PROCESS_CACHES = Caches()


@dataclass(slots=True)
class DatabaseLookup:
    session: Session
    caches: Caches
    # Applies every envelope planned so far in the batch (set by the write path).
    flush: Callable[[], None] = field(default=lambda: None)
    keys: dict[str, KeyInfo | None] = field(default_factory=dict)
    members: dict[str, MemberInfo | None] = field(default_factory=dict)
    refs: set[str] = field(default_factory=set)
    grants: dict[str, Grant | None] = field(default_factory=dict)
    spent_: dict[tuple[str, int], int] = field(default_factory=dict)
    offers_touched: set[str] = field(default_factory=set)
    _config: dict[str, Any] | None = None
    _spend_epoch: int | None = None

    # --- what the batch learns ---

    def known_versions(self, *, config: str | None, spend_epoch: int | None) -> None:
        """What the write path read with the journal head: the envelope that set the
        configuration in force (its body may be cached) and the spend epoch."""
        self._spend_epoch = int(spend_epoch or 0)
        if config is not None:
            cached = self.caches.configs.get(config)
            if cached is not None:
                self._config = cached

    def preload(self, *, keyids: set[str], handles: set[str | None]) -> None:
        session = self.session
        keys_t, members_t = members_store.keys_t, members_store.members_t
        wanted = sorted(k for k in keyids if k not in self.keys)
        for keyid in wanted:
            self.keys[keyid] = None
        if wanted:
            for key in session.execute(
                select(
                    keys_t.c.keyid, keys_t.c.handle, keys_t.c.public_key, keys_t.c.current
                ).where(keys_t.c.keyid.in_(wanted))
            ):
                self.keys[key.keyid] = KeyInfo(
                    key.keyid, key.handle, decode_public_key(key.public_key), key.current
                )
        names = sorted(h for h in handles if h is not None and h not in self.members)
        for handle in names:
            self.members[handle] = None
        if names:
            for member in session.execute(
                select(members_t.c.handle, members_t.c.status, members_t.c.tier).where(
                    members_t.c.handle.in_(names)
                )
            ):
                self.members[member.handle] = MemberInfo(member.handle, member.status, member.tier)

    def preloaded(
        self,
        keyids: Sequence[str],
        key_rows: Sequence[Sequence[Any]],
        handles: Sequence[str],
        member_rows: Sequence[Sequence[Any]],
    ) -> None:
        """What the write path read for the batch with the head lock (the rows of
        ``member_keys`` for ``keyids`` and of ``members`` for ``handles``, columns as in
        :meth:`preload`): known from now on, as if preloaded."""
        for keyid in keyids:
            self.keys.setdefault(keyid, None)
        for keyid, handle, public_key, current in key_rows:
            self.keys[keyid] = KeyInfo(keyid, handle, decode_public_key(public_key), bool(current))
        for handle in handles:
            self.members.setdefault(handle, None)
        for handle, status, tier in member_rows:
            self.members[handle] = MemberInfo(handle, status, tier)

    def planned(self, plan: Plan) -> None:
        """A plan was made: what it claims counts for the next envelopes of the batch."""
        for change in plan.changes:
            if isinstance(change, RefClaimed):
                self.refs.add(change.ref)
            elif isinstance(change, SpendAdded):
                key = (change.key_hash, change.epoch)
                self.spent_[key] = self.spent_.get(key, 0) + change.amount
            elif isinstance(change, OfferCreated | OfferUpdated):
                self.offers_touched.add(change.offer_id)

    def applied(self, change: Change) -> None:
        """A change was written: what the batch keeps of it follows."""
        if isinstance(change, MemberCreated):
            self.members[change.handle] = MemberInfo(change.handle, change.status, None)
            self.keys[change.keyid] = KeyInfo(
                change.keyid, change.handle, decode_public_key(change.public_key), True
            )
        elif isinstance(change, KeyRotated):
            for keyid, info in list(self.keys.items()):
                if info is not None and info.handle == change.handle:
                    self.keys[keyid] = KeyInfo(info.keyid, info.handle, info.public_key, False)
            self.keys[change.keyid] = KeyInfo(
                change.keyid, change.handle, decode_public_key(change.public_key), True
            )
        elif isinstance(change, MemberStatusSet):
            self.members[change.handle] = MemberInfo(change.handle, change.status, change.tier)
        elif isinstance(change, ConfigStored):
            self._config = change.body
        elif isinstance(change, EpochOpened):
            self._spend_epoch = None

    # --- the kernel's reads ---

    def member(self, handle: str) -> MemberInfo | None:
        if handle not in self.members:
            self.preload(keyids=set(), handles={handle})
        return self.members[handle]

    def key(self, keyid: str) -> KeyInfo | None:
        if keyid not in self.keys:
            self.preload(keyids={keyid}, handles=set())
        return self.keys[keyid]

    def config(self) -> Mapping[str, Any]:
        if self._config is None:
            envelope_id, body = current_config_version(self.session)
            configs = self.caches.configs
            if len(configs) >= _CONFIGS_MAX:
                configs.clear()
            configs[envelope_id] = body
            self._config = body
        return self._config

    def stewards(self, cause: str) -> frozenset[str] | None:
        return causes_store.stewards(self.session, cause)

    # --- the domains' reads ---

    def external_ref(self, ref: str) -> RefUse | None:
        if ref in self.refs:
            return RefUse("", earlier_in_batch=True)
        used = members_store.external_ref_user(self.session, ref)
        return None if used is None else RefUse(used)

    def grant_exists(self, key_hash: str) -> bool:
        return members_store.grant_exists(self.session, key_hash)

    def grant_revoked(self, key_hash: str, account: str) -> bool | None:
        return members_store.grant_revoked(self.session, key_hash, account)

    def grant(self, key_hash: str) -> Grant | None:
        found = self.caches.grants.get(key_hash)
        if found is not None:
            return found
        if key_hash not in self.grants:
            grant = metering_store.read_grant(self.session, key_hash)
            self.grants[key_hash] = grant
            if grant is not None:
                if len(self.caches.grants) >= _CACHE_MAX:
                    self.caches.grants.clear()
                self.caches.grants[key_hash] = grant
        return self.grants[key_hash]

    def spend_epoch(self) -> int:
        if self._spend_epoch is None:
            self._spend_epoch = metering_store.spend_epoch(self.session)
        return self._spend_epoch

    def spent(self, key_hash: str, epoch: int) -> int:
        key = (key_hash, epoch)
        if key not in self.spent_:
            self.spent_[key] = metering_store.read_spent(self.session, key_hash, epoch)
        return self.spent_[key]

    def asset_exists(self, code: str) -> bool:
        return epochs_service.asset_exists(self.session, code)

    def latest_epoch(self) -> tuple[int, str] | None:
        return epochs_service.latest_epoch(self.session)

    def epoch_state(self, number: int) -> tuple[str, str] | None:
        return epochs_service.epoch_state(self.session, number)

    def cause_exists(self, slug: str) -> bool:
        return causes_store.cause_exists(self.session, slug)

    def offer(self, offer_id: str) -> OfferView | None:
        if offer_id in self.offers_touched:
            self.flush()
            self.offers_touched.clear()
        return market_store.read_offer(self.session, offer_id)

    def capped_closes(self, asset: str) -> int:
        return market_store.capped_closes(self.session, asset)

    def capped_close_list(self, asset: str) -> list[tuple[int, int]]:
        return market_store.capped_close_list(self.session, asset)

    def posted_balance_at(self, address: str, asset: str, last_posting: int) -> int:
        return market_store.posted_balance_at(self.session, address, asset, last_posting)


def _implements(
    look: DatabaseLookup,
) -> tuple[LedgerLookup, MembersLookup, EpochsLookup, CausesLookup, MarketLookup, MeteringLookup]:
    """Checked by mypy: the write path's lookup is every domain's lookup."""
    return (look, look, look, look, look, look)
