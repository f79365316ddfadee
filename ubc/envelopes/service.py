"""The one write path: check signed envelopes, apply their rules, journal them.

``submit`` takes a batch of envelopes (one HTTP request, or many coalesced by the group
commit writer) and, in one transaction:

1. locks the journal head (one lock per batch, never per envelope);
2. decodes each envelope and its payload strictly, answers a repeat of an accepted id
   with the original result, and checks the ledger origin and the ``created_at`` window;
3. authenticates the signatures against the keys the ledger knows and authorizes the
   signer for what the payload does;
4. plans each envelope with the rule of its type (``ubc.envelopes.registry``: each
   domain's rules, the same functions the auditor re-runs), which reads through the
   batch's lookup (``ubc.envelopes.lookup``) and returns what it wants done as data;
   the applier here carries it out: runs of value-moving envelopes with one
   ``apply_many`` (group commit), and changes of state (registrations, admissions,
   grants) through the writer registered for each, one by one between those runs;
5. appends every accepted envelope to the journal, with its effects, and signs a new
   checkpoint.

Services flush; the caller commits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from nacl.signing import SigningKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from ubc.clock import SYSTEM_CLOCK
from ubc.db import table
from ubc.db.driver import Driver
from ubc.envelopes.lookup import PROCESS_CACHES, Caches, DatabaseLookup
from ubc.envelopes.payloads import (
    MAX_PAYLOAD_BYTES,
    LedgerGenesis,
    Payload,
    Withdrawal,
    check_text,
    format_timestamp,
    parse_timestamp,
    payload_json,
    validate_payload,
)
from ubc.envelopes.registry import REGISTRY
from ubc.epochs import service as epochs_service
from ubc.errors import (
    BadRequest,
    BatchFailed,
    IdempotencyConflict,
    InvalidEnvelope,
    InvalidPayload,
    MissingSignature,
    PayloadTooLarge,
    UbcError,
)
from ubc.journal import store as journal
from ubc.ledger import service as ledger
from ubc.ledger.config import config_version_query, store_config
from ubc.ledger.models import Request
from ubc.ledger.payloads import TransferPayload
from ubc.members.models import MemberKey
from ubc.metering.store import spend_epoch_query
from ubc.rules import Change, Plan, Recorded, RuleContext, actor_handle, authenticate, new_id
from ubc.rules.writing import Accepted as Accepted
from ubc.rules.writing import Decoded as _Decoded
from ubc.rules.writing import LedgerContext as LedgerContext
from ubc.rules.writing import Outcome as Outcome
from ubc.rules.writing import Prechecked as Prechecked
from ubc.rules.writing import Receipt as Receipt
from ubc.rules.writing import payload_hash as _payload_hash
from ubc.rules.writing import sign_internal as sign_internal
from ubc.rules.writing import sign_payload as sign_payload
from ubc.signing import (
    Envelope,
    EnvelopeFormatError,
    PayloadError,
    decode_public_key,
    encode_public_key,
    key_id,
    parse_payload,
    type_name,
    verified_keyids,
)

requests_t = table(Request)
member_keys_t = table(MemberKey)

DEFAULT_ASSETS = {"CU": 0, "USD": 2}


# keyid → public key of member keys seen. A key's bytes never change (only whether it is
# current, which the write path checks under the lock), so this is only a cache of
# lookups; the keyid is derived from the key itself.
_PUBLIC_KEYS: dict[str, bytes] = {}
_PUBLIC_KEYS_MAX = 1_000_000


def precheck(session: Session, ctx: LedgerContext, raws: Sequence[object]) -> list[Prechecked]:
    """Decode envelopes and verify their signatures outside the write lock.

    This is the CPU-heavy part of a write (Ed25519 and strict parsing); the group-commit
    writer runs it for a batch before it takes the journal lock, and then only re-checks
    what can change: whether a verified key is still current, and the rules.
    """
    items: list[Prechecked] = []
    decoded: list[_Decoded | UbcError] = []
    for index, raw in enumerate(raws):
        try:
            decoded.append(_decode(index, raw))
        except UbcError as error:
            decoded.append(error)
    keyids = sorted(
        {s.keyid for d in decoded if isinstance(d, _Decoded) for s in d.envelope.signatures}
    )
    known: dict[str, bytes] = dict(ctx.operator_keys)
    known[ctx.ledger_keyid] = ctx.ledger_public_key
    missing = []
    for keyid in keyids:
        public = _PUBLIC_KEYS.get(keyid)
        if public is None:
            missing.append(keyid)
        else:
            known[keyid] = public
    for chunk in _chunks(missing, 1000):
        for keyid, public in session.execute(
            select(member_keys_t.c.keyid, member_keys_t.c.public_key).where(
                member_keys_t.c.keyid.in_(chunk)
            )
        ):
            known[keyid] = _PUBLIC_KEYS[keyid] = decode_public_key(public)
    if len(_PUBLIC_KEYS) > _PUBLIC_KEYS_MAX:
        _PUBLIC_KEYS.clear()
    for item in decoded:
        if isinstance(item, UbcError):
            items.append(Prechecked(item, frozenset()))
            continue
        wanted = {s.keyid: known[s.keyid] for s in item.envelope.signatures if s.keyid in known}
        items.append(Prechecked(item, verified_keyids(item.envelope, wanted)))
    return items


@dataclass(frozen=True, slots=True)
class Replay:
    """A re-run of journaled entries (the auditor, ``restore``), and what the journal
    recorded of each beyond its envelope, by envelope id: the rules' input for what was
    never journaled (holds)."""

    recorded: Mapping[str, Recorded]


def submit(
    session: Session,
    ctx: LedgerContext,
    raws: Sequence[object | Prechecked],
    *,
    atomic: bool = False,
    now: datetime | None = None,
    replay: Replay | None = None,
    internal: bool = False,
    commit_sends: bool = False,
) -> list[Outcome]:
    """Check, apply and journal a batch of envelopes; one outcome per envelope, in order.

    With ``atomic`` the first failure raises :class:`BatchFailed` naming its index and
    the caller must roll back: nothing applies. ``internal`` (the server's own
    ledger-signed envelopes: usage, expiries) admits the types that clients may not
    submit. A ``replay`` re-runs journaled entries at their recorded time (``now``): the
    rules get the journal's records, the rules of submission (the ``created_at`` window,
    human text) are not checked, ledger-only types are admitted, an epoch allocates at
    once, no process cache is used and nothing is journaled: the caller compares or
    stores the entries.

    ``commit_sends``: the caller commits through :func:`ubc.db.run_unit_of_work` (which
    sends what was left with :func:`ubc.db.driver.defer`), so that on PostgreSQL the rows
    of a batch of transfers go in the commit's round trip.
    """
    writer = _Writer(
        session,
        ctx,
        now or SYSTEM_CLOCK.now(),
        atomic,
        replay,
        internal=internal,
        commit_sends=commit_sends,
    )
    return writer.run(raws)


def write_genesis(
    session: Session,
    ctx: LedgerContext,
    *,
    now: datetime | None = None,
    models: dict[str, dict[str, int]] | None = None,
    market_fee_bps: int = 0,
    cu_price_usd: str = "0.001",
) -> bool:
    """Record the ledger's configuration as journal entry 0, once; True if written now.

    ``models`` are the prices (CU per 1K input and output tokens) of the models file.
    """
    now = now or SYSTEM_CLOCK.now()
    size = journal.lock_head(session)
    if size is None:
        journal.create_head(session)
        size = journal.lock_head(session)
    if size != 0:
        return False
    payload = LedgerGenesis.model_validate(
        {
            "ledger": ctx.origin,
            "id": new_id(),
            "created_at": format_timestamp(now),
            "actor": "ledger",
            "ledger_public_key": encode_public_key(ctx.ledger_public_key),
            "operator_public_keys": [encode_public_key(k) for k in ctx.operator_keys.values()],
            "enrollment": ctx.enrollment,
            "assets": {code: {"scale": DEFAULT_ASSETS.get(code, 0)} for code in ctx.assets},
            "market_fee_bps": market_fee_bps,
            "models": models or {},
            "cu_price_usd": cu_price_usd,
        }
    )
    assert ctx.ledger_key is not None
    envelope = sign_payload(payload, "ledger.genesis", [ctx.ledger_key])
    apply_genesis(session, payload)
    ledger.record(
        session,
        payload.id,
        _payload_hash(envelope.payload),
        ledger.Applied(payload.id, ()),
        now=now,
    )
    journal.append(
        session,
        0,
        [
            journal.NewEntry(
                payload.id, "ledger.genesis", "ledger", envelope.to_json(), [], frozenset()
            )
        ],
        now=now,
        signer=ctx.note_signer,
    )
    return True


def apply_genesis(session: Session, payload: LedgerGenesis) -> None:
    """What entry 0 does: the configuration in force, the assets and their system accounts."""
    store_config(session, payload.id, payload_json(payload))
    ledger.ensure_assets(session, {code: spec.scale for code, spec in payload.assets.items()})
    ledger.open_system_accounts(session, sorted(payload.assets))


def context_from_genesis(
    payload: LedgerGenesis,
    *,
    skew: timedelta,
    ledger_key: SigningKey | None = None,
    withdrawal_window: timedelta = timedelta(days=7),
) -> LedgerContext:
    """The ledger context an entry-0 payload establishes."""
    return LedgerContext(
        origin=payload.ledger,
        ledger_public_key=decode_public_key(payload.ledger_public_key),
        operator_keys=operator_keys_from(payload.operator_public_keys),
        enrollment=payload.enrollment,
        skew=skew,
        assets=tuple(sorted(payload.assets)),
        ledger_key=ledger_key,
        withdrawal_window=withdrawal_window,
    )


# --- internals ------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """A value-moving envelope waiting for its run's ``apply_many``."""

    decoded: _Decoded
    request: ledger.LedgerRequest
    accounts: frozenset[str]
    changes: tuple[Change, ...]


