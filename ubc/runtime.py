"""What a running server knows: its keys, tokens and the ledger context from the journal."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.orm import Session

from ubc.clock import SYSTEM_CLOCK
from ubc.config import Settings
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
from ubc.ledger.config import current_config
from ubc.migrations import current_revision, head_revision
from ubc.rules import new_id
from ubc.signing import NoteError, encode_public_key, key_hash, load_signing_key, vkey

log = logging.getLogger("ubc")


class SetupError(RuntimeError):
    """The server cannot start: missing keys, unreadable files."""


# --- the ledger origin ---------------------------------------------------------------------
#
# The origin names one ledger: it is every payload's `ledger` field and the checkpoint's
# key name, so an envelope signed for one ledger is refused by every other one. Two
# installations sharing an origin would accept each other's envelopes, hence one chosen
# at random by `ubc init` and kept in the data dir (docs/origin.md).

DEFAULT_ORIGIN: str = Settings.model_fields["origin"].default  # localhost/ubc
ORIGIN_FILE = "origin"
OriginSource = Literal["UBC_ORIGIN", "origin file", "default"]


@dataclass(frozen=True, slots=True)
class OriginChoice:
    origin: str
    source: OriginSource
    # Where it came from, for messages: the variable, the file's path, or "default".
    where: str

    @property
    def is_bare_default(self) -> bool:
        """Nobody chose it: neither UBC_ORIGIN nor the data dir's origin file is set."""
        return self.source == "default"


def find_origin(settings: Settings) -> OriginChoice:
    """The ledger origin and where it comes from, in order: ``UBC_ORIGIN`` when set
    explicitly, else ``DATA_DIR/origin`` (written by ``ubc init``), else the bare default.

    Raises :class:`SetupError` when the origin file cannot be read or names no valid origin.
    """
    if "origin" in settings.model_fields_set:
        return OriginChoice(check_origin(settings.origin, "UBC_ORIGIN"), "UBC_ORIGIN", "UBC_ORIGIN")
    recorded = read_origin(settings.data_dir)
    if recorded is None:
        return OriginChoice(DEFAULT_ORIGIN, "default", "default")
    return OriginChoice(recorded, "origin file", str(settings.data_dir / ORIGIN_FILE))


def read_origin(data_dir: Path) -> str | None:
    """The origin in ``DATA_DIR/origin``, or None when there is no such file.

    Raises :class:`SetupError` when it cannot be read or names no valid origin.
    """
    path = data_dir / ORIGIN_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise SetupError(f"cannot read the ledger origin in {path}: {exc}") from None
    return check_origin(text.strip(), str(path))


def resolve_origin(settings: Settings) -> str:
    """The ledger origin this installation serves and signs for (see :func:`find_origin`)."""
    return find_origin(settings).origin


def check_origin(origin: str, where: str = "the origin") -> str:
    """Return ``origin`` if it is a valid signed-note key name (printable, no spaces, no
    ``+``), else raise :class:`SetupError` naming ``where``."""
    try:
        key_hash(origin, bytes(32))  # validates the key name
    except NoteError:
        ok = False
    else:
        ok = origin.isprintable() and len(origin) <= 255
    if not ok:
        raise SetupError(
            f"{where}: {origin!r} is not a valid ledger origin "
            "(printable, without spaces or '+', e.g. ubc.example.org/ledger)"
        )
    return origin


def new_origin() -> str:
    """A fresh origin unique to this installation: ``<hostname>/ubc-<16 random hex>``."""
    host = re.sub(r"[^a-z0-9.-]+", "-", socket.gethostname().lower()).strip("-.") or "ubc"
    return f"{host[:63]}/ubc-{secrets.token_hex(8)}"


def write_origin(data_dir: Path, origin: str) -> Path:
    """Write ``origin`` to a new ``DATA_DIR/origin`` (mode 0600 like the keys); raises
    ``FileExistsError`` if one is there: an origin never changes once chosen."""
    check_origin(origin)
    path = data_dir / ORIGIN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (origin + "\n").encode("utf-8"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)  # no empty origin file left behind
        raise
    os.close(fd)
    return path


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (``localhost``, 127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


@dataclass(frozen=True, slots=True)
class Runtime:
    ctx: LedgerContext
    tokens: dict[str, str]
    info: dict[str, Any]
    catalog: dict[str, ModelSpec]
    # The prices in force, from the journal (what every usage entry is checked against).
    prices: dict[str, dict[str, int]]


def load_runtime(settings: Settings, session: Session, *, now: datetime | None = None) -> Runtime:
    """Load keys, write the genesis entry on first start, and read the ledger's config back.

    ``now`` is the ledger's time of this start (default: the wall clock): the moment of
    the genesis entry, or of a ``ledger.config`` publishing new prices.
    """
    now = now or SYSTEM_CLOCK.now()
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
    origin = find_origin(settings)
    operator_keys = list(settings.operator_public_keys)
    if not operator_keys:
        operator_path = data_dir / "operator.key"
        if not operator_path.exists():
            raise SetupError(
                f"no operator public key: set UBC_OPERATOR_PUBLIC_KEYS or put {operator_path}"
            )
        operator_keys = [encode_public_key(bytes(load_signing_key(operator_path).verify_key))]
    ctx = LedgerContext(
        origin=origin.origin,
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
    write_genesis(
        session,
        ctx,
        now=now,
        models=prices(catalog),
        market_fee_bps=settings.market_fee_bps or 0,
    )
    check_genesis_origin(session, origin)
    genesis = genesis_payload(session)
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
    config = _publish_config(session, ctx, catalog, settings.market_fee_bps, data_dir, now=now)
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
    *,
    now: datetime,
) -> dict[str, Any]:
    """Journal a ``ledger.config`` when the models file's prices or the market fee differ
    from those in force.

    A config change needs the operator's signature too: without the operator key in the
    data dir the journaled configuration stays, and models without a price are not served.
    """
    config = current_config(session)
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
            "id": new_id(),
            "created_at": format_timestamp(now),
            "actor": "ledger",
            "models": wanted,
            "market_fee_bps": market_fee_bps,
        }
    )
    payload = LedgerConfig.model_validate(body)
    assert ctx.ledger_key is not None
    envelope = sign_payload(payload, "ledger.config", [ctx.ledger_key, operator_key])
    outcome = submit(session, ctx, [envelope.to_json()], now=now, internal=True)[0]
    if isinstance(outcome, UbcError):
        raise SetupError(f"publishing the configuration failed: {outcome.message}")
    log.info("published prices and market fee as journal entry %d", outcome.receipt.seq)
    return current_config(session)


def check_genesis_origin(session: Session, origin: OriginChoice) -> None:
    """Raise :class:`SetupError` when the journal's genesis names another origin than
    ``origin``: the origin is in every signature, a ledger keeps the one of its genesis.
    (A journal without a genesis yet takes ``origin``.)"""
    if journal.entry_bytes(session, 0) is None:
        return
    ledger = genesis_payload(session)["ledger"]
    if ledger != origin.origin:
        raise SetupError(
            f"this database holds ledger {ledger!r}, not {origin.origin!r} "
            f"(from {origin.where}): set UBC_ORIGIN={ledger} to serve it"
        )


def genesis_payload(session: Session) -> dict[str, Any]:
    entry = journal.entry_bytes(session, 0)
    if entry is None:
        raise SetupError("the journal has no genesis entry")
    envelope = json.loads(entry)["envelope"]
    payload: dict[str, Any] = json.loads(base64.b64decode(envelope["payload"]))
    return payload
