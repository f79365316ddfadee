"""Concurrent writers on PostgreSQL: no deadlock, no lost update, one application per id.

Sixteen threads, each committing one request per unit of work through its own sessions
of one shared engine, hammer four hot member accounts. The ledger locks the holds and
then the accounts it needs in ascending order under READ COMMITTED, so the only error a
thread may see is the domain's own (InsufficientFunds); afterwards the books must
balance exactly and agree with what the threads were told.
"""

from __future__ import annotations

import functools
import random
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ubc.db import make_engine, make_session_factory, run_unit_of_work, unit_of_work
from ubc.errors import IdempotencyConflict, InsufficientFunds, StateConflict, UbcError
from ubc.ledger import service as ledger
from ubc.ledger.service import Applied, Effect, LedgerRequest, Leg, Post, Void

pytestmark = [
    pytest.mark.postgres,
    # PostgreSQL only: SQLite serialises writers with BEGIN IMMEDIATE by construction.
    pytest.mark.parametrize("db_url", ["postgresql"], indirect=True),
]

THREADS = 16
DURATION = 4.0
ASSETS = ("CU", "USD")
MEMBERS = ("member:m0", "member:m1", "member:m2", "member:m3")
FUNDING = 1000
HOLD_TIMEOUT = timedelta(minutes=5)

accounts_t = ledger.accounts_t
postings_t = ledger.postings_t
transfers_t = ledger.transfers_t

T = TypeVar("T")


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url, pool_size=20)
    yield make_session_factory(engine)
    engine.dispose()


def setup_ledger(factory: sessionmaker[Session]) -> list[Effect]:
    with unit_of_work(factory) as s:
        ledger.ensure_assets(s, {"CU": 0, "USD": 2})
        ledger.open_system_accounts(s, ASSETS)
        ledger.open_accounts(s, [(m, a) for m in MEMBERS for a in ASSETS])
        legs = tuple(
            Leg("system:issuance", m, a, FUNDING, "allocation") for m in MEMBERS for a in ASSETS
        )
        return list(ledger.apply(s, LedgerRequest("fund", legs)).effects)


def posted_deltas(effects: list[Effect]) -> Counter[tuple[str, str]]:
    """What the effects did to posted balances, per (address, asset)."""
    delta: Counter[tuple[str, str]] = Counter()
    for e in effects:
        if e.phase in ("posted", "post"):
            delta[(e.debit, e.asset)] -= e.amount
            delta[(e.credit, e.asset)] += e.amount
    return delta


def accounts(s: Session) -> dict[tuple[str, str], tuple[int, int, int, int, int]]:
    rows = s.execute(
        select(
            accounts_t.c.address,
            accounts_t.c.asset,
            accounts_t.c.id,
            accounts_t.c.debits_posted,
            accounts_t.c.credits_posted,
            accounts_t.c.debits_pending,
            accounts_t.c.credits_pending,
        )
    ).all()
    return {(r[0], r[1]): (r[2], r[3], r[4], r[5], r[6]) for r in rows}