@dataclass(slots=True)
class _Writer:
    session: Session
    ctx: LedgerContext
    now: datetime
    atomic: bool
    replay: Replay | None
    internal: bool = False
    commit_sends: bool = False
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    accepted: list[tuple[_Decoded, Receipt, frozenset[str]]] = field(default_factory=list)
    run_: list[_Pending] = field(default_factory=list)
    seen: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    known: dict[str, tuple[bytes, str, str]] = field(default_factory=dict)
    preverified: dict[int, frozenset[str]] = field(default_factory=dict)
    internal_items: set[int] = field(default_factory=set)
    look: DatabaseLookup | None = None
    rule_ctx: RuleContext | None = None
    # Changes whose writer takes a whole batch's at once, by change type.
    deferred: dict[type[Change], list[Change]] = field(default_factory=dict)
    # Rows the batch's first run need not read again (locked with the journal head).
    prefetched: ledger.Prefetched | None = None
    # The final run's statements, sent with the journal's (a batch of transfers only).
    pending: list[tuple[str, Sequence[Any]]] | None = None

    def run(self, raws: Sequence[object]) -> list[Outcome]:
        decoded: list[_Decoded | UbcError] = []
        for index, raw in enumerate(raws):
            if isinstance(raw, Prechecked):
                item = raw.decoded
                if isinstance(item, _Decoded):
                    item.index = index
                    self.preverified[index] = raw.verified
                    if raw.internal:
                        self.internal_items.add(index)
                decoded.append(item)
                continue
            try:
                decoded.append(_decode(index, raw))
            except UbcError as error:
                decoded.append(error)
        good = [d for d in decoded if isinstance(d, _Decoded)]
        ledger_keys = {self.ctx.ledger_keyid, *self.ctx.operator_keys}
        keyids = sorted({s.keyid for d in good for s in d.envelope.signatures} - ledger_keys)
        handles = sorted({h for d in good if (h := actor_handle(d.payload.actor)) is not None})
        # The head lock, the configuration in force, the spend epoch, the Merkle frontier
        # (kept on the head), the ids already recorded and the signers' keys and members:
        # on PostgreSQL one round trip, whose reads run once the lock is granted.
        driver = Driver(self.session)
        request_ids = sorted({d.payload.id for d in good})
        reads = [
            _in_chunks(driver, _REQUESTS_SQL, "id", request_ids),
            _in_chunks(driver, _KEYS_SQL, "keyid", keyids),
            _in_chunks(driver, _MEMBERS_SQL, "handle", handles),
        ]
        # A batch of transfers only (the hot path) on PostgreSQL: their accounts are
        # locked in the same round trip too, and the ledger's rows are sent with the
        # journal's (one flush, which nothing reads between).
        addresses: dict[str, list[str]] = {}
        if driver.postgres and self.replay is None and good:
            transfers = [
                d.payload
                for d in good
                if d.type == "transfer" and isinstance(d.payload, TransferPayload)
            ]
            if len(transfers) == len(good):
                wanted: dict[str, set[str]] = {}
                for p in transfers:
                    wanted.setdefault(p.asset, set()).update((p.from_, p.to))
                addresses = {asset: sorted(names) for asset, names in wanted.items()}
                reads.append([ledger.prefetch_statement(self.session, addresses)])
                self.pending = []
        locked = journal.lock_head_and_read(
            self.session, _head_sql(self.session), [st for group in reads for st in group]
        )
        if locked is None:
            raise BadRequest("the ledger has no genesis entry yet")
        head_size, config_version, spend_epoch, checkpoint, frontier = locked.row
        size = int(head_size)
        results = iter(locked.reads)
        request_rows, key_rows, member_rows, *account_rows = (
            [row for _ in group for row in next(results)] for group in reads
        )
        for request_id, payload_hash, status, result in request_rows:
            self.known[request_id] = (bytes(payload_hash), status, result)
        if account_rows:
            self.prefetched = ledger.prefetched(addresses, account_rows[0], request_ids, self.known)
        replay = self.replay
        self.look = DatabaseLookup(
            self.session, PROCESS_CACHES if replay is None else Caches(), flush=self._flush
        )
        self.rule_ctx = RuleContext(
            now=self.now,
            enrollment=self.ctx.enrollment,
            assets=self.ctx.assets,
            recorded={} if replay is None else replay.recorded,
            allocate_at_once=epochs_service.CHUNK if replay is None else None,
        )
        self.look.known_versions(config=config_version, spend_epoch=spend_epoch)
        self.look.preloaded(keyids, key_rows, handles, member_rows)
        for index, item in enumerate(decoded):
            if isinstance(item, UbcError):
                self._fail(index, item, remember=None)
                continue
            self._one(item)
        self._flush(final=True)
        self._write_deferred()
        if replay is not None:
            return [self.outcomes[i] for i in range(len(raws))]
        receipts = [r for _, r, _ in self.accepted]
        seqs = journal.append(
            self.session,
            size,
            [
                journal.NewEntry(
                    d.payload.id,
                    d.type,
                    d.payload.actor,
                    d.envelope.to_json(),
                    r.effects,
                    acc,
                    r.summary,
                )
                for d, r, acc in self.accepted
            ],
            now=self.now,
            signer=self.ctx.note_signer,
            checkpoint=checkpoint,
            frontier=journal.stored_frontier(size, frontier),
            before=self.pending or (),
            # The rows go with the commit's round trip: the group commit's unit of work
            # (``ubc.db.run_unit_of_work``) sends them; nothing reads them before.
            defer=self.commit_sends and self.pending is not None,
        )
        for receipt, seq in zip(receipts, seqs, strict=True):
            receipt.seq = seq
        return [self.outcomes[i] for i in range(len(raws))]

    def _one(self, item: _Decoded) -> None:
        payload = item.payload
        # Repeats first: an accepted id answers its original result, even past the window.
        earlier = self.seen.get(payload.id)
        if earlier is not None and earlier[0] == item.payload_hash:
            self._repeat_in_batch(item.index, earlier[1])
            return
        stored = self.known.get(payload.id)
        if earlier is None and stored is not None and stored[0] == item.payload_hash:
            self._repeat_stored(item, stored)
            return
        look, rule_ctx = self.look, self.rule_ctx
        assert look is not None
        assert rule_ctx is not None
        try:
            self._check_window(payload)
            signers = authenticate(
                look,
                item.envelope,
                payload,
                operator_keys=self.ctx.operator_keys,
                ledger_public_key=self.ctx.ledger_public_key,
                preverified=self.preverified.get(item.index, frozenset()),
            )
        except UbcError as error:
            self._fail(item.index, error, remember=None)
            return
        # From here on the envelope is authenticated: its id is remembered, even failed.
        if earlier is not None or stored is not None:
            self._fail(
                item.index,
                IdempotencyConflict(
                    f"id {payload.id} was already used with a different payload",
                    detail={"id": payload.id},
                ),
                remember=None,
            )
            return
        self.seen[payload.id] = (item.payload_hash, item.index)
        internal = self.internal or self.replay is not None or item.index in self.internal_items
        try:
            plan = REGISTRY.plan(look, rule_ctx, item.type, payload, signers, internal=internal)
        except MissingSignature as error:
            # The same envelope may come back with the missing signature: not remembered.
            del self.seen[payload.id]
            self._fail(item.index, error, remember=None)
            return
        except UbcError as error:
            self._fail(item.index, error, remember=item)
            return
        look.planned(plan)
        if plan.holds:
            self._flush()
            try:
                self._place_holds(plan)
            except UbcError as error:
                self._fail(item.index, error, remember=item)
                return
        if plan.operations:
            self.run_.append(
                _Pending(
                    item,
                    ledger.LedgerRequest(payload.id, plan.operations, item.payload_hash),
                    plan.accounts,
                    plan.changes,
                )
            )
            return
        # A change of state: apply the run before it, then this one on its own.
        self._flush()
        summary = None
        try:
            if plan.changes:
                # A savepoint: a change refused halfway (say, rows of a member written,
                # then its account refused) leaves nothing behind, as if never tried.
                with self.session.begin_nested():
                    summary = self._apply_changes(plan.changes)
        except UbcError as error:
            self._fail(item.index, error, remember=item)
            return
        ledger.record(
            self.session,
            payload.id,
            item.payload_hash,
            ledger.Applied(payload.id, ()),
            now=self.now,
        )
        self._accept(item, [], plan.accounts, summary)

    def _flush(self, *, final: bool = False) -> None:
        pending, self.run_ = self.run_, []
        if not pending:
            return
        prefetched, self.prefetched = self.prefetched, None
        try:
            outcomes = ledger.apply_many(
                self.session,
                [p.request for p in pending],
                now=self.now,
                atomic=self.atomic,
                prefetched=prefetched,
                # Sent with the journal's rows: nothing after the final run reads them.
                pending=self.pending if final else None,
            )
        except BatchFailed as failure:
            raise BatchFailed(pending[failure.index].decoded.index, failure.cause) from None
        for item, outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, UbcError):
                # apply_many has already remembered the failed id.
                self._fail(item.decoded.index, outcome, remember=None)
                continue
            self._apply_changes(item.changes)
            # Sorted keys, as in the journal entry, so that a repeat answers the same bytes.
            effects = [dict(sorted(e.to_json().items())) for e in outcome.effects]
            self._accept(item.decoded, effects, item.accounts)

    def _place_holds(self, plan: Plan) -> None:
        for hold in plan.holds:
            ledger.apply(
                self.session, ledger.LedgerRequest(hold.request_id, (hold.leg,)), now=hold.at
            )

    def _apply_changes(self, changes: Sequence[Change]) -> dict[str, Any] | None:
        """The applier: each change through its domain's writer; an epoch's summary."""
        assert self.look is not None
        summary: dict[str, Any] | None = None
        for change in changes:
            spec = REGISTRY.writer(change)
            if spec.write is None:
                self.deferred.setdefault(type(change), []).append(change)
                continue
            written = spec.write(self.session, change, self.now)
            if written is not None:
                summary = dict(written)
            self.look.applied(change)
        return summary

    def _write_deferred(self) -> None:
        """What the batch's changes left for one statement each, in the registry's order."""
        for change_type, spec in REGISTRY.writers.items():
            changes = self.deferred.pop(change_type, None)
            if changes and spec.write_batch is not None:
                spec.write_batch(self.session, changes)

    def _accept(
        self,
        item: _Decoded,
        effects: list[dict[str, Any]],
        accounts: frozenset[str],
        summary: dict[str, Any] | None = None,
    ) -> None:
        touched = set(accounts)
        for effect in effects:
            touched.add(effect["debit"])
            touched.add(effect["credit"])
        receipt = Receipt(
            item.payload.id,
            item.type,
            effects,
            actor=item.payload.actor,
            accounts=frozenset(touched),
            summary=summary,
        )
        self.accepted.append((item, receipt, receipt.accounts))
        self.outcomes[item.index] = Accepted(receipt, repeated=False)

    def _fail(self, index: int, error: UbcError, *, remember: _Decoded | None) -> None:
        if self.atomic:
            raise BatchFailed(index, error)
        if remember is not None:
            ledger.record(
                self.session, remember.payload.id, remember.payload_hash, error, now=self.now
            )
        self.outcomes[index] = error

    def _repeat_in_batch(self, index: int, first: int) -> None:
        outcome = self.outcomes.get(first)
        if isinstance(outcome, Accepted):
            self.outcomes[index] = Accepted(outcome.receipt, repeated=True)
        elif outcome is not None:
            self.outcomes[index] = outcome
        else:  # still waiting in the current run: resolve it first
            self._flush()
            self._repeat_in_batch(index, first)

    def _repeat_stored(self, item: _Decoded, stored: tuple[bytes, str, str]) -> None:
        _, status, result = stored
        if status != "applied":
            failure = ledger.decode_outcome(self.session, item.payload.id, status, result)
            assert isinstance(failure, UbcError)
            self.outcomes[item.index] = failure
            return
        found = journal.entry_by_envelope(self.session, item.payload.id)
        if found is None:  # recorded by the core but never journaled: not an envelope id
            self._fail(
                item.index,
                IdempotencyConflict(
                    f"id {item.payload.id} is taken", detail={"id": item.payload.id}
                ),
                remember=None,
            )
            return
        seq, entry = found
        receipt = Receipt(
            item.payload.id, item.type, list(entry["effects"]), seq, summary=entry.get("summary")
        )
        self.outcomes[item.index] = Accepted(receipt, repeated=True)

    def _check_window(self, payload: Payload) -> None:
        if payload.ledger != self.ctx.origin:
            raise InvalidPayload(
                f"envelope is for ledger {payload.ledger!r}, this is {self.ctx.origin!r}",
                detail={"ledger": payload.ledger, "expected": self.ctx.origin},
            )
        if self.replay is not None:
            return
        # Like the window, a rule of submission: a re-run journal is checked as it was.
        check_text(payload)
        created = parse_timestamp(payload.created_at)
        # A member's withdrawal waits for the operator's countersignature: it may be as old
        # as the approval window (never from the future beyond the skew). Its id and
        # external reference keep it from applying twice.
        earliest = self.ctx.withdrawal_window if isinstance(payload, Withdrawal) else None
        if earliest is not None and self.now - earliest <= created <= self.now + self.ctx.skew:
            return
        if abs(created - self.now) > self.ctx.skew:
            raise InvalidPayload(
                f"created_at {payload.created_at} is outside the accepted window of "
                f"±{int(self.ctx.skew.total_seconds())} s around {format_timestamp(self.now)}",
                detail={"created_at": payload.created_at, "now": format_timestamp(self.now)},
            )


