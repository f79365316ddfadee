"""The configuration in force: the payload of the latest genesis or config entry.

Rows are written by the applier (:class:`ubc.ledger.rules.ConfigStored`) and by genesis;
every domain reads prices, the market fee and the CU price of its own moment in the
journal from here.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from ubc.db import table
from ubc.errors import BadRequest
from ubc.ledger.models import LedgerConfigRow

config_t = table(LedgerConfigRow)


def current_config(session: Session) -> dict[str, Any]:
    """The payload of the latest genesis or config entry: prices, fee, CU price."""
    return current_config_version(session)[1]


def current_config_version(session: Session) -> tuple[str, dict[str, Any]]:
    """The envelope that set the configuration in force, and its body."""
    row = session.execute(
        select(config_t.c.envelope_id, config_t.c.body).order_by(config_t.c.id.desc()).limit(1)
    ).first()
    if row is None:
        raise BadRequest("the ledger has no genesis entry yet")
    body: dict[str, Any] = json.loads(row.body)
    return str(row.envelope_id), body


def config_version_query() -> Any:
    """The envelope that set the configuration in force, as a scalar subquery."""
    return select(config_t.c.envelope_id).order_by(config_t.c.id.desc()).limit(1).scalar_subquery()


def store_config(session: Session, envelope_id: str, body: dict[str, Any]) -> None:
    session.execute(
        insert(config_t).values(envelope_id=envelope_id, body=json.dumps(body, sort_keys=True))
    )
