"""Every payload type's schema and rule, and every change type's writer, in one table.

Above the domains: each domain owns its ``payloads.py`` (schemas), ``rules.py`` (rules
and the change types they return) and the writers of its tables; this joins them. A new
payload type touches its domain and one line here.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from ubc.causes import rules as causes
from ubc.causes import store as causes_store
from ubc.epochs import rules as epochs
from ubc.epochs import service as epochs_service
from ubc.ledger import rules as ledger
from ubc.ledger.config import store_config
from ubc.market import rules as market
from ubc.market import store as market_store
from ubc.members import rules as members
from ubc.members import store as members_store
from ubc.metering import rules as metering
from ubc.metering import store as metering_store
from ubc.rules import Registry, WriterSpec

# An epoch that is opening allocates by each member's state at its entry: a member's
# change first keeps that state for it (ubc.epochs.service.before_member_change).


def _create_member(session: Session, change: members.MemberCreated, now: datetime) -> None:
    epochs_service.before_member_change(session, change.handle)
    members_store.create_member(session, change, now)


def _set_status(session: Session, change: members.MemberStatusSet, now: datetime) -> None:
    epochs_service.before_member_change(session, change.handle)
    members_store.set_status(session, change, now)


REGISTRY = Registry(
    [*ledger.RULES, *members.RULES, *epochs.RULES, *causes.RULES, *market.RULES, *metering.RULES],
    [
        WriterSpec(
            ledger.RefClaimed,
            lambda s, c, now: members_store.store_ref(s, c.ref, c.envelope_id),
        ),
        WriterSpec(ledger.ConfigStored, lambda s, c, now: store_config(s, c.envelope_id, c.body)),
        WriterSpec(members.MemberCreated, _create_member),
        WriterSpec(members.KeyRotated, members_store.rotate_key),
        WriterSpec(members.MemberStatusSet, _set_status),
        WriterSpec(members.GrantStored, members_store.store_grant),
        WriterSpec(members.GrantRevoked, members_store.revoke_grant),
        WriterSpec(epochs.EpochOpened, epochs_service.apply_opened),
        WriterSpec(epochs.EpochClosed, epochs_service.apply_closed),
        WriterSpec(epochs.EpochExpired, epochs_service.apply_expired),
        WriterSpec(causes.CauseStored, causes_store.store_cause),
        WriterSpec(market.OfferCreated, market_store.create_offer),
        WriterSpec(market.OfferUpdated, market_store.update_offer),
        WriterSpec(market.FillRecorded, market_store.record_fill),
        WriterSpec(metering.SpendAdded, metering_store.add_spend),
        # Written once per batch, in this order, after every envelope applied.
        WriterSpec(metering.UsageRecorded, write_batch=metering_store.record_usage),
        WriterSpec(metering.CallSettled, write_batch=metering_store.settle_calls),
    ],
)