def _decode(index: int, raw: object) -> _Decoded:
    try:
        envelope = Envelope.from_json(raw)
    except EnvelopeFormatError as exc:
        raise InvalidEnvelope(str(exc)) from None
    if len(envelope.payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"payload is {len(envelope.payload)} bytes, at most {MAX_PAYLOAD_BYTES} allowed",
            detail={"size": len(envelope.payload), "limit": MAX_PAYLOAD_BYTES},
        )
    name = type_name(envelope.payload_type)
    if name is None or name not in REGISTRY.specs:
        raise InvalidEnvelope(
            f"unknown payload type {envelope.payload_type!r}",
            detail={"payloadType": envelope.payload_type},
        )
    try:
        body = parse_payload(envelope.payload)
        payload = validate_payload(name, body)
    except (PayloadError, ValueError) as exc:
        raise InvalidPayload(str(exc)) from None
    return _Decoded(index, envelope, name, payload, _payload_hash(envelope.payload))


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


_REQUESTS_SQL = "SELECT id, payload_hash, status, result FROM requests WHERE {}"
_KEYS_SQL = "SELECT keyid, handle, public_key, current FROM member_keys WHERE {}"
_MEMBERS_SQL = "SELECT handle, status, tier FROM members WHERE {}"


def _in_chunks(
    driver: Driver, sql: str, column: str, values: Sequence[str]
) -> list[tuple[str, list[Any]]]:
    """``sql`` over ``values`` of ``column``, one statement per chunk (SQLite's limit on
    parameters); none for no values."""
    statements = []
    for chunk in _chunks(values, 1000):
        condition, params = driver.in_list(column, chunk)
        statements.append((sql.format(condition), params))
    return statements


# The head-lock statement compiled once per dialect: with the configuration in force and
# the spend epoch as scalar subqueries, and the head's checkpoint.
_HEAD_SQL: dict[str, str] = {}


def _head_sql(session: Session) -> str:
    dialect = session.get_bind().dialect
    sql = _HEAD_SQL.get(dialect.name)
    if sql is None:
        head = journal.head_t
        stmt = journal.head_statement(
            session, config_version_query(), spend_epoch_query(), head.c.checkpoint, head.c.frontier
        )
        sql = _HEAD_SQL[dialect.name] = str(
            stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
        )
    return sql


def operator_keys_from(public_keys: Sequence[str]) -> dict[str, bytes]:
    keys = [decode_public_key(k) for k in public_keys]
    return {key_id(k): k for k in keys}
