"""Property tests of the ledger core against a pure-Python model.

Hypothesis draws random sequences of steps: single transfers, linked batches (some of
which must fail whole), group commits through ``apply_many`` (also ``atomic``) mixing
good and bad requests, holds with timeouts, posts up to (and over) the hold, voids, a
simulated clock with expiry sweeps, and replays of earlier request ids with the same or
a different payload. Every step's outcome (effects, or error type) is compared with the
model, and after every step the ledger must conserve value per asset, keep
non-negative accounts non-negative, and report the model's balances. At the end the
postings must rebuild every account's four counters and their last ``balance_after``
and ``available_after``.

Each example runs in one fresh session that is never committed and is rolled back at
the end (the core only flushes), with request ids unique to the example.
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ubc.errors import BatchFailed, UbcError
from ubc.ledger import service as ledger
from ubc.ledger.service import Applied, Effect, LedgerRequest, Leg, Operation, Post, Void

ASSETS = ("CU", "USD")
MEMBERS = ("member:alice", "member:bob", "member:carol")
# dave holds CU only, so USD legs naming him fail with account_not_found.
DAVE = "member:dave"
ADDRESSES = (*MEMBERS, DAVE, "market:escrow", "system:issuance", "system:consumption")
CHOICES = (*ADDRESSES, "member:zed")  # zed has no account at all
KINDS = ("transfer", "transfer", "usage", "allocation", "gift")  # gift is not a kind
FUNDING = 500
START = datetime(2030, 1, 1, tzinfo=UTC)
MAX_COUNTER = 2**63 - 1

_examples = itertools.count()

accounts_t = ledger.accounts_t
postings_t = ledger.postings_t
transfers_t = ledger.transfers_t
requests_t = ledger.requests_t


# --- the model ------------------------------------------------------------------------


class ModelError(Exception):
    def __init__(self, error_type: str) -> None:
        super().__init__(error_type)
        self.error_type = error_type


@dataclass
class MHold:
    debit: str
    credit: str
    asset: str
    amount: int
    kind: str
    state: str
    timeout_at: datetime


# An outcome as the test compares it: ("applied", effects, replayed) or ("error", type).
Outcome = tuple[Any, ...]


@dataclass
class Model:
    """What the ledger should hold: counters per account, holds, request records."""

    accounts: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    non_negative: set[tuple[str, str]] = field(default_factory=set)
    holds: dict[str, MHold] = field(default_factory=dict)
    hold_order: list[str] = field(default_factory=list)
    posted_ids: list[str] = field(default_factory=list)  # transfers that are not holds
    requests: dict[str, tuple[tuple[Operation, ...], Outcome]] = field(default_factory=dict)
    log: list[LedgerRequest] = field(default_factory=list)  # every request sent, for replays
    transfers: int = 0

    def open(self, address: str, asset: str) -> None:
        self.accounts[(address, asset)] = [0, 0, 0, 0]
        if address.split(":")[0] in ("member", "cause", "market"):
            self.non_negative.add((address, asset))

    # -- applying, mirroring the documented semantics --

    def apply(self, request: LedgerRequest, now: datetime) -> Outcome:
        stored = self.requests.get(request.id)
        if stored is not None:
            ops, answered = stored
            if ops != request.operations:
                return ("error", "idempotency_conflict")
            if answered[0] == "applied":
                return ("applied", answered[1], True)
            return answered
        saved = copy.deepcopy((self.accounts, self.holds, self.hold_order, self.posted_ids))
        effects: list[Effect] = []
        try:
            if not 1 <= len(request.operations) <= ledger.MAX_OPERATIONS:
                raise ModelError("bad_request")
            for index, op in enumerate(request.operations):
                transfer_id = f"{request.id}:{index}"
                if isinstance(op, Leg):
                    effects.append(self._leg(transfer_id, op, now))
                elif isinstance(op, Post):
                    effects.append(self._resolve(op.pending_id, op.amount, "posted", now))
                else:
                    state = "expired" if op.expired else "voided"
                    effects.append(self._resolve(op.pending_id, None, state, now))
                effects[-1] = _with_id(effects[-1], transfer_id)
        except ModelError as error:
            self.accounts, self.holds, self.hold_order, self.posted_ids = saved
            outcome: Outcome = ("error", error.error_type)
        else:
            self.transfers += len(effects)
            outcome = ("applied", tuple(effects), False)
        self.requests[request.id] = (request.operations, outcome)
        return outcome

    def _counters(self, address: str, asset: str) -> list[int]:
        counters = self.accounts.get((address, asset))
        if counters is None:
            raise ModelError("account_not_found")
        return counters

    def _leg(self, transfer_id: str, op: Leg, now: datetime) -> Effect:
        if not 1 <= op.amount <= MAX_COUNTER or op.kind not in ledger.TransferKind.__members__:
            raise ModelError("bad_request")
        if op.debit == op.credit:
            raise ModelError("bad_request")
        debit = self._counters(op.debit, op.asset)
        credit = self._counters(op.credit, op.asset)
        if op.timeout is None:
            debit[0] += op.amount
            credit[1] += op.amount
            phase = "posted"
            self.posted_ids.append(transfer_id)
        else:
            debit[2] += op.amount
            credit[3] += op.amount
            phase = "pending"
            self.holds[transfer_id] = MHold(
                op.debit, op.credit, op.asset, op.amount, op.kind, "pending", now + op.timeout
            )
            self.hold_order.append(transfer_id)
        if (op.debit, op.asset) in self.non_negative and debit[1] - debit[0] - debit[2] < 0:
            raise ModelError("insufficient_funds")
        return Effect("", op.kind, op.debit, op.credit, op.asset, op.amount, phase)

    def _resolve(self, pending_id: str, amount: int | None, to: str, now: datetime) -> Effect:
        hold = self.holds.get(pending_id)
        if hold is None:
            raise ModelError("transfer_not_found")
        if hold.state != "pending":
            raise ModelError("state_conflict")
        expired = hold.timeout_at <= now
        if expired != (to == "expired"):
            raise ModelError("state_conflict")
        posted = 0
        if to == "posted":
            posted = hold.amount if amount is None else amount
            if not 1 <= posted <= hold.amount:
                raise ModelError("bad_request")
        debit = self.accounts[(hold.debit, hold.asset)]
        credit = self.accounts[(hold.credit, hold.asset)]
        debit[2] -= hold.amount
        credit[3] -= hold.amount
        debit[0] += posted
        credit[1] += posted
        hold.state = to
        phase = "post" if to == "posted" else "void"
        amount_out = posted if to == "posted" else hold.amount
        return Effect(
            "", hold.kind, hold.debit, hold.credit, hold.asset, amount_out, phase, pending_id
        )

    def apply_many(
        self, requests: Sequence[LedgerRequest], now: datetime, atomic: bool
    ) -> list[Outcome] | tuple[str, int, str]:
        saved = copy.deepcopy(self)
        outcomes = [self.apply(r, now) for r in requests]
        if atomic:
            for index, outcome in enumerate(outcomes):
                if outcome[0] == "error":
                    self.__dict__.update(saved.__dict__)
                    return ("batch_failed", index, outcome[1])
        return outcomes

    def expire(self, now: datetime) -> int:
        due = sorted(
            i for i, h in self.holds.items() if h.state == "pending" and h.timeout_at <= now
        )
        for pending_id in due:
            self.apply(
                LedgerRequest(f"expire:{pending_id}", (Void(pending_id, expired=True),)), now
            )
        return len(due)


def _with_id(effect: Effect, transfer_id: str) -> Effect:
    return Effect(
        transfer_id,
        effect.kind,
        effect.debit,
        effect.credit,
        effect.asset,
        effect.amount,
        effect.phase,
        effect.pending_id,
    )


def actual(outcome: Applied | UbcError) -> Outcome:
    if isinstance(outcome, Applied):
        return ("applied", outcome.effects, outcome.repeated)
    return ("error", outcome.error_type)


# --- abstract steps ---------------------------------------------------------------------
#
# Steps name holds and earlier requests by index; the index is resolved against what the
# model knows when the step runs, so every drawn sequence is meaningful and shrinks well.

amounts = st.one_of(
    st.integers(min_value=1, max_value=300), st.integers(min_value=0, max_value=900)
)
leg_op = st.tuples(
    st.just("leg"),
    st.sampled_from((*CHOICES, *MEMBERS, *MEMBERS)),
    st.sampled_from(CHOICES),
    st.sampled_from(ASSETS),
    amounts,
    st.sampled_from(KINDS),
    st.none(),
)
hold_op = st.tuples(
    st.just("leg"),
    st.sampled_from((*MEMBERS, *MEMBERS, DAVE, "market:escrow", "system:issuance")),
    st.sampled_from(("system:consumption", "system:consumption", "market:escrow", *MEMBERS)),
    st.sampled_from(ASSETS),
    st.one_of(st.integers(min_value=1, max_value=150), amounts),
    st.just("usage"),
    st.integers(min_value=1, max_value=60),
)
# Which hold: an index into the known ones, "other" (a transfer that is not a hold) or
# "missing" (no transfer at all).
hold_ref = st.one_of(
    st.integers(min_value=0, max_value=50),
    st.integers(min_value=0, max_value=50),
    st.integers(min_value=0, max_value=50),
    st.sampled_from(("other", "missing")),
)
post_within = st.tuples(st.just("le"), st.integers(min_value=1, max_value=1000))
post_amount = st.one_of(
    st.just(("full",)),
    post_within,
    st.tuples(st.just("over"), st.integers(min_value=1, max_value=5)),
    st.just(("zero",)),
)
post_op = st.tuples(st.just("post"), hold_ref, post_amount)
void_op = st.tuples(st.just("void"), hold_ref, st.just(False))
expired_void_op = st.tuples(st.just("void"), hold_ref, st.just(True))
any_op = st.one_of(leg_op, leg_op, hold_op, post_op, void_op, expired_void_op)
ops = st.lists(any_op, min_size=1, max_size=4)
# Small legs among members and from issuance: linked batches that mostly succeed.
small_leg = st.tuples(
    st.just("leg"),
    st.sampled_from((*MEMBERS, "system:issuance")),
    st.sampled_from(MEMBERS),
    st.sampled_from(ASSETS),
    st.integers(min_value=1, max_value=60),
    st.just("transfer"),
    st.none(),
)
good_ops = st.lists(st.one_of(small_leg, small_leg, hold_op, post_op), min_size=1, max_size=4)
replay = st.tuples(st.just("replay"), st.integers(min_value=0, max_value=100), st.booleans())
group_item = st.one_of(ops, good_ops, good_ops, replay, st.just([]))

step = st.one_of(
    st.tuples(st.just("single"), st.one_of(leg_op, hold_op, hold_op, post_op, post_op, void_op)),
    st.tuples(st.just("batch"), st.one_of(ops, good_ops)),
    # A hold, then (after some time) a post or a void of it in a request of its own.
    st.tuples(
        st.just("hold-then"),
        hold_op,
        st.one_of(st.integers(min_value=0, max_value=5), st.integers(min_value=0, max_value=60)),
        st.one_of(
            st.tuples(st.just("post"), st.just(0), st.just(("full",))),
            st.tuples(st.just("post"), st.just(0), post_within),
            st.tuples(st.just("post"), st.just(0), post_amount),
            void_op,
        ),
    ),
    st.tuples(st.just("group"), st.lists(group_item, min_size=1, max_size=5), st.booleans()),
    replay,
    st.tuples(st.just("tick"), st.integers(min_value=0, max_value=25)),
    st.tuples(st.just("expire"), st.booleans()),
    st.tuples(st.just("expire"), st.booleans()),
)


class Run:
    """One example: a session, the model, the simulated clock, request ids."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.model = Model()
        self.now = START
        self.prefix = f"p{next(_examples)}"
        self.ids = itertools.count()

    def new_id(self) -> str:
        return f"{self.prefix}-{next(self.ids)}"

    def setup(self) -> None:
        s = self.session
        ledger.ensure_assets(s, {"CU": 0, "USD": 2})
        ledger.open_system_accounts(s, ASSETS)
        pairs = [(m, a) for m in MEMBERS for a in ASSETS] + [(DAVE, "CU")]
        ledger.open_accounts(s, pairs, now=self.now)
        for address, asset in pairs + [(a, x) for x in ASSETS for a in ledger.SYSTEM_ACCOUNTS]:
            self.model.open(address, asset)
        funded = [*pairs, ("market:escrow", "CU"), ("market:escrow", "USD")]
        legs = tuple(Leg("system:issuance", a, x, FUNDING, "allocation") for a, x in funded)
        self.single(LedgerRequest(self.new_id(), legs))

    # -- building requests from abstract ops --

    def hold_id(self, ref: int | str, local: list[str]) -> str:
        if isinstance(ref, str) and ref.startswith(f"{self.prefix}-"):
            return ref  # named directly
        if ref == "missing":
            return f"{self.prefix}-none:0"
        if ref == "other":
            known = self.model.posted_ids
            return known[-1] if known else f"{self.prefix}-none:1"
        assert isinstance(ref, int)
        holds = self.model.holds
        live = [i for i in self.model.hold_order if holds[i].state == "pending"]
        live = [i for i in live if holds[i].timeout_at > self.now] + local
        if live and ref < 40:
            return live[ref % len(live)]
        candidates = self.model.hold_order + local  # resolved or expired ones too
        if not candidates:
            return f"{self.prefix}-none:2"
        return candidates[ref % len(candidates)]

    def request(self, abstract_ops: Sequence[tuple[Any, ...]]) -> LedgerRequest:
        request_id = self.new_id()
        operations: list[Operation] = []
        local: list[str] = []
        for index, op in enumerate(abstract_ops):
            if op[0] == "leg":
                _, debit, credit, asset, amount, kind, timeout = op
                if timeout is not None:
                    local.append(f"{request_id}:{index}")
                    seconds = timedelta(seconds=timeout)
                    operations.append(Leg(debit, credit, asset, amount, kind, timeout=seconds))
                else:
                    operations.append(Leg(debit, credit, asset, amount, kind))
            elif op[0] == "post":
                pending_id = self.hold_id(op[1], local)
                operations.append(Post(pending_id, self.post_amount(pending_id, op[2])))
            else:
                operations.append(Void(self.hold_id(op[1], local), expired=op[2]))
        return LedgerRequest(request_id, tuple(operations))

    def post_amount(self, pending_id: str, spec: tuple[Any, ...]) -> int | None:
        hold = self.model.holds.get(pending_id)
        held = hold.amount if hold is not None else 10
        if spec[0] == "full":
            return None
        if spec[0] == "le":
            return 1 + (int(spec[1]) - 1) % max(held, 1)
        if spec[0] == "over":
            return held + int(spec[1])
        return 0

    def replayed(self, index: int, same: bool) -> LedgerRequest:
        if not self.model.log:
            return self.request([("void", "missing", False)])
        earlier = self.model.log[index % len(self.model.log)]
        if same:
            return earlier
        # A different payload under the same id.
        return LedgerRequest(earlier.id, (*earlier.operations, Void("other:0")))

    # -- running steps --

    def single(self, request: LedgerRequest) -> None:
        self.model.log.append(request)
        expected = self.model.apply(request, self.now)
        try:
            got = actual(ledger.apply(self.session, request, now=self.now))
        except UbcError as error:
            got = actual(error)
        assert got == expected, request
        event(f"single: {got[0]} {got[1] if got[0] == 'error' else ('replayed' * got[2])}")
        if got[0] == "applied" and not got[2]:
            for effect in got[1]:
                event(f"effect: {effect.phase}")

    def group(self, requests: list[LedgerRequest], atomic: bool) -> None:
        expected = self.model.apply_many(requests, self.now, atomic)
        failed: BatchFailed | None = None
        try:
            outcomes = ledger.apply_many(self.session, requests, now=self.now, atomic=atomic)
        except BatchFailed as error:
            failed = error
        if failed is not None:
            assert expected == ("batch_failed", failed.index, failed.cause.error_type), requests
            event("group: atomic, failed")
            return
        assert [actual(o) for o in outcomes] == expected, requests
        for outcome in outcomes:
            if isinstance(outcome, Applied) and not outcome.repeated:
                for effect in outcome.effects:
                    event(f"effect: {effect.phase}")
        event(f"group: {'atomic' if atomic else 'mixed'}, {len(requests)} requests")
        self.model.log.extend(requests)

    def step(self, step: tuple[Any, ...]) -> None:
        kind = step[0]
        event(f"step: {kind}")
        if kind == "single":
            self.single(self.request([step[1]]))
        elif kind == "batch":
            self.single(self.request(step[1]))
        elif kind == "replay":
            self.single(self.replayed(step[1], step[2]))
        elif kind == "group":
            requests = []
            for item in step[1]:
                if isinstance(item, tuple):
                    requests.append(self.replayed(item[1], item[2]))
                elif not item:
                    requests.append(LedgerRequest(self.new_id(), ()))  # bad: no operations
                else:
                    requests.append(self.request(item))
            self.group(requests, step[2])
        elif kind == "hold-then":
            hold = self.request([step[1]])
            self.single(hold)
            self.now += timedelta(seconds=step[2])
            resolve = step[3]
            self.single(self.request([(resolve[0], f"{hold.id}:0", *resolve[2:])]))
        elif kind == "tick":
            self.now += timedelta(seconds=step[1])
        else:
            expected = self.model.expire(self.now)
            event(f"expired {min(expected, 2)}+")
            assert ledger.expire_holds(self.session, now=self.now) == expected
            if step[1]:  # sweeping twice releases nothing more
                assert ledger.expire_holds(self.session, now=self.now) == 0
        self.check()

    # -- invariants --

    def rows(self) -> list[Any]:
        return list(
            self.session.execute(
                select(
                    accounts_t.c.id,
                    accounts_t.c.address,
                    accounts_t.c.asset,
                    accounts_t.c.non_negative,
                    accounts_t.c.debits_posted,
                    accounts_t.c.credits_posted,
                    accounts_t.c.debits_pending,
                    accounts_t.c.credits_pending,
                )
            )
        )

    def check(self) -> None:
        posted: dict[str, int] = defaultdict(int)
        pending: dict[str, int] = defaultdict(int)
        for _, address, asset, non_negative, dp, cp, dpe, cpe in self.rows():
            posted[asset] += cp - dp
            pending[asset] += cpe - dpe
            if non_negative:
                assert cp - dp - dpe >= 0, (address, asset)
            assert min(dp, cp, dpe, cpe) >= 0, (address, asset)
        assert set(posted) == set(ASSETS)
        assert all(v == 0 for v in posted.values()), posted
        assert all(v == 0 for v in pending.values()), pending
        for address in ADDRESSES:
            got = {
                (address, b.asset): [
                    b.debits_posted,
                    b.credits_posted,
                    b.debits_pending,
                    b.credits_pending,
                ]
                for b in ledger.balances(self.session, address)
            }
            want = {k: v for k, v in self.model.accounts.items() if k[0] == address}
            assert got == want, address

    def check_final(self) -> None:
        s = self.session
        rebuilt: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        last: dict[int, tuple[int, int]] = {}
        for account_id, side, amount, held, balance_after, available_after in s.execute(
            select(
                postings_t.c.account_id,
                postings_t.c.side,
                postings_t.c.posted,
                postings_t.c.pending,
                postings_t.c.balance_after,
                postings_t.c.available_after,
            ).order_by(postings_t.c.id)
        ):
            counters = rebuilt[account_id]
            if side == "D":
                counters[0] += amount
                counters[2] += held
            else:
                assert side == "C"
                counters[1] += amount
                counters[3] += held
            last[account_id] = (balance_after, available_after)
        for account_id, address, asset, _, dp, cp, dpe, cpe in self.rows():
            assert rebuilt.get(account_id, [0, 0, 0, 0]) == [dp, cp, dpe, cpe], (address, asset)
            if account_id in last:
                assert last[account_id] == (cp - dp, cp - dp - dpe), (address, asset)
        # One transfer row per effect, two postings per transfer, one record per stored id.
        transfers = s.execute(select(func.count()).select_from(transfers_t)).scalar_one()
        postings = s.execute(select(func.count()).select_from(postings_t)).scalar_one()
        records = s.execute(select(func.count()).select_from(requests_t)).scalar_one()
        assert transfers == self.model.transfers
        assert postings == 2 * transfers
        assert records == len(self.model.requests)
        # Every hold is in the state the model expects.
        states: dict[str, str | None] = dict(
            s.execute(
                select(transfers_t.c.id, transfers_t.c.state).where(
                    transfers_t.c.phase == "pending"
                )
            ).all()
        )
        assert states == {i: h.state for i, h in self.model.holds.items()}
        # History pages back to the first posting, newest first, for a busy account.
        seen: list[int] = []
        cursor = None
        while True:
            items, cursor = ledger.history(s, "member:alice", cursor=cursor, limit=7)
            seen.extend(i.posting_id for i in items)
            if cursor is None:
                break
        assert seen == sorted(seen, reverse=True)
        ids = [r[0] for r in self.rows() if r[1] == "member:alice"]
        count = s.execute(
            select(func.count()).select_from(postings_t).where(postings_t.c.account_id.in_(ids))
        ).scalar_one()
        assert len(seen) == count


