"""What a running server knows: its keys, tokens and the ledger context from the journal."""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from ubc.config import Settings
from ubc.dbtypes import utcnow
from ubc.envelopes import rules
from ubc.envelopes.payloads import LedgerConfig, LedgerGenesis, format_timestamp
from ubc.envelopes.service import (
    LedgerContext,
    context_from_genesis,
    operator_keys_from,
    sign_payload,
    submit,
    write_genesis,
)
from ubc.errors import UbcError
from ubc.gateway.catalog import ModelsFileError, ModelSpec, load_catalog, prices
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
    catalog: dict[str, ModelSpec]
    # The prices in force, from the journal (what every usage entry is checked against).
    prices: dict[str, dict[str, int]]


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
    try:
        catalog = load_catalog(settings.models_file)
    except ModelsFileError as exc:
        raise SetupError(str(exc)) from None
    write_genesis(session, ctx, models=prices(catalog), market_fee_bps=settings.market_fee_bps or 0)
    genesis = genesis_payload(session)
    if genesis["ledger"] != settings.origin:
        raise SetupError(
            f"this database holds ledger {genesis['ledger']!r}, not {settings.origin!r}"
        )
    if genesis["ledger_public_key"] != encode_public_key(ctx.ledger_public_key):
        raise SetupError("the ledger key in the data dir is not the key of this journal")
    # The journal is the source of truth for the configuration.
    ctx = context_from_genesis(
        LedgerGenesis.model_validate(genesis),
        skew=ctx.skew,
        ledger_key=ledger_key,
        withdrawal_window=timedelta(seconds=settings.withdrawal_approval_seconds),
    )
    if settings.enrollment != ctx.enrollment:
        log.warning(
            "UBC_ENROLLMENT=%s ignored: the journal says %s", settings.enrollment, ctx.enrollment
        )
    config = _publish_config(session, ctx, catalog, settings.market_fee_bps, data_dir)
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
        "market_fee_bps": config["market_fee_bps"],
        "cu_price_usd": config["cu_price_usd"],
        "models": config["models"],
        "current_epoch": None,
    }
    return Runtime(ctx, tokens, info, catalog, dict(config["models"]))


def _publish_config(
    session: Session,
    ctx: LedgerContext,
    catalog: dict[str, ModelSpec],
    market_fee_bps: int | None,
    data_dir: Path,
) -> dict[str, Any]:
    """Journal a ``ledger.config`` when the models file's prices or the market fee differ
    from those in force.

    A config change needs the operator's signature too: without the operator key in the
    data dir the journaled configuration stays, and models without a price are not served.
    """
    config = rules.current_config(session)
    wanted = prices(catalog)
    if market_fee_bps is None:
        market_fee_bps = int(config["market_fee_bps"])
    if config.get("models") == wanted and config.get("market_fee_bps") == market_fee_bps:
        return config
    operator_path = data_dir / "operator.key"
    if not operator_path.exists():
        log.warning(
            "the models file's prices or UBC_MARKET_FEE_BPS differ from the journal's; "
            "without %s they are not published (sign a ledger.config with the operator key)",
            operator_path,
        )
        return config
    operator_key = load_signing_key(operator_path)
    body = dict(config)
    body.update(
        {
            "id": rules.new_id(),
            "created_at": format_timestamp(utcnow()),
            "actor": "ledger",
            "models": wanted,
            "market_fee_bps": market_fee_bps,
        }
    )
    payload = LedgerConfig.model_validate(body)
    assert ctx.ledger_key is not None
    envelope = sign_payload(payload, "ledger.config", [ctx.ledger_key, operator_key])
    outcome = submit(session, ctx, [envelope.to_json()], internal=True)[0]
    if isinstance(outcome, UbcError):
        raise SetupError(f"publishing the configuration failed: {outcome.message}")
    log.info("published prices and market fee as journal entry %d", outcome.receipt.seq)
    return rules.current_config(session)


def genesis_payload(session: Session) -> dict[str, Any]:
    entry = journal.entry_bytes(session, 0)
    if entry is None:
        raise SetupError("the journal has no genesis entry")
    envelope = json.loads(entry)["envelope"]
    payload: dict[str, Any] = json.loads(base64.b64decode(envelope["payload"]))
    return payload
