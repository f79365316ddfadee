"""The double-entry core: transfers, linked batches, holds, idempotency, history, errors."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ubc.dbtypes import utcnow
from ubc.errors import (
    AccountNotFound,
    BadRequest,
    BatchFailed,
    IdempotencyConflict,
    InsufficientFunds,
    StateConflict,
    TransferNotFound,
    UbcError,
)
from ubc.ledger import service as ledger
from ubc.ledger.models import Account, Posting, Request, Transfer
from ubc.ledger.service import LedgerRequest, Leg, Post, Void

MEMBERS = ["member:alice", "member:bob", "member:carol"]


def setup_ledger(session: Session) -> None:
    ledger.ensure_assets(session, {"CU": 0, "USD": 2})
    ledger.open_system_accounts(session, ["CU", "USD"])
    ledger.open_accounts(session, [(m, a) for m in MEMBERS for a in ("CU", "USD")])
    ledger.apply(
        session,
        LedgerRequest(
            "fund",
            tuple(Leg("system:issuance", m, "CU", 1000, "allocation") for m in MEMBERS),
        ),
    )


def available(session: Session, address: str, asset: str = "CU") -> int:
    return next(b.available for b in ledger.balances(session, address) if b.asset == asset)


def snapshot(session: Session) -> tuple[object, ...]:
    """Everything the ledger stores, to assert that a failure changed nothing but its record."""
    accounts = session.execute(
        select(
            Account.address,  # type: ignore[arg-type]
            Account.asset,  # type: ignore[arg-type]
            Account.debits_posted,  # type: ignore[arg-type]
            Account.credits_posted,  # type: ignore[arg-type]
            Account.debits_pending,  # type: ignore[arg-type]
            Account.credits_pending,  # type: ignore[arg-type]
        ).order_by(Account.id)  # type: ignore[arg-type]
    ).all()
    transfers = session.execute(select(func.count()).select_from(Transfer)).scalar_one()
    postings = session.execute(select(func.count()).select_from(Posting)).scalar_one()
    return (tuple(accounts), transfers, postings)


@pytest.fixture
def book(session: Session) -> Session:
    setup_ledger(session)
    session.flush()
    return session


def test_transfer_moves_value_and_records_postings(book: Session) -> None:
    applied = ledger.apply(
        book, LedgerRequest("t1", (Leg("member:alice", "member:bob", "CU", 30, "transfer", "hi"),))
    )
    assert [e.to_json() for e in applied.effects] == [
        {
            "transfer_id": "t1:0",
            "kind": "transfer",
            "debit": "member:alice",
            "credit": "member:bob",
            "asset": "CU",
            "amount": 30,
            "phase": "posted",
        }
    ]
    assert available(book, "member:alice") == 970
    assert available(book, "member:bob") == 1030
    items, cursor = ledger.history(book, "member:alice", asset="CU")
    assert cursor is None
    assert [(i.transfer_id, i.amount, i.balance_after, i.counterparty, i.memo) for i in items] == [
        ("t1:0", -30, 970, "member:bob", "hi"),
        ("fund:0", 1000, 1000, "system:issuance", None),
    ]


def test_insufficient_funds_changes_nothing_and_names_the_shortfall(book: Session) -> None:
    before = snapshot(book)
    with pytest.raises(InsufficientFunds) as info:
        ledger.apply(
            book, LedgerRequest("t1", (Leg("member:alice", "member:bob", "CU", 1001, "transfer"),))
        )
    assert info.value.detail["shortfall"] == 1
    assert info.value.status_code == 409
    assert snapshot(book) == before


def test_linked_batch_commits_or_fails_whole(book: Session) -> None:
    before = snapshot(book)
    legs = (
        Leg("member:alice", "member:bob", "CU", 600, "transfer"),
        Leg("member:alice", "member:carol", "CU", 600, "transfer"),
    )
    with pytest.raises(InsufficientFunds):
        ledger.apply(book, LedgerRequest("b1", legs))
    assert snapshot(book) == before
    half = Leg("member:alice", "member:bob", "CU", 500, "transfer")
    ok = ledger.apply(book, LedgerRequest("b2", (half, half)))
    assert [e.transfer_id for e in ok.effects] == ["b2:0", "b2:1"]
    assert available(book, "member:alice") == 0
    assert available(book, "member:bob") == 2000


def test_idempotency_same_payload_replays_different_conflicts(book: Session) -> None:
    request = LedgerRequest("t1", (Leg("member:alice", "member:bob", "CU", 5, "transfer"),))
    first = ledger.apply(book, request)
    after_first = snapshot(book)
    again = ledger.apply(book, request)
    assert again.repeated
    assert again.effects == first.effects
    assert snapshot(book) == after_first
    with pytest.raises(IdempotencyConflict):
        ledger.apply(
            book, LedgerRequest("t1", (Leg("member:alice", "member:bob", "CU", 6, "transfer"),))
        )
    assert snapshot(book) == after_first


def test_a_failed_id_stays_failed(book: Session) -> None:
    request = LedgerRequest("t1", (Leg("member:alice", "member:bob", "CU", 5000, "transfer"),))
    with pytest.raises(InsufficientFunds):
        ledger.apply(book, request)
    ledger.apply(
        book,
        LedgerRequest(
            "top-up", (Leg("system:issuance", "member:alice", "CU", 9000, "allocation"),)
        ),
    )
    before = snapshot(book)
    with pytest.raises(UbcError) as info:
        ledger.apply(book, request)
    assert info.value.error_type == "insufficient_funds"
    assert info.value.status_code == 409
    assert snapshot(book) == before
    status = book.execute(select(Request.status).where(Request.id == "t1")).scalar_one()  # type: ignore[arg-type]
    assert status == "failed"


def test_duplicate_id_inside_one_batch_is_a_replay(book: Session) -> None:
    request = LedgerRequest("t1", (Leg("member:alice", "member:bob", "CU", 5, "transfer"),))
    first, second = ledger.apply_many(book, [request, request])
    assert isinstance(first, ledger.Applied)
    assert isinstance(second, ledger.Applied)
    assert second.repeated
    assert available(book, "member:alice") == 995


def test_group_commit_isolates_failures(book: Session) -> None:
    outcomes = ledger.apply_many(
        book,
        [
            LedgerRequest("a", (Leg("member:alice", "member:bob", "CU", 10, "transfer"),)),
            LedgerRequest("b", (Leg("member:bob", "member:carol", "CU", 99999, "transfer"),)),
            LedgerRequest("c", (Leg("member:carol", "member:alice", "CU", 7, "transfer"),)),
        ],
    )
    assert [type(o).__name__ for o in outcomes] == ["Applied", "InsufficientFunds", "Applied"]
    assert available(book, "member:alice") == 997
    assert available(book, "member:bob") == 1010
    assert available(book, "member:carol") == 993


def test_atomic_batch_applies_nothing_on_failure(book: Session) -> None:
    before = snapshot(book)
    with pytest.raises(BatchFailed) as info:
        ledger.apply_many(
            book,
            [
                LedgerRequest("a", (Leg("member:alice", "member:bob", "CU", 10, "transfer"),)),
                LedgerRequest("b", (Leg("member:bob", "member:nobody", "CU", 1, "transfer"),)),
            ],
            atomic=True,
        )
    assert info.value.index == 1
    assert info.value.detail["cause"]["type"] == "account_not_found"
    assert snapshot(book) == before


def test_hold_post_partial_releases_the_rest(book: Session) -> None:
    hold = LedgerRequest(
        "h",
        (
            Leg(
                "member:alice",
                "system:consumption",
                "CU",
                100,
                "usage",
                timeout=timedelta(seconds=60),
            ),
        ),
    )
    ledger.apply(book, hold)
    assert available(book, "member:alice") == 900
    balance = next(b for b in ledger.balances(book, "member:alice") if b.asset == "CU")
    assert (balance.posted, balance.debits_pending) == (1000, 100)
    applied = ledger.apply(book, LedgerRequest("p", (Post("h:0", 40),)))
    assert applied.effects[0].phase == "post"
    assert applied.effects[0].amount == 40
    assert applied.effects[0].pending_id == "h:0"
    balance = next(b for b in ledger.balances(book, "member:alice") if b.asset == "CU")
    assert (balance.posted, balance.debits_pending, balance.available) == (960, 0, 960)
    before = snapshot(book)
    with pytest.raises(StateConflict):
        ledger.apply(book, LedgerRequest("p2", (Post("h:0", 1),)))
    with pytest.raises(StateConflict):
        ledger.apply(book, LedgerRequest("v2", (Void("h:0"),)))
    assert snapshot(book) == before


def test_hold_counts_against_available(book: Session) -> None:
    ledger.apply(
        book,
        LedgerRequest(
            "h",
            (
                Leg(
                    "member:alice",
                    "system:consumption",
                    "CU",
                    900,
                    "usage",
                    timeout=timedelta(seconds=60),
                ),
            ),
        ),
    )
    with pytest.raises(InsufficientFunds):
        ledger.apply(
            book, LedgerRequest("t", (Leg("member:alice", "member:bob", "CU", 101, "transfer"),))
        )
    ledger.apply(book, LedgerRequest("v", (Void("h:0"),)))
    ledger.apply(
        book, LedgerRequest("t2", (Leg("member:alice", "member:bob", "CU", 101, "transfer"),))
    )
    assert available(book, "member:alice") == 899


def test_post_more_than_held_is_refused(book: Session) -> None:
    ledger.apply(
        book,
        LedgerRequest(
            "h",
            (
                Leg(
                    "member:alice",
                    "system:consumption",
                    "CU",
                    10,
                    "usage",
                    timeout=timedelta(seconds=60),
                ),
            ),
        ),
    )
    before = snapshot(book)
    with pytest.raises(BadRequest):
        ledger.apply(book, LedgerRequest("p", (Post("h:0", 11),)))
    with pytest.raises(TransferNotFound):
        ledger.apply(book, LedgerRequest("p2", (Post("nope:0"),)))
    assert snapshot(book) == before


def test_expired_hold_releases_by_itself_and_cannot_be_posted(book: Session) -> None:
    now = utcnow()
    ledger.apply(
        book,
        LedgerRequest(
            "h",
            (
                Leg(
                    "member:alice",
                    "system:consumption",
                    "CU",
                    100,
                    "usage",
                    timeout=timedelta(seconds=5),
                ),
            ),
        ),
        now=now,
    )
    assert ledger.expire_holds(book, now=now + timedelta(seconds=4)) == 0
    later = now + timedelta(seconds=6)
    with pytest.raises(StateConflict, match="expired"):
        ledger.apply(book, LedgerRequest("p", (Post("h:0"),)), now=later)
    assert ledger.expire_holds(book, now=later) == 1
    assert ledger.expire_holds(book, now=later) == 0
    assert available(book, "member:alice") == 1000
    state = book.execute(select(Transfer.state).where(Transfer.id == "h:0")).scalar_one()  # type: ignore[arg-type]
    assert state == "expired"


def test_expiry_survives_a_restart(sessions: object, engine: object) -> None:
    from sqlalchemy.orm import sessionmaker

    from ubc.db import unit_of_work

    assert isinstance(sessions, sessionmaker)
    now = utcnow()
    with unit_of_work(sessions) as s:
        setup_ledger(s)
        ledger.apply(
            s,
            LedgerRequest(
                "h",
                (
                    Leg(
                        "member:alice",
                        "system:consumption",
                        "CU",
                        100,
                        "usage",
                        timeout=timedelta(seconds=1),
                    ),
                ),
            ),
            now=now,
        )
    engine.dispose()  # type: ignore[attr-defined]
    with unit_of_work(sessions) as s:
        assert ledger.expire_holds(s, now=now + timedelta(seconds=2)) == 1
    with unit_of_work(sessions) as s:
        assert available(s, "member:alice") == 1000


def test_hold_created_and_posted_in_one_batch(book: Session) -> None:
    ledger.apply(
        book,
        LedgerRequest(
            "h",
            (
                Leg(
                    "member:alice",
                    "system:consumption",
                    "CU",
                    10,
                    "usage",
                    timeout=timedelta(seconds=60),
                ),
                Post("h:0", 4),
            ),
        ),
    )
    assert available(book, "member:alice") == 996
    state = book.execute(select(Transfer.state).where(Transfer.id == "h:0")).scalar_one()  # type: ignore[arg-type]
    assert state == "posted"


@pytest.mark.parametrize(
    ("leg", "error"),
    [
        (Leg("member:alice", "member:bob", "CU", 0, "transfer"), BadRequest),
        (Leg("member:alice", "member:bob", "CU", -5, "transfer"), BadRequest),
        (Leg("member:alice", "member:bob", "CU", 2**63, "transfer"), BadRequest),
        (Leg("member:alice", "member:bob", "CU", 1, "gift"), BadRequest),
        (Leg("member:alice", "member:alice", "CU", 1, "transfer"), BadRequest),
        (Leg("member:alice", "member:bob", "CU", 1, "transfer", "x" * 257), BadRequest),
        (Leg("member:alice", "member:zed", "CU", 1, "transfer"), AccountNotFound),
        (Leg("member:alice", "member:bob", "EUR", 1, "transfer"), AccountNotFound),
        (Leg("alice", "member:bob", "CU", 1, "transfer"), BadRequest),
        (Leg("member:alice", "member:bob", "CU", 1, "transfer", timeout=timedelta(0)), BadRequest),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    book: Session, leg: Leg, error: type[UbcError]
) -> None:
    before = snapshot(book)
    with pytest.raises(error):
        ledger.apply(book, LedgerRequest("bad", (leg,)))
    assert snapshot(book) == before


def test_history_paginates_with_a_cursor(book: Session) -> None:
    for i in range(7):
        ledger.apply(
            book,
            LedgerRequest(f"t{i}", (Leg("member:alice", "member:bob", "CU", i + 1, "transfer"),)),
        )
    seen: list[str] = []
    cursor = None
    while True:
        items, cursor = ledger.history(book, "member:bob", asset="CU", cursor=cursor, limit=3)
        seen.extend(i.transfer_id for i in items)
        if cursor is None:
            break
    assert seen == [f"t{i}:0" for i in reversed(range(7))] + ["fund:1"]
    with pytest.raises(AccountNotFound):
        ledger.history(book, "member:nobody")


def test_system_accounts_may_go_negative_members_may_not(book: Session) -> None:
    issuance = next(b for b in ledger.balances(book, "system:issuance") if b.asset == "CU")
    assert issuance.posted == -3000
    escrow = (
        book.execute(
            select(Account.non_negative).where(Account.address == "market:escrow")  # type: ignore[arg-type]
        )
        .scalars()
        .all()
    )
    assert escrow
    assert all(escrow)
