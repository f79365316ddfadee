"""HTTP reads of the ledger: configuration, balances, history, transfers."""

from __future__ import annotations

from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from ubc.db import table
from ubc.deps import Reader, ReadSession, require_read
from ubc.errors import Forbidden, TransferNotFound
from ubc.ledger import service as ledger
from ubc.ledger.models import Account, Transfer
from ubc.ledger.schemas import Account as AccountBody
from ubc.ledger.schemas import AccountList, HistoryPage, LedgerInfo
from ubc.ledger.schemas import Transfer as TransferBody
from ubc.params import parse_cursor
from ubc.schemas import error_responses

router = APIRouter(tags=["ledger"])
accounts_t = table(Account)
transfers_t = table(Transfer)


class EpochReads(Protocol):
    """What these reads show of the epochs: ``ubc.epochs.service``, which ``ubc.app``
    hands over as ``app.state.epoch_reads`` (the epochs use the ledger's bulk moves, so
    the ledger does not import them)."""

    def current_epoch(self, session: Session) -> int | None: ...

    def leg_ids(self, session: Session, envelope_id: str) -> list[str]: ...


def _epochs(request: Request) -> EpochReads:
    reads: EpochReads = request.app.state.epoch_reads
    return reads


@router.get(
    "/api/ledger",
    summary="Public facts of this ledger",
    response_model=LedgerInfo,
    response_model_exclude_unset=True,
    responses=error_responses(),
)
def get_ledger(request: Request, session: ReadSession) -> dict[str, Any]:
    info: dict[str, Any] = dict(request.app.state.ledger_info)
    info["current_epoch"] = _epochs(request).current_epoch(session)
    return info


@router.get(
    "/api/accounts",
    summary="Every account's balances (operator and auditors)",
    response_model=AccountList,
    response_model_exclude_unset=True,
    responses=error_responses(401, 403),
)
def list_accounts(session: ReadSession, reader: Reader) -> dict[str, Any]:
    if not reader.sees_everything:
        raise Forbidden("only the operator and auditors list every account")
    rows = session.execute(
        select(
            accounts_t.c.address,
            accounts_t.c.asset,
            accounts_t.c.debits_posted,
            accounts_t.c.credits_posted,
            accounts_t.c.debits_pending,
            accounts_t.c.credits_pending,
        ).order_by(accounts_t.c.address, accounts_t.c.asset)
    ).all()
    return {
        "accounts": [
            {
                "address": r.address,
                "asset": r.asset,
                "posted": r.credits_posted - r.debits_posted,
                "pending_debits": r.debits_pending,
                "pending_credits": r.credits_pending,
                "available": r.credits_posted - r.debits_posted - r.debits_pending,
            }
            for r in rows
        ]
    }


@router.get(
    "/api/accounts/{address}",
    summary="Balances of an account, per asset",
    response_model=AccountBody,
    response_model_exclude_unset=True,
    responses=error_responses(401, 403, 404, notes={404: "account_not_found"}),
)
def get_account(address: str, session: ReadSession, reader: Reader) -> dict[str, Any]:
    require_read(reader, address)
    return {
        "address": address,
        "balances": [
            {
                "asset": b.asset,
                "posted": b.posted,
                "pending_debits": b.debits_pending,
                "pending_credits": b.credits_pending,
                "available": b.available,
            }
            for b in ledger.balances(session, address)
        ],
    }


@router.get(
    "/api/accounts/{address}/history",
    summary="Postings of an account, newest first",
    response_model=HistoryPage,
    response_model_exclude_unset=True,
    responses=error_responses(401, 403, 404, 422, notes={400: "a malformed cursor"}),
)
def get_history(
    address: str,
    session: ReadSession,
    reader: Reader,
    cursor: Annotated[str | None, Query(description="from the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    asset: str | None = None,
) -> dict[str, Any]:
    require_read(reader, address)
    position = parse_cursor(cursor)
    items, next_cursor = ledger.history(session, address, asset=asset, cursor=position, limit=limit)
    return {
        "address": address,
        "items": [
            {
                "transfer_id": i.transfer_id,
                "kind": i.kind,
                "phase": i.phase,
                "asset": i.asset,
                "amount": i.amount,
                "pending": i.pending if i.side == "C" else -i.pending,
                "counterparty": i.counterparty,
                "balance_after": i.balance_after,
                "available_after": i.available_after,
                "memo": i.memo,
                "created_at": i.created_at.isoformat(),
            }
            for i in items
        ],
        "next_cursor": None if next_cursor is None else str(next_cursor),
    }


@router.get(
    "/api/transfers/{transfer_id}",
    summary="A transfer, or every leg of an envelope",
    response_model=TransferBody,
    response_model_exclude_unset=True,
    responses=error_responses(
        401, 403, 404, notes={404: "transfer_not_found, also when the reader may see no leg"}
    ),
)
def get_transfer(
    request: Request, transfer_id: str, session: ReadSession, reader: Reader
) -> dict[str, Any]:
    debit = aliased(accounts_t)
    credit = aliased(accounts_t)
    stmt = (
        select(
            transfers_t.c.id,
            transfers_t.c.kind,
            transfers_t.c.phase,
            debit.c.address.label("debit"),
            credit.c.address.label("credit"),
            transfers_t.c.asset,
            transfers_t.c.amount,
            transfers_t.c.pending_id,
            transfers_t.c.state,
            transfers_t.c.memo,
            transfers_t.c.created_at,
        )
        .join(debit, debit.c.id == transfers_t.c.debit_account_id)
        .join(credit, credit.c.id == transfers_t.c.credit_account_id)
    )
    if ":" in transfer_id:
        stmt = stmt.where(transfers_t.c.id == transfer_id)
    else:
        legs = ledger.leg_ids(session, transfer_id) or _epochs(request).leg_ids(
            session, transfer_id
        )
        stmt = stmt.where(transfers_t.c.id.in_(legs))
    rows = sorted(session.execute(stmt).all(), key=lambda r: int(r.id.rsplit(":", 1)[1]))
    visible = [r for r in rows if reader.may_read(r.debit) or reader.may_read(r.credit)]
    if not visible:
        raise TransferNotFound(f"no transfer {transfer_id}", detail={"id": transfer_id})
    return {
        "id": transfer_id,
        "transfers": [
            {
                "transfer_id": r.id,
                "kind": r.kind,
                "phase": r.phase,
                "debit": r.debit,
                "credit": r.credit,
                "asset": r.asset,
                "amount": r.amount,
                "pending_id": r.pending_id,
                "state": r.state,
                "memo": r.memo,
                "created_at": r.created_at.isoformat(),
            }
            for r in visible
        ],
    }