def check_books(s: Session) -> None:
    """Conservation, non-negativity, and postings that rebuild every account."""
    books = accounts(s)
    for asset in ASSETS:
        assert sum(cp - dp for (_, a), (_, dp, cp, _, _) in books.items() if a == asset) == 0
        assert sum(cpe - dpe for (_, a), (_, _, _, dpe, cpe) in books.items() if a == asset) == 0
    for (address, _), (_, dp, cp, dpe, _) in books.items():
        if address.startswith("member:"):
            assert cp - dp - dpe >= 0, address
    rebuilt: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    last: dict[int, tuple[int, int]] = {}
    for account_id, side, posted, pending, balance_after, available_after in s.execute(
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
        counters[0 if side == "D" else 1] += posted
        counters[2 if side == "D" else 3] += pending
        last[account_id] = (balance_after, available_after)
    for key, (account_id, dp, cp, dpe, cpe) in books.items():
        assert rebuilt.get(account_id, [0, 0, 0, 0]) == [dp, cp, dpe, cpe], key
        if account_id in last:
            assert last[account_id] == (cp - dp, cp - dp - dpe), key


def transfer_count(s: Session, *where: Any) -> int:
    return s.execute(select(func.count()).select_from(transfers_t).where(*where)).scalar_one()


def run_threads(target: Callable[[int], T], n: int = THREADS) -> list[T]:
    """Run ``target(i)`` in ``n`` threads released together; re-raise nothing, return all."""
    barrier = threading.Barrier(n)

    def run(i: int) -> T:
        barrier.wait()
        return target(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


class Worker:
    """One thread's random traffic and what it was told."""

    def __init__(self, factory: sessionmaker[Session], index: int, deadline: float) -> None:
        self.factory = factory
        self.index = index
        self.deadline = deadline
        self.rng = random.Random(index)
        self.effects: list[Effect] = []
        self.insufficient = 0
        self.requests = 0
        self.unexpected: list[str] = []
        self.ids = 0

    def submit(self, operations: tuple[Leg | Post | Void, ...]) -> Applied | None:
        self.ids += 1
        request = LedgerRequest(f"w{self.index}-{self.ids}", operations)
        self.requests += 1
        with unit_of_work(self.factory) as s:
            # apply_many answers a failure instead of raising it, so its record commits.
            [outcome] = ledger.apply_many(s, [request])
        if isinstance(outcome, InsufficientFunds):
            self.insufficient += 1
            return None
        if not isinstance(outcome, Applied):
            raise outcome
        self.effects.extend(outcome.effects)
        return outcome

    def pair(self) -> tuple[str, str]:
        a, b = self.rng.sample(MEMBERS, 2)
        return a, b

    def asset(self) -> str:
        return "CU" if self.rng.random() < 0.8 else "USD"

    def step(self) -> None:
        roll = self.rng.random()
        asset = self.asset()
        if roll < 0.7:
            a, b = self.pair()
            self.submit((Leg(a, b, asset, self.rng.randint(1, 400), "transfer"),))
        elif roll < 0.85:
            a, b, c = self.rng.sample(MEMBERS, 3)
            legs = (
                Leg(a, b, asset, self.rng.randint(1, 300), "transfer"),
                Leg(b, c, asset, self.rng.randint(1, 300), "transfer"),
            )
            self.submit(legs)
        else:
            a, b = self.pair()
            held = self.rng.randint(1, 300)
            hold = self.submit((Leg(a, b, asset, held, "usage", timeout=HOLD_TIMEOUT),))
            if hold is None:
                return
            pending_id = hold.effects[0].transfer_id
            if self.rng.random() < 0.8:
                self.submit((Post(pending_id, self.rng.randint(1, held)),))
            else:
                self.submit((Void(pending_id),))

    def run(self, _: int) -> Worker:
        try:
            while time.monotonic() < self.deadline:
                self.step()
        except BaseException:
            self.unexpected.append(traceback.format_exc())
        return self


def test_hot_accounts_under_sixteen_writers(factory: sessionmaker[Session]) -> None:
    funding = setup_ledger(factory)
    deadline = time.monotonic() + DURATION
    workers = [Worker(factory, i, deadline) for i in range(THREADS)]
    done = run_threads(lambda i: workers[i].run(i))

    unexpected = [tb for w in done for tb in w.unexpected]
    assert not unexpected, "\n".join(unexpected)
    effects = [e for w in done for e in w.effects]
    applied_requests = sum(w.requests - w.insufficient for w in done)
    # Enough traffic to mean something, and some of it refused for want of funds.
    assert applied_requests > 200, applied_requests
    assert sum(w.insufficient for w in done) > 0

    with unit_of_work(factory) as s:
        check_books(s)
        books = accounts(s)
        # No lost update: one transfer row per leg a thread was told was applied.
        assert transfer_count(s) == len(funding) + len(effects)
        expected = posted_deltas(funding + effects)
        for asset in ASSETS:
            members_total = 0
            for m in MEMBERS:
                _, dp, cp, dpe, cpe = books[(m, asset)]
                assert cp - dp == expected[(m, asset)], (m, asset)
                assert (dpe, cpe) == (0, 0), (m, asset)  # every hold was posted or voided
                members_total += cp - dp
            assert members_total == FUNDING * len(MEMBERS)
            _, dp, cp, _, _ = books[("system:issuance", asset)]
            assert cp - dp == -FUNDING * len(MEMBERS)


def same_request(
    factory: sessionmaker[Session], request: LedgerRequest, _: int
) -> Applied | UbcError:
    return outcome_of(factory, request)


def outcome_of(factory: sessionmaker[Session], request: LedgerRequest) -> Applied | UbcError:
    """Apply and commit, the failure's record included (as the server does, retrying a
    transaction that lost a race on a new request id)."""
    return run_unit_of_work(factory, lambda s: ledger.apply_many(s, [request])[0])


def test_same_request_id_from_sixteen_threads_applies_once(
    factory: sessionmaker[Session],
) -> None:
    rounds = 5
    funding = setup_ledger(factory)
    applied_effects: list[Effect] = []
    for r in range(rounds):
        request = LedgerRequest(
            f"dup-{r}",
            (
                Leg("member:m0", "member:m1", "CU", 7, "transfer"),
                Leg("member:m1", "member:m2", "CU", 3, "transfer"),
                Leg("member:m3", "system:consumption", "USD", 2, "usage", timeout=HOLD_TIMEOUT),
            ),
        )
        outcomes = run_threads(functools.partial(same_request, factory, request))
        assert all(isinstance(o, Applied) for o in outcomes), outcomes
        applied = [o for o in outcomes if isinstance(o, Applied)]
        assert sum(not o.repeated for o in applied) == 1
        assert len({o.effects for o in applied}) == 1
        applied_effects.extend(applied[0].effects)
        with unit_of_work(factory) as s:
            assert transfer_count(s, transfers_t.c.id.like(f"{request.id}:%")) == 3

    with unit_of_work(factory) as s:
        check_books(s)
        books = accounts(s)
        expected = posted_deltas(funding + applied_effects)
        for m in MEMBERS:
            for asset in ASSETS:
                _, dp, cp, _, _ = books[(m, asset)]
                assert cp - dp == expected[(m, asset)], (m, asset)
        assert books[("member:m3", "USD")][3] == 2 * rounds  # one hold per id


def test_one_hold_posted_by_sixteen_threads_posts_once(factory: sessionmaker[Session]) -> None:
    """Different ids racing to post the same hold: one wins, the others see it resolved."""
    setup_ledger(factory)
    with unit_of_work(factory) as s:
        ledger.apply(
            s,
            LedgerRequest(
                "hold", (Leg("member:m0", "member:m1", "CU", 100, "usage", timeout=HOLD_TIMEOUT),)
            ),
        )
    outcomes = run_threads(
        lambda i: outcome_of(factory, LedgerRequest(f"post-{i}", (Post("hold:0", 10 + i),)))
    )
    wins = [o for o in outcomes if isinstance(o, Applied)]
    assert len(wins) == 1, outcomes
    assert all(isinstance(o, StateConflict) for o in outcomes if not isinstance(o, Applied))
    amount = wins[0].effects[0].amount
    with unit_of_work(factory) as s:
        check_books(s)
        books = accounts(s)
        assert books[("member:m0", "CU")][1:] == (amount, FUNDING, 0, 0)
        assert books[("member:m1", "CU")][1:] == (0, FUNDING + amount, 0, 0)


def test_same_id_different_payloads_race_one_wins(factory: sessionmaker[Session]) -> None:
    setup_ledger(factory)
    outcomes = run_threads(
        lambda i: outcome_of(
            factory,
            LedgerRequest("contested", (Leg("member:m0", "member:m1", "CU", 1 + i, "transfer"),)),
        )
    )
    wins = [o for o in outcomes if isinstance(o, Applied)]
    assert len(wins) == 1, outcomes
    assert not wins[0].repeated
    assert all(isinstance(o, IdempotencyConflict) for o in outcomes if o is not wins[0])
    with unit_of_work(factory) as s:
        check_books(s)
        assert transfer_count(s, transfers_t.c.id.like("contested:%")) == 1


# The core checks a request id only after it has locked the holds and accounts the request
# names; two requests under one id that share no row lock both miss the other's
# uncommitted record and both insert it. The loser's unit of work fails on the unique key
# and runs again (``run_unit_of_work``), and then answers the stored outcome (here
# account_not_found or transfer_not_found) or a 409 idempotency_conflict.


def racing_request(case: str, round_: int, thread: int) -> LedgerRequest:
    request_id = f"{case}-{round_}"
    if case == "no-such-accounts":
        return LedgerRequest(
            request_id, (Leg("member:nobody", "member:none", "CU", 1, "transfer"),)
        )
    if case == "no-such-hold":
        return LedgerRequest(request_id, (Post("nohold:0", 1),))
    # Different payloads under one id, on two disjoint pairs of accounts.
    debit, credit = MEMBERS[2 * (thread % 2)], MEMBERS[2 * (thread % 2) + 1]
    return LedgerRequest(request_id, (Leg(debit, credit, "CU", 1 + thread, "transfer"),))


def racing(
    factory: sessionmaker[Session], case: str, round_: int, thread: int
) -> Applied | UbcError:
    return outcome_of(factory, racing_request(case, round_, thread))


@pytest.mark.parametrize(
    "case",
    [
        "no-such-accounts",
        "no-such-hold",
        "disjoint-payloads",
    ],
)
def test_same_id_without_a_shared_row_lock_answers_once(
    factory: sessionmaker[Session], case: str
) -> None:
    setup_ledger(factory)
    for r in range(5):
        outcomes = run_threads(functools.partial(racing, factory, case, r))
        applied = [o for o in outcomes if isinstance(o, Applied)]
        errors = Counter(o.error_type for o in outcomes if isinstance(o, UbcError))
        if case == "disjoint-payloads":
            assert len(applied) == 1
            assert not applied[0].repeated
            assert errors == Counter({"idempotency_conflict": THREADS - 1})
        else:
            expected = "account_not_found" if case == "no-such-accounts" else "transfer_not_found"
            assert errors == Counter({expected: THREADS})
    with unit_of_work(factory) as s:
        check_books(s)