@settings(max_examples=35)
@given(steps=st.lists(step, min_size=10, max_size=40))
def test_ledger_matches_model_and_keeps_its_invariants(
    sessions: sessionmaker[Session], steps: list[tuple[Any, ...]]
) -> None:
    session = sessions()
    try:
        run = Run(session)
        run.setup()
        run.check()
        for s in steps:
            run.step(s)
        run.check_final()
    finally:
        session.rollback()
        session.close()


# A replay answers the effects of the request's own transfers, whatever the other ids
# look like. The core reads them back as the primary-key range ["<id>:", "<id>;"), which
# also holds the transfers of any request whose id starts with "<id>:".
request_names = st.lists(
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40),
    min_size=1,
    max_size=6,
    unique=True,
)


@settings(max_examples=25)
@example(names=["r", "r:x"])
@given(names=request_names)
def test_a_replay_answers_exactly_its_own_effects(
    sessions: sessionmaker[Session], names: list[str]
) -> None:
    session = sessions()
    try:
        prefix = f"n{next(_examples)}/"
        ledger.ensure_assets(session, {"CU": 0})
        ledger.open_system_accounts(session, ["CU"])
        ledger.open_accounts(session, [(m, "CU") for m in MEMBERS], now=START)
        first = {}
        for count, name in enumerate(names, start=1):
            legs = tuple(
                Leg("system:issuance", MEMBERS[i % len(MEMBERS)], "CU", count, "allocation")
                for i in range(count)
            )
            request = LedgerRequest(prefix + name, legs)
            first[request] = ledger.apply(session, request, now=START).effects
        for request, effects in first.items():
            again = ledger.apply(session, request, now=START)
            assert again.repeated
            assert again.effects == effects, request.id
    finally:
        session.rollback()
        session.close()
