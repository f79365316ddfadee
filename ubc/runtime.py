"""What a running server knows: its keys, tokens and the ledger context from the journal."""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from ubc.config import Settings
from ubc.envelopes.payloads import LedgerGenesis
from ubc.envelopes.service import (
    LedgerContext,
    context_from_genesis,
    operator_keys_from,
    write_genesis,
)
from ubc.journal import store as journal
from ubc.migrations import current_revision, head_revision
from ubc.signing import encode_public_key, load_signing_key, vkey

log = logging.getLogger("ubc")


class SetupError(RuntimeError):
    """The server cannot start: missing keys, unreadable files."""


@dataclass(frozen=True, slots=True)
class Runtime:
    ctx: LedgerContext
    tokens: dict[str, str]
    info: dict[str, Any]


def load_runtime(settings: Settings, session: Session) -> Runtime:
    """Load keys, write the genesis entry on first start, and read the ledger's config back."""
    current, head = current_revision(session.get_bind()), head_revision()  # type: ignore[arg-type]
    if current != head:
        raise SetupError(
            f"the database is not migrated (revision {current}, latest {head}): "
            "run `ubc db upgrade` (`ubc serve` does it on start)"
        )
    data_dir = settings.data_dir
    ledger_path = data_dir / "ledger.key"
    if not ledger_path.exists():
        raise SetupError(f"no ledger key at {ledger_path}: run `ubc init` first")
    ledger_key = load_signing_key(ledger_path)
    operator_keys = list(settings.operator_public_keys)
    if not operator_keys:
        operator_path = data_dir / "operator.key"
        if not operator_path.exists():
            raise SetupError(
                f"no operator public key: set UBC_OPERATOR_PUBLIC_KEYS or put {operator_path}"
            )
        operator_keys = [encode_public_key(bytes(load_signing_key(operator_path).verify_key))]
    ctx = LedgerContext(
        origin=settings.origin,
        ledger_public_key=bytes(ledger_key.verify_key),
        ledger_key=ledger_key,
        operator_keys=operator_keys_from(operator_keys),
        enrollment=settings.enrollment,
        skew=timedelta(seconds=settings.created_at_skew_seconds),
        assets=("CU", "USD"),
    )
    write_genesis(session, ctx)
    genesis = genesis_payload(session)
    if genesis["ledger"] != settings.origin:
        raise SetupError(
            f"this database holds ledger {genesis['ledger']!r}, not {settings.origin!r}"
        )
    if genesis["ledger_public_key"] != encode_public_key(ctx.ledger_public_key):
        raise SetupError("the ledger key in the data dir is not the key of this journal")
    # The journal is the source of truth for the configuration.
    ctx = context_from_genesis(
        LedgerGenesis.model_validate(genesis), skew=ctx.skew, ledger_key=ledger_key
    )
    if settings.enrollment != ctx.enrollment:
        log.warning(
            "UBC_ENROLLMENT=%s ignored: the journal says %s", settings.enrollment, ctx.enrollment
        )
    tokens = {}
    for role in ("operator", "auditor"):
        path = data_dir / f"{role}.token"
        if path.exists():
            tokens[role] = path.read_text().strip()
    info = {
        "origin": ctx.origin,
        "vkey": vkey(ctx.origin, ctx.ledger_public_key),
        "ledger_public_key": encode_public_key(ctx.ledger_public_key),
        "operator_public_keys": genesis["operator_public_keys"],
        "assets": genesis["assets"],
        "enrollment": ctx.enrollment,
        "market_fee_bps": genesis["market_fee_bps"],
        "cu_price_usd": genesis["cu_price_usd"],
        "current_epoch": None,
    }
    return Runtime(ctx, tokens, info)


def genesis_payload(session: Session) -> dict[str, Any]:
    entry = journal.entry_bytes(session, 0)
    if entry is None:
        raise SetupError("the journal has no genesis entry")
    envelope = json.loads(entry)["envelope"]
    payload: dict[str, Any] = json.loads(base64.b64decode(envelope["payload"]))
    return payload
