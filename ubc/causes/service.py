"""Reads of causes: who they are, what they received and what they spent, and a donor's
receipts. Everything is derived from the ledger's transfers and postings.

- ``donated``: per asset, the posted donations (kind ``donation``) into the cause;
- ``donors``: how many distinct accounts donated;
- ``spent``: per asset, what left the cause's account: ``used`` on models (kind
  ``usage``, posted) plus ``sent`` by its stewards (kind ``transfer``); ``spent`` is their
  sum.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from ubc.causes.models import Cause, CauseSteward
from ubc.db import table
from ubc.errors import AccountNotFound, NotFound
from ubc.journal.models import JournalEntry
from ubc.ledger import service as ledger
from ubc.ledger.models import Account, Posting, Transfer
from ubc.params import parse_cursor

causes_t = table(Cause)
stewards_t = table(CauseSteward)
accounts_t = table(Account)
transfers_t = table(Transfer)
postings_t = table(Posting)
entries_t = table(JournalEntry)


def list_causes(session: Session) -> list[dict[str, Any]]:
    return _causes(session, None)


def get_cause(session: Session, slug: str) -> dict[str, Any]:
    found = _causes(session, slug)
    if not found:
        raise NotFound(f"no cause {slug}", detail={"slug": slug})
    return found[0]


def donations(
    session: Session, address: str, *, limit: int = 50, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """The donation receipts of ``address``, newest first: one per donation transfer,
    with its journal entry (whose inclusion the donor can prove)."""
    exists = session.execute(
        select(accounts_t.c.id).where(accounts_t.c.address == address).limit(1)
    ).first()
    if exists is None:
        raise AccountNotFound(f"no account {address}", detail={"address": address})
    debit = aliased(accounts_t)
    credit = aliased(accounts_t)
    stmt = (
        select(
            postings_t.c.id.label("posting_id"),
            transfers_t.c.id.label("transfer_id"),
            credit.c.address.label("cause"),
            transfers_t.c.asset,
            transfers_t.c.amount,
            transfers_t.c.memo,
            transfers_t.c.created_at,
        )
        .join(transfers_t, transfers_t.c.id == postings_t.c.transfer_id)
        .join(debit, debit.c.id == transfers_t.c.debit_account_id)
        .join(credit, credit.c.id == transfers_t.c.credit_account_id)
        .where(
            debit.c.address == address,
            postings_t.c.account_id == debit.c.id,
            transfers_t.c.kind == "donation",
            transfers_t.c.phase == "posted",
        )
        .order_by(postings_t.c.id.desc())
        .limit(limit + 1)
    )
    position = parse_cursor(cursor)
    if position is not None:
        stmt = stmt.where(postings_t.c.id < position)
    rows = session.execute(stmt).all()[: limit + 1]
    page = rows[:limit]
    envelope_ids = sorted({str(r.transfer_id).rsplit(":", 1)[0] for r in page})
    seqs = {
        str(r.envelope_id): int(r.seq)
        for r in session.execute(
            select(entries_t.c.envelope_id, entries_t.c.seq).where(
                entries_t.c.envelope_id.in_(envelope_ids)
            )
        )
    }
    items = []
    for r in page:
        envelope_id = str(r.transfer_id).rsplit(":", 1)[0]
        items.append(
            {
                "id": envelope_id,
                "transfer_id": r.transfer_id,
                "seq": seqs.get(envelope_id),
                "cause": r.cause,
                "asset": r.asset,
                "amount": int(r.amount),
                "memo": r.memo,
                "created_at": r.created_at.isoformat(),
            }
        )
    next_cursor = str(page[-1].posting_id) if len(rows) > limit else None
    return items, next_cursor


# --- internals --------------------------------------------------------------------------


def _causes(session: Session, slug: str | None) -> list[dict[str, Any]]:
    stmt = select(
        causes_t.c.slug,
        causes_t.c.name,
        causes_t.c.description,
        causes_t.c.created_at,
        causes_t.c.updated_at,
    ).order_by(causes_t.c.slug)
    if slug is not None:
        stmt = stmt.where(causes_t.c.slug == slug)
    rows = session.execute(stmt).all()
    if not rows:
        return []
    slugs = [str(r.slug) for r in rows]
    addresses = [f"cause:{s}" for s in slugs]
    stewards: dict[str, list[str]] = {s: [] for s in slugs}
    for s, handle in session.execute(
        select(stewards_t.c.slug, stewards_t.c.handle)
        .where(stewards_t.c.slug.in_(slugs))
        .order_by(stewards_t.c.slug, stewards_t.c.handle)
    ):
        stewards[str(s)].append(str(handle))
    balances: dict[str, dict[str, int]] = {a: {} for a in addresses}
    for address, asset, available in session.execute(
        select(
            accounts_t.c.address,
            accounts_t.c.asset,
            accounts_t.c.credits_posted - accounts_t.c.debits_posted - accounts_t.c.debits_pending,
        )
        .where(accounts_t.c.address.in_(addresses))
        .order_by(accounts_t.c.address, accounts_t.c.asset)
    ):
        balances[str(address)][str(asset)] = int(available)
    flows = _flows(session, addresses)
    donors = _donors(session, addresses)
    causes = []
    for r in rows:
        address = f"cause:{r.slug}"
        flow = flows.get(address, {})
        donated = {a: f["donated"] for a, f in sorted(flow.items()) if f["donated"]}
        used = {a: f["used"] for a, f in sorted(flow.items()) if f["used"]}
        sent = {a: f["sent"] for a, f in sorted(flow.items()) if f["sent"]}
        spent = {a: f["used"] + f["sent"] for a, f in sorted(flow.items()) if f["used"] + f["sent"]}
        causes.append(
            {
                "slug": r.slug,
                "address": address,
                "name": r.name,
                "description": r.description,
                "stewards": stewards[str(r.slug)],
                "created_at": r.created_at.isoformat(),
                "updated_at": r.updated_at.isoformat(),
                "balances": balances[address],
                "donated": donated,
                "donors": donors.get(address, 0),
                "spent": spent,
                "used_on_models": used,
                "sent": sent,
            }
        )
    return causes


_FLOWS = {"donated": ("donation", "C"), "used": ("usage", "D"), "sent": ("transfer", "D")}


def _flows(session: Session, addresses: list[str]) -> dict[str, dict[str, dict[str, int]]]:
    p, t, a = postings_t, transfers_t, accounts_t
    stmt = (
        select(a.c.address, a.c.asset, *ledger.flow_sums(_FLOWS))
        .select_from(p.join(t, t.c.id == p.c.transfer_id).join(a, a.c.id == p.c.account_id))
        .where(a.c.address.in_(addresses))
        .group_by(a.c.address, a.c.asset)
    )
    flows: dict[str, dict[str, dict[str, int]]] = {}
    for row in session.execute(stmt):
        flows.setdefault(str(row.address), {})[str(row.asset)] = {
            name: int(getattr(row, name)) for name in _FLOWS
        }
    return flows


def _donors(session: Session, addresses: list[str]) -> dict[str, int]:
    credit = aliased(accounts_t)
    debit = aliased(accounts_t)
    stmt = (
        select(credit.c.address, func.count(func.distinct(debit.c.address)).label("donors"))
        .select_from(
            transfers_t.join(credit, credit.c.id == transfers_t.c.credit_account_id).join(
                debit, debit.c.id == transfers_t.c.debit_account_id
            )
        )
        .where(
            credit.c.address.in_(addresses),
            transfers_t.c.kind == "donation",
            transfers_t.c.phase == "posted",
        )
        .group_by(credit.c.address)
    )
    return {str(r.address): int(r.donors) for r in session.execute(stmt)}
