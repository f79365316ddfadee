"""The rules: who may sign what, and what each accepted payload does to the ledger.

``plan`` turns an authenticated payload into the ledger operations it derives and the
state change it makes; the server applies it, and the auditor replays the same
function over the journal (one implementation, two users).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.orm import Session

from ubc.envelopes.models import LedgerConfigRow
from ubc.envelopes.payloads import (
    ApiKeyGrant,
    ApiKeyRevoke,
    Deposit,
    EpochClose,
    EpochOpen,
    HoldExpire,
    KeyRotate,
    LedgerConfig,
    MemberAdmit,
    MemberRegister,
    MemberUpdate,
    Payload,
    TransferPayload,
    Usage,
    Withdrawal,
    parse_timestamp,
    payload_json,
)
from ubc.epochs import service as epochs
from ubc.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    IdempotencyConflict,
    MissingSignature,
    NotFound,
    StateConflict,
    Unauthenticated,
)
from ubc.gateway.models import ApiKeySpend, GatewayHold, UsageRecord
from ubc.ledger import service as ledger
from ubc.ledger.service import LedgerRequest, Leg, Operation, Post, Void
from ubc.members.models import ApiKey, ExternalRef, Member, MemberKey
from ubc.signing import Envelope, decode_public_key, key_id, verified_keyids

if TYPE_CHECKING:
    from ubc.envelopes.service import LedgerContext

members_t = Member.__table__  # type: ignore[attr-defined]
keys_t = MemberKey.__table__  # type: ignore[attr-defined]
apikeys_t = ApiKey.__table__  # type: ignore[attr-defined]
refs_t = ExternalRef.__table__  # type: ignore[attr-defined]
config_t = LedgerConfigRow.__table__  # type: ignore[attr-defined]
usage_t = UsageRecord.__table__  # type: ignore[attr-defined]
spend_t = ApiKeySpend.__table__  # type: ignore[attr-defined]
gateway_holds_t = GatewayHold.__table__  # type: ignore[attr-defined]

# Process-wide caches of what never changes once written: configuration bodies by the
# envelope that set them (the write path reads which is in force with the journal head)
# and API-key grants by key hash. Replays never use them.
_CONFIG_CACHE: dict[str, dict[str, Any]] = {}
_GRANT_CACHE: dict[str, tuple[Any, ...]] = {}
_CACHE_MAX = 100_000

#: The asset models are priced in and paid with.
COMPUTE_ASSET = "CU"
# How long a hold re-placed by an auditor's replay would live (it is settled at once).
_REPLAY_HOLD = timedelta(hours=1)

#: Types a client may submit.
SUBMITTABLE = frozenset(
    {
        "member.register",
        "key.rotate",
        "apikey.grant",
        "apikey.revoke",
        "transfer",
        "member.admit",
        "member.update",
        "deposit",
        "withdrawal",
        "epoch.open",
        "epoch.close",
        "offer.create",
        "offer.fill",
        "offer.cancel",
        "cause.register",
        "cause.update",
    }
)
#: Types only the ledger itself writes (signed with the ledger key, never submitted by
#: clients): the server's own submissions and an auditor's replay pass ``internal``.
LEDGER_ONLY = frozenset({"ledger.genesis", "ledger.config", "usage", "hold.expire", "offer.expire"})

# A state change, run once the envelope is accepted; an epoch returns its journal summary.
AfterApply = Callable[[], dict[str, Any] | None]


@dataclass(frozen=True, slots=True)
class Plan:
    """What an accepted payload does: ledger operations and/or a change of state.

    ``before`` runs once every earlier envelope of the batch has applied, just before the
    operations (an auditor's replay re-places a hold that was never journaled).
    """

    operations: tuple[Operation, ...] = ()
    accounts: frozenset[str] = frozenset()
    after: AfterApply | None = None
    before: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class MemberInfo:
    handle: str
    status: str
    tier: str | None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    keyid: str
    handle: str
    public_key: bytes
    current: bool


@dataclass(frozen=True, slots=True)
class Signers:
    """Whose signatures verified on an envelope."""

    operator: bool = False
    ledger: bool = False
    current: frozenset[str] = frozenset()  # handles whose current key signed
    rotated: frozenset[str] = frozenset()  # handles whose old key signed
    payload_keys: frozenset[bytes] = frozenset()  # keys named in the payload that signed


def new_id() -> str:
    return str(uuid.uuid4())


def actor_handle(actor: str) -> str | None:
    return actor.removeprefix("member:") if actor.startswith("member:") else None


@dataclass(slots=True)
class State:
    """Members and keys as the rules see them, cached for one batch and kept up to date."""

    session: Session
    ctx: LedgerContext
    now: datetime
    # The auditor's replay applies a large epoch at once instead of in the background.
    replay: bool = False
    hints: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The server's own envelopes (usage, expiries) and replays may carry ledger-only types.
    internal: bool = False
    # Applies every envelope planned so far in the batch (set by the write path), for a
    # rule that must read what an earlier envelope of the batch did (an offer's fills).
    flush: Callable[[], None] = field(default=lambda: None)
    keys: dict[str, KeyInfo | None] = field(default_factory=dict)
    members: dict[str, MemberInfo | None] = field(default_factory=dict)
    refs: set[str] = field(default_factory=set)
    _config: dict[str, Any] | None = None
    _spend_epoch: int | None = None
    grants: dict[str, tuple[Any, ...] | None] = field(default_factory=dict)
    spent: dict[tuple[str, int], int] = field(default_factory=dict)
    # Rows the rules write in bulk once the batch is applied (flush_deferred).
    usage_rows: list[dict[str, Any]] = field(default_factory=list)
    settled_calls: list[str] = field(default_factory=list)

    def known_versions(self, *, config: str | None, spend_epoch: int | None) -> None:
        """What the write path read with the journal head: the envelope that set the
        configuration in force (its body comes from a process-wide cache) and the spend
        epoch. A replay uses no cache: it reads what it replays."""
        self._spend_epoch = int(spend_epoch or 0)
        if config is not None and not self.replay:
            cached = _CONFIG_CACHE.get(config)
            if cached is not None:
                self._config = cached

    def spend_epoch(self) -> int:
        if self._spend_epoch is None:
            self._spend_epoch = spend_epoch(self.session)
        return self._spend_epoch

    def grant(self, key_hash: str) -> tuple[Any, ...] | None:
        """An API-key grant's account, scopes, models and spend cap.

        A grant never changes those (only whether it is revoked, which usage does not look
        at) and a key hash is granted once, so what was found is cached for the process.
        """
        found = None if self.replay else _GRANT_CACHE.get(key_hash)
        if found is not None:
            return found
        if key_hash not in self.grants:
            row = self.session.execute(
                select(
                    apikeys_t.c.account,
                    apikeys_t.c.scopes,
                    apikeys_t.c.models,
                    apikeys_t.c.spend_cap_per_epoch,
                ).where(apikeys_t.c.key_hash == key_hash)
            ).first()
            self.grants[key_hash] = None if row is None else tuple(row)
            if row is not None and not self.replay:
                if len(_GRANT_CACHE) >= _CACHE_MAX:
                    _GRANT_CACHE.clear()
                _GRANT_CACHE[key_hash] = tuple(row)
        return self.grants[key_hash]

    def flush_deferred(self) -> None:
        """Write what the batch's usage and expiry entries left for the end."""
        if self.usage_rows:
            self.session.execute(insert(usage_t), self.usage_rows)
            self.usage_rows = []
        if self.settled_calls:
            for start in range(0, len(self.settled_calls), 1000):
                self.session.execute(
                    delete(gateway_holds_t).where(
                        gateway_holds_t.c.request_id.in_(self.settled_calls[start : start + 1000])
                    )
                )
            self.settled_calls = []

    def config(self) -> dict[str, Any]:
        """The configuration in force (latest genesis or config payload), cached per batch."""
        if self._config is None:
            self._config = current_config(self.session, cache=not self.replay)
        return self._config

    def set_config(self, body: dict[str, Any]) -> None:
        self._config = body

    def preload(self, *, keyids: set[str], handles: set[str | None]) -> None:
        wanted = sorted(k for k in keyids if k not in self.keys)
        for keyid in wanted:
            self.keys[keyid] = None
        if wanted:
            for row in self.session.execute(
                select(
                    keys_t.c.keyid, keys_t.c.handle, keys_t.c.public_key, keys_t.c.current
                ).where(keys_t.c.keyid.in_(wanted))
            ):
                self.keys[row[0]] = KeyInfo(row[0], row[1], decode_public_key(row[2]), row[3])
        names = sorted(h for h in handles if h is not None and h not in self.members)
        for handle in names:
            self.members[handle] = None
        if names:
            for row in self.session.execute(
                select(members_t.c.handle, members_t.c.status, members_t.c.tier).where(
                    members_t.c.handle.in_(names)
                )
            ):
                self.members[row[0]] = MemberInfo(row[0], row[1], row[2])

    def key(self, keyid: str) -> KeyInfo | None:
        if keyid not in self.keys:
            self.preload(keyids={keyid}, handles=set())
        return self.keys[keyid]

    def member(self, handle: str) -> MemberInfo | None:
        if handle not in self.members:
            self.preload(keyids=set(), handles={handle})
        return self.members[handle]

    def authenticate(
        self, envelope: Envelope, payload: Payload, preverified: frozenset[str] = frozenset()
    ) -> Signers:
        """Verify the signatures against every key the ledger knows (and keys the payload
        introduces); Unauthenticated when none verifies.

        ``preverified`` are keyids whose signatures were already checked against the same
        public keys outside the transaction (keys never change their bytes, only whether
        they are current), so only the others are verified here.
        """
        candidates: dict[str, bytes] = dict(self.ctx.operator_keys)
        candidates[self.ctx.ledger_keyid] = self.ctx.ledger_public_key
        payload_keys: list[bytes] = []
        for name in ("public_key", "new_public_key"):
            value = getattr(payload, name, None)
            if isinstance(value, str):
                try:
                    payload_keys.append(decode_public_key(value))
                except ValueError as exc:
                    raise BadRequest(f"field {name!r}: {exc}") from None
        for public in payload_keys:
            candidates.setdefault(key_id(public), public)
        for signature in envelope.signatures:
            if signature.keyid in candidates:
                continue  # the ledger's or an operator's key, not a member's
            info = self.key(signature.keyid)
            if info is not None:
                candidates[info.keyid] = info.public_key
        remaining = {k: v for k, v in candidates.items() if k not in preverified}
        verified = preverified | verified_keyids(envelope, remaining)
        if not verified:
            raise Unauthenticated(
                "no signature verifies under a key this ledger knows",
                detail={"keyids": [s.keyid for s in envelope.signatures]},
            )
        current: set[str] = set()
        rotated: set[str] = set()
        for keyid in verified:
            info = self.keys.get(keyid)
            if info is not None:
                (current if info.current else rotated).add(info.handle)
        return Signers(
            operator=any(k in self.ctx.operator_keys for k in verified),
            ledger=self.ctx.ledger_keyid in verified,
            current=frozenset(current),
            rotated=frozenset(rotated),
            payload_keys=frozenset(p for p in payload_keys if key_id(p) in verified),
        )


def plan(state: State, type_: str, payload: Payload, signers: Signers) -> Plan:
    """Authorize the signers for ``payload`` and derive what it does."""
    if type_ in LEDGER_ONLY and (type_ == "ledger.genesis" or not state.internal):
        raise Forbidden(f"{type_} envelopes are written only by the ledger itself")
    rule = _RULES[type_]
    return rule(state, payload, signers)


# --- one rule per payload type -----------------------------------------------------------


def _transfer(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, TransferPayload)
    handle = _active_member(state, payload.actor, signers)
    own = f"member:{handle}"
    if payload.from_.startswith("cause:"):
        cause_rules.require_steward(state, payload.from_, handle)
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


def _deposit(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, Deposit)
    _operator(payload, signers)
    _claim_ref(state, payload.external_ref, payload.id)
    leg = Leg(
        "system:deposits",
        payload.to,
        payload.asset,
        payload.amount,
        "deposit",
        f"external_ref {payload.external_ref}",
    )
    return Plan(
        operations=(leg,), after=lambda: _store_ref(state, payload.external_ref, payload.id)
    )


def _withdrawal(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, Withdrawal)
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
    _require_status(state, owner)
    _claim_ref(state, payload.external_ref, payload.id)
    leg = Leg(
        payload.from_,
        "system:deposits",
        payload.asset,
        payload.amount,
        "withdrawal",
        f"external_ref {payload.external_ref}",
    )
    return Plan(
        operations=(leg,), after=lambda: _store_ref(state, payload.external_ref, payload.id)
    )


def _register(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, MemberRegister)
    public = decode_public_key(payload.public_key)
    if public not in signers.payload_keys:
        raise MissingSignature("member.register must be signed by the key it registers")
    if payload.actor != f"member:{payload.handle}":
        raise Forbidden(f"actor must be member:{payload.handle}")
    if state.member(payload.handle) is not None:
        raise Conflict(f"handle {payload.handle} is taken", detail={"handle": payload.handle})
    keyid = key_id(public)
    if state.key(keyid) is not None:
        raise Conflict("this public key is already registered", detail={"keyid": keyid})
    status = "active" if state.ctx.enrollment == "open" else "pending"

    def after() -> None:
        state.session.execute(
            insert(members_t).values(
                handle=payload.handle,
                status=status,
                tier=None,
                display_name=payload.display_name,
                created_at=state.now,
            )
        )
        state.session.execute(
            insert(keys_t).values(
                keyid=keyid,
                handle=payload.handle,
                public_key=payload.public_key,
                current=True,
                created_at=state.now,
            )
        )
        ledger.open_accounts(
            state.session,
            [(f"member:{payload.handle}", a) for a in state.ctx.assets],
            now=state.now,
        )
        state.members[payload.handle] = MemberInfo(payload.handle, status, None)
        state.keys[keyid] = KeyInfo(keyid, payload.handle, public, True)

    return Plan(accounts=frozenset({f"member:{payload.handle}"}), after=after)


def _rotate(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, KeyRotate)
    if payload.actor != f"member:{payload.handle}":
        raise Forbidden(f"actor must be member:{payload.handle}")
    handle = _member_signer(state, payload.actor, signers)
    _require_status(state, handle, allow_pending=True)
    new = decode_public_key(payload.new_public_key)
    if new not in signers.payload_keys:
        raise MissingSignature(
            "key.rotate must be signed by the new key as well as the current one"
        )
    new_id_ = key_id(new)
    if state.key(new_id_) is not None:
        raise Conflict("the new key is already registered", detail={"keyid": new_id_})

    def after() -> None:
        state.session.execute(
            update(keys_t).where(keys_t.c.handle == handle, keys_t.c.current).values(current=False)
        )
        state.session.execute(
            insert(keys_t).values(
                keyid=new_id_,
                handle=handle,
                public_key=payload.new_public_key,
                current=True,
                created_at=state.now,
            )
        )
        for keyid, info in list(state.keys.items()):
            if info is not None and info.handle == handle:
                state.keys[keyid] = KeyInfo(info.keyid, handle, info.public_key, False)
        state.keys[new_id_] = KeyInfo(new_id_, handle, new, True)

    return Plan(accounts=frozenset({payload.actor}), after=after)


def _grant(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, ApiKeyGrant)
    handle = _active_member(state, payload.actor, signers)
    _own_account(state, payload.account, handle)
    exists = state.session.execute(
        select(apikeys_t.c.key_hash).where(apikeys_t.c.key_hash == payload.key_hash)
    ).first()
    if exists is not None:
        raise Conflict("an API key with this hash is already granted")
    expires = parse_timestamp(payload.expires_at) if payload.expires_at else None
    if expires is not None and expires <= state.now:
        raise BadRequest("expires_at is in the past")

    def after() -> None:
        state.session.execute(
            insert(apikeys_t).values(
                key_hash=payload.key_hash,
                account=payload.account,
                label=payload.label,
                scopes=",".join(sorted(set(payload.scopes))),
                spend_cap_per_epoch=payload.spend_cap_per_epoch,
                models=json.dumps(payload.models) if payload.models is not None else None,
                expires_at=expires,
                rpm=payload.rpm,
                tpm=payload.tpm,
                granted_by=payload.actor,
                revoked=False,
                created_at=state.now,
            )
        )

    return Plan(accounts=frozenset({payload.account}), after=after)


def _revoke(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, ApiKeyRevoke)
    handle = _active_member(state, payload.actor, signers)
    _own_account(state, payload.account, handle)
    row = state.session.execute(
        select(apikeys_t.c.revoked).where(
            apikeys_t.c.key_hash == payload.key_hash, apikeys_t.c.account == payload.account
        )
    ).first()
    if row is None:
        raise NotFound("no such API key on this account", detail={"key_hash": payload.key_hash})
    if row[0]:
        raise StateConflict("this API key is already revoked")

    def after() -> None:
        state.session.execute(
            update(apikeys_t).where(apikeys_t.c.key_hash == payload.key_hash).values(revoked=True)
        )

    return Plan(accounts=frozenset({payload.account}), after=after)


def _admit(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, MemberAdmit)
    _operator(payload, signers)
    member = state.member(payload.handle)
    if member is None:
        raise NotFound(f"no member {payload.handle}", detail={"handle": payload.handle})
    if member.status != "pending":
        raise StateConflict(f"member {payload.handle} is already admitted ({member.status})")

    def after() -> None:
        _set_member(state, payload.handle, status="active", tier=payload.tier)

    return Plan(accounts=frozenset({f"member:{payload.handle}"}), after=after)


def _update_member(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, MemberUpdate)
    _operator(payload, signers)
    member = state.member(payload.handle)
    if member is None:
        raise NotFound(f"no member {payload.handle}", detail={"handle": payload.handle})
    if payload.tier is None and payload.status is None:
        raise BadRequest("member.update needs a tier or a status")
    if payload.status is not None and member.status == "pending":
        raise StateConflict(f"member {payload.handle} is not admitted yet: use member.admit")

    def after() -> None:
        _set_member(
            state,
            payload.handle,
            status=payload.status or member.status,
            tier=payload.tier if payload.tier is not None else member.tier,
        )

    return Plan(accounts=frozenset({f"member:{payload.handle}"}), after=after)


def _epoch_open(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, EpochOpen)
    _operator(payload, signers)
    epochs.check_open(state.session, payload)

    def after() -> dict[str, Any]:
        state._spend_epoch = None
        summary = epochs.open_epoch(state.session, payload, payload.id, now=state.now)
        if state.replay or summary["members"] <= epochs.CHUNK:
            epochs.apply_all_allocations(state.session, payload.epoch, now=state.now)
        return summary

    return Plan(after=after)


def _epoch_close(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, EpochClose)
    _operator(payload, signers)
    epochs.check_close(state.session, payload)
    held = None
    if state.replay:
        # Holds are not journaled; the close's entry records those that limited an expiry.
        summary = (state.hints.get(payload.id) or {}).get("summary") or {}
        held = summary.get("held", {})

    return Plan(
        after=lambda: epochs.close_epoch(
            state.session, payload, payload.id, now=state.now, replayed_holds=held
        )
    )


def _ledger_config(state: State, payload: Payload, signers: Signers) -> Plan:
    """A change of prices, market fee or CU price (ledger key and an operator key)."""
    assert isinstance(payload, LedgerConfig)
    if not signers.ledger or not signers.operator:
        raise MissingSignature("ledger.config needs the signatures of the ledger and the operator")
    if payload.actor != "ledger":
        raise Forbidden("actor must be ledger")
    body = payload_json(payload)
    current = state.config()
    for name in ("ledger_public_key", "operator_public_keys", "enrollment", "assets"):
        if body[name] != current.get(name):
            raise StateConflict(
                f"ledger.config cannot change {name} (only models, market_fee_bps and "
                "cu_price_usd)",
                detail={"field": name},
            )

    def after() -> None:
        store_config(state.session, payload.id, body)
        state.set_config(body)

    return Plan(after=after)


def usage_cost(input_tokens: int, output_tokens: int, price: dict[str, int]) -> int:
    """``ceil((input × in_price + output × out_price) / 1000)`` CU (DESIGN section 4)."""
    return -(-(input_tokens * price["input"] + output_tokens * price["output"]) // 1000)


def hold_request_id(request_id: str) -> str:
    """The ledger request of a model call's hold; its one leg is ``<this>:0``."""
    return f"hold:{request_id}"


def call_cost(input_tokens: int, output_tokens: int, price: dict[str, int], held: int) -> int:
    """What a call is billed: its cost at ``price``, never more than its hold."""
    return min(usage_cost(input_tokens, output_tokens, price), held)


def spend_epoch(session: Session) -> int:
    """The epoch a call's spend counts toward: the latest opened (0 before the first)."""
    value = session.execute(select(spend_epoch_query())).scalar_one_or_none()
    return int(value or 0)


def _usage(state: State, payload: Payload, signers: Signers) -> Plan:
    """A metered call: checked against its grant and the prices in force, then its hold is
    posted for ``cost`` (the rest released)."""
    assert isinstance(payload, Usage)
    _ledger_signed(payload, signers)
    grant = state.grant(payload.key_hash)
    if grant is None:
        raise NotFound("no API key grant with this hash", detail={"key_hash": payload.key_hash})
    account, scopes, models, cap = grant
    if account != payload.account:
        raise Forbidden(
            f"the key is granted on {account}, not {payload.account}",
            detail={"account": payload.account, "granted": account},
        )
    if "models" not in scopes.split(","):
        raise Forbidden("the key has no `models` scope")
    if models is not None and payload.model not in json.loads(models):
        raise Forbidden(f"the key may not use model {payload.model}")
    price = state.config().get("models", {}).get(payload.model)
    if price is None:
        raise BadRequest(f"model {payload.model} has no published price")
    expected = call_cost(payload.input_tokens, payload.output_tokens, price, payload.held)
    if payload.cost != expected:
        raise BadRequest(
            f"cost {payload.cost} does not match the prices in force: {expected}",
            detail={"cost": payload.cost, "expected": expected, "price": price},
        )
    epoch = state.spend_epoch()
    if cap is not None:
        key = (payload.key_hash, epoch)
        spent = state.spent.get(key)
        if spent is None:
            spent = (
                state.session.execute(
                    select(spend_t.c.spent).where(
                        spend_t.c.key_hash == payload.key_hash, spend_t.c.epoch == epoch
                    )
                ).scalar_one_or_none()
                or 0
            )
        if spent + payload.cost > cap:
            raise Forbidden(
                f"the key's spend cap of {cap} per epoch would be exceeded",
                detail={"cap": cap, "spent": spent, "cost": payload.cost},
            )
        # Counted now, so that the next usage of this key in the batch sees it.
        state.spent[key] = spent + payload.cost
    hold_id = f"{hold_request_id(payload.request_id)}:0"
    operation: Operation = Post(hold_id, payload.cost) if payload.cost else Void(hold_id)
    before = None
    if state.replay:
        hold = Leg(
            payload.account,
            "system:consumption",
            COMPUTE_ASSET,
            payload.held,
            "usage",
            timeout=_REPLAY_HOLD,
        )

        def before() -> None:
            ledger.apply(
                state.session,
                LedgerRequest(hold_request_id(payload.request_id), (hold,)),
                now=state.now,
            )

    def after() -> None:
        session = state.session
        state.usage_rows.append(
            {
                "request_id": payload.request_id,
                "envelope_id": payload.id,
                "account": payload.account,
                "key_hash": payload.key_hash,
                "model": payload.model,
                "epoch": epoch,
                "input_tokens": payload.input_tokens,
                "output_tokens": payload.output_tokens,
                "held": payload.held,
                "cost": payload.cost,
                "created_at": state.now,
            }
        )
        state.settled_calls.append(payload.request_id)
        if cap is not None and payload.cost:
            updated = session.execute(
                update(spend_t)
                .where(spend_t.c.key_hash == payload.key_hash, spend_t.c.epoch == epoch)
                .values(spent=spend_t.c.spent + payload.cost)
            )
            if not getattr(updated, "rowcount", 0):
                session.execute(
                    insert(spend_t).values(
                        key_hash=payload.key_hash, epoch=epoch, spent=payload.cost
                    )
                )
        return None

    return Plan(
        operations=(operation,),
        accounts=frozenset({payload.account}),
        after=after,
        before=before,
    )


def _hold_expire(state: State, payload: Payload, signers: Signers) -> Plan:
    """A model call's hold that timed out: released unbilled (the operator bears it)."""
    assert isinstance(payload, HoldExpire)
    _ledger_signed(payload, signers)
    request_id = payload.hold_id.removeprefix("hold:").removesuffix(":0")
    before = None
    if state.replay:
        # The hold itself was never journaled: the entry's own effect says what it was.
        effects = (state.hints.get(payload.id) or {}).get("effects") or []
        if len(effects) != 1 or effects[0].get("pending_id") != payload.hold_id:
            raise BadRequest("the entry does not record the hold it releases")
        effect = effects[0]
        hold = Leg(
            effect["debit"],
            effect["credit"],
            effect["asset"],
            effect["amount"],
            "usage",
            timeout=timedelta(seconds=1),
        )

        def before() -> None:
            # Placed as of a moment before this entry, so that it has expired by now.
            ledger.apply(
                state.session,
                LedgerRequest(hold_request_id(request_id), (hold,)),
                now=state.now - timedelta(seconds=2),
            )

    def after() -> None:
        state.settled_calls.append(request_id)
        return None

    return Plan(
        operations=(Void(payload.hold_id, expired=True),),
        after=after,
        before=before,
    )


# --- helpers ------------------------------------------------------------------------------


def _member_signer(state: State, actor: str, signers: Signers) -> str:
    handle = actor_handle(actor)
    if handle is None:
        raise Forbidden("this payload must be signed by a member")
    if handle in signers.current:
        return handle
    if handle in signers.rotated:
        raise Forbidden(
            f"the key that signed was rotated away from member:{handle}",
            detail={"actor": actor},
        )
    raise Forbidden(f"the signer may not act for {actor}", detail={"actor": actor})


def _active_member(state: State, actor: str, signers: Signers) -> str:
    handle = _member_signer(state, actor, signers)
    _require_status(state, handle)
    return handle


def _require_status(state: State, handle: str, *, allow_pending: bool = False) -> None:
    member = state.member(handle)
    if member is None:
        raise NotFound(f"no member {handle}", detail={"handle": handle})
    if member.status == "suspended":
        raise Forbidden(f"member {handle} is suspended", detail={"handle": handle})
    if member.status == "pending" and not allow_pending:
        raise Forbidden(f"member {handle} is not admitted yet", detail={"handle": handle})


def _ledger_signed(payload: Payload, signers: Signers) -> None:
    if not signers.ledger or payload.actor != "ledger":
        raise Forbidden("only the ledger itself signs this payload type (actor ledger)")


def current_config(session: Session, *, cache: bool = False) -> dict[str, Any]:
    """The payload of the latest genesis or config entry: prices, fee, CU price."""
    row = session.execute(
        select(config_t.c.envelope_id, config_t.c.body).order_by(config_t.c.id.desc()).limit(1)
    ).first()
    if row is None:
        raise BadRequest("the ledger has no genesis entry yet")
    config: dict[str, Any] = json.loads(row[1])
    if cache:
        if len(_CONFIG_CACHE) >= 64:
            _CONFIG_CACHE.clear()
        _CONFIG_CACHE[str(row[0])] = config
    return config


def config_version_query() -> Any:
    """The envelope that set the configuration in force, as a scalar subquery."""
    return select(config_t.c.envelope_id).order_by(config_t.c.id.desc()).limit(1).scalar_subquery()


def spend_epoch_query() -> Any:
    """The spend epoch, as a scalar subquery."""
    return text("(SELECT max(number) FROM epochs)")


def store_config(session: Session, envelope_id: str, body: dict[str, Any]) -> None:
    session.execute(
        insert(config_t).values(envelope_id=envelope_id, body=json.dumps(body, sort_keys=True))
    )


def _operator(payload: Payload, signers: Signers) -> None:
    if not signers.operator:
        raise Forbidden("only the operator may sign this payload type")
    if payload.actor != "operator":
        raise Forbidden("actor must be operator")


def _own_account(state: State, account: str, handle: str) -> None:
    """The member acts for its own account, or for a cause it is a steward of."""
    if account == f"member:{handle}":
        return
    if account.startswith("cause:"):
        cause_rules.require_steward(state, account, handle)
        return
    raise Forbidden(f"member:{handle} may not act for {account}", detail={"account": account})


def _claim_ref(state: State, ref: str, envelope_id: str) -> None:
    if ref in state.refs:
        raise IdempotencyConflict(f"external_ref {ref!r} is already used in this batch")
    row = state.session.execute(select(refs_t.c.envelope_id).where(refs_t.c.ref == ref)).first()
    if row is not None and row[0] != envelope_id:
        raise IdempotencyConflict(
            f"external_ref {ref!r} was already used by envelope {row[0]}",
            detail={"external_ref": ref, "envelope_id": row[0]},
        )
    state.refs.add(ref)


def _store_ref(state: State, ref: str, envelope_id: str) -> None:
    state.session.execute(insert(refs_t).values(ref=ref, envelope_id=envelope_id))


def _set_member(state: State, handle: str, *, status: str, tier: str | None) -> None:
    state.session.execute(
        update(members_t).where(members_t.c.handle == handle).values(status=status, tier=tier)
    )
    state.members[handle] = MemberInfo(handle, status, tier)


# Rules of causes and of the market live with their packages; they import this module's
# State, Plan and helpers, so they are bound last, once those exist.
from ubc.causes import rules as cause_rules  # noqa: E402
from ubc.market import rules as market_rules  # noqa: E402

_RULES: dict[str, Callable[[State, Payload, Signers], Plan]] = {
    "transfer": _transfer,
    "deposit": _deposit,
    "withdrawal": _withdrawal,
    "member.register": _register,
    "key.rotate": _rotate,
    "apikey.grant": _grant,
    "apikey.revoke": _revoke,
    "member.admit": _admit,
    "member.update": _update_member,
    "epoch.open": _epoch_open,
    "epoch.close": _epoch_close,
    "ledger.config": _ledger_config,
    "usage": _usage,
    "hold.expire": _hold_expire,
    "offer.create": market_rules.offer_create,
    "offer.fill": market_rules.offer_fill,
    "offer.cancel": market_rules.offer_cancel,
    "offer.expire": market_rules.offer_expire,
    "cause.register": cause_rules.cause_register,
    "cause.update": cause_rules.cause_update,
}
