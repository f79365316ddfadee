"""Members' commands, and the operator's admissions and deposits.

``ubc keys new --handle alice --server URL`` writes the member's key and a ``config.json``
into the config directory (``$UBC_CONFIG_DIR``, else the user's config dir for ``ubc``);
after that a member types no key paths:

    ubc member register          ubc apikey create          ubc send bob 30
    ubc balance                  ubc history                ubc apikey list

API keys are kept by label: each secret in ``api_keys/<label>`` (mode 0600) in the config
dir; a second ``ubc apikey create`` with the same label is refused unless ``--replace``
(which revokes the old key once the new one is granted). Reads use ``$UBC_TOKEN``, else
your latest API key with the read scope, else (said on stderr) the operator's token.

The operator signs with the key at ``--operator-key``, else config ``operator_key``, else
``$UBC_DATA_DIR/operator.key`` (``./ubc-data/operator.key``):

    ubc member admit alice --tier basic        ubc deposit alice 100 --ref wire-2026-001

Amounts are positive integers in the asset's smallest unit (USD: cents). Errors print
one red line and exit with status 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from nacl.signing import SigningKey
from rich.console import Console
from rich.markup import escape

from ubc.cli._errors import CliError as CliError
from ubc.cli._errors import explain
from ubc.cli._output import (
    Column,
    JsonFlag,
    amount,
    emit_json,
    show_table,
    signed_amount,
)
from ubc.client import (
    Account,
    ApiKeyInfo,
    HistoryItem,
    Receipt,
    UbcApiError,
    UbcClient,
    to_address,
)
from ubc.envelopes.payloads import HANDLE_PATTERN, format_timestamp
from ubc.signing import (
    encode_public_key,
    generate_signing_key,
    key_id,
    load_signing_key,
    write_signing_key,
)

DEFAULT_SERVER = "http://127.0.0.1:8000"
CONFIG_FILE = "config.json"
KEY_FILE = "member.key"
API_KEYS_DIR = "api_keys"
LABEL_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_DURATION = re.compile(r"^(\d+)([smhd])$")
# Commands whose AMOUNT may be typed negative: click would take ``-5`` for an option.
AMOUNT_SETTINGS: dict[str, Any] = {"ignore_unknown_options": True}

Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        help=f"the ledger's URL (default: from config, else $UBC_SERVER, else {DEFAULT_SERVER})",
        show_default=False,
    ),
]
OperatorKey = Annotated[
    Path | None,
    typer.Option(
        "--operator-key",
        help="the operator's key file (default: config operator_key, else "
        "$UBC_DATA_DIR/operator.key)",
        show_default=False,
    ),
]
Asset = Annotated[str, typer.Option("--asset", help="asset code")]
AMOUNT_HELP = "a positive integer, in the asset's smallest unit (USD: cents)"
# Text, so that ``-5`` reaches :func:`positive_amount` (see AMOUNT_SETTINGS).
AmountText = Annotated[str, typer.Argument(metavar="AMOUNT", help=AMOUNT_HELP)]


def register(app: typer.Typer) -> None:
    keys = typer.Typer(help="Your member signing key.", no_args_is_help=True)
    keys.command("new")(keys_new)
    app.add_typer(keys, name="keys")
    member = typer.Typer(help="Membership: register, and admit (operator).", no_args_is_help=True)
    member.command("register")(member_register)
    member.command("admit")(member_admit)
    app.add_typer(member, name="member")
    apikey = typer.Typer(help="API keys of your account.", no_args_is_help=True)
    apikey.command("create")(apikey_create)
    apikey.command("list")(apikey_list)
    apikey.command("revoke")(apikey_revoke)
    app.add_typer(apikey, name="apikey")
    app.command("balance")(balance)
    app.command("history")(history)
    app.command("send", context_settings=AMOUNT_SETTINGS)(send)
    app.command("deposit", context_settings=AMOUNT_SETTINGS)(deposit)


# --- commands -----------------------------------------------------------------------------


def keys_new(
    handle: Annotated[
        str | None, typer.Option("--handle", help="the member handle you will register")
    ] = None,
    server: Server = None,
) -> None:
    """Create your member signing key (mode 0600) and save your settings."""
    with _reported():
        config = CliConfig.load()
        if handle is not None and not re.fullmatch(HANDLE_PATTERN, handle):
            raise CliError(f"handle {handle!r} must be 3 to 32 of a-z, 0-9, _ and -")
        path = config.key_path() or config.directory / KEY_FILE
        if path.exists():
            raise CliError(f"a member key already exists at {path}; keys are never overwritten")
        config.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = generate_signing_key()
        write_signing_key(path, key)
        config.key = config.store(path)
        config.handle = handle or config.handle
        config.server = server or config.server
        config.save()
        public = bytes(key.verify_key)
        _say(f"Created your member key {path} (key id {key_id(public)}).")
        _say(f"Public key: {encode_public_key(public)}")
        _say(f"Saved settings to {config.file}.")
        if config.handle:
            _say(f"Next: ubc member register  (registers member:{config.handle})")
        else:
            _say("Next: ubc member register --handle <handle>")


def member_register(
    display_name: Annotated[
        str | None, typer.Option("--display-name", help="the name others see")
    ] = None,
    handle: Annotated[
        str | None, typer.Option("--handle", help="(default: the handle in your config)")
    ] = None,
    server: Server = None,
) -> None:
    """Register your key as a member of the ledger."""
    with _reported():
        config = CliConfig.load()
        handle = handle or config.handle
        if not handle:
            raise CliError("no handle: pass --handle or run `ubc keys new --handle <handle>`")
        with _client(config, server, key=config.member_key()) as client:
            receipt = client.register(handle, display_name)
            enrollment = client.ledger_info()["enrollment"]
        config.handle = handle
        config.save()
        _say(f"Registered member:{handle} (journal entry {receipt['seq']}).")
        if enrollment == "invite":
            _say(
                "An operator must admit you before you can send: "
                f"ubc member admit {handle} --tier <tier>"
            )


def member_admit(
    handle: Annotated[str, typer.Argument(help="the registered member's handle")],
    tier: Annotated[str, typer.Option("--tier", help="the allocation tier")],
    new_tier: Annotated[
        bool,
        typer.Option(
            "--new-tier",
            help="the tier is new: no epoch has allocated to it yet (else you are asked, "
            "once epochs exist)",
        ),
    ] = False,
    operator_key: OperatorKey = None,
    server: Server = None,
) -> None:
    """Admit a registered member into a tier (operator)."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server, key=_operator_key(config, operator_key)) as client:
            note = None if new_tier else _check_tier(client, tier)
            receipt = client.admit(handle, tier)
        _say(f"Admitted member:{handle} into tier {tier} (journal entry {receipt['seq']}).")
        if note:
            _note(note)


def apikey_create(
    label: Annotated[
        str, typer.Option("--label", help="a name for the key (letters, digits, . _ -)")
    ] = "cli",
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", help="models or read (repeat; default: both)", show_default=False),
    ] = None,
    scopes: Annotated[
        str | None,
        typer.Option("--scopes", help="the same, comma-separated: models,read", hidden=True),
    ] = None,
    spend_cap: Annotated[
        int | None,
        typer.Option(
            "--spend-cap", min=1, help="CU this key may spend per epoch", show_default=False
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="a model the key may use (repeat; default: all)"),
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option(
            "--expires", help="a duration (30m, 2h, 90d) or an RFC 3339 time", show_default=False
        ),
    ] = None,
    rpm: Annotated[
        int | None, typer.Option("--rpm", min=1, help="requests per minute", show_default=False)
    ] = None,
    tpm: Annotated[
        int | None, typer.Option("--tpm", min=1, help="tokens per minute", show_default=False)
    ] = None,
    account: Annotated[
        str | None,
        typer.Option(
            "--account",
            help="grant it on cause:SLUG, as one of its stewards (default: your account)",
            show_default=False,
        ),
    ] = None,
    replace: Annotated[
        bool,
        typer.Option("--replace", help="revoke your saved key with this label and make a new one"),
    ] = False,
    server: Server = None,
) -> None:
    """Grant an API key; its secret is shown once and saved by label (mode 0600)."""
    with _reported():
        config = CliConfig.load()
        handle = config.member_handle()
        if not re.fullmatch(LABEL_PATTERN, label):
            raise CliError(f"--label {label!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
        wanted = list(scope or [])
        if scopes:
            wanted += [s.strip() for s in scopes.split(",") if s.strip()]
        wanted = sorted(set(wanted)) or ["models", "read"]
        unknown = [s for s in wanted if s not in ("models", "read")]
        if unknown:
            raise CliError(f"unknown scope {unknown[0]!r}: use models or read")
        target = to_address(account) if account else f"member:{handle}"
        old = config.api_keys.get(label)
        if old is not None and not replace:
            raise CliError(
                f"you already have an API key labelled {label!r} (on {old['account']}, saved "
                f"in {config.path(old['file'])}): pass --replace to revoke it and make a new "
                "one, or --label NAME for another key"
            )
        expires_at = _expiry(expires) if expires else None
        with _client(config, server, key=config.member_key(), handle=handle) as client:
            secret, receipt = client.grant_api_key(
                label,
                scopes=wanted,
                account=target,
                spend_cap_per_epoch=spend_cap,
                models=model or None,
                expires_at=expires_at,
                rpm=rpm,
                tpm=tpm,
            )
            if old is not None:
                client.revoke_api_key(old["hash"], account=old["account"])
        path = config.directory / API_KEYS_DIR / label
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(path, secret + "\n")
        config.api_keys[label] = {
            "account": target,
            "file": config.store(path),
            "hash": _hash(secret),
            "scopes": ",".join(wanted),
        }
        if "read" in wanted and target == f"member:{handle}":
            config.api_key = config.store(path)
        config.save()
        if old is not None:
            _say(f"Revoked the old key {label!r} ({old['hash'][:12]}).")
        _say(
            f"Created API key {label!r} ({', '.join(wanted)}) on {target} "
            f"(journal entry {receipt['seq']}); saved to {path}."
        )
        _say("Secret (shown once):")
        typer.echo(secret)


def apikey_list(
    account: Annotated[
        str | None,
        typer.Option("--account", help="cause:SLUG (default: your account)", show_default=False),
    ] = None,
    as_json: JsonFlag = False,
    server: Server = None,
) -> None:
    """List the API keys of your account (from the ledger) with what each spent."""
    with _reported():
        config = CliConfig.load()
        target = to_address(account) if account else f"member:{config.member_handle()}"
        with _client(config, server, token=_read_token(config, target)) as client:
            try:
                found = client.api_keys(target)
            except UbcApiError as exc:
                if exc.status != 404 or exc.type != "http_error":
                    raise
                found = None  # a server without the listing: what is saved here
        saved = {v["hash"]: k for k, v in config.api_keys.items() if v["account"] == target}
        if found is None:
            if as_json:
                emit_json({"address": target, "apikeys": None, "saved": config.api_keys})
                return
            _say("(this server does not list API keys: showing the keys saved here)")
            rows: list[list[str] | None] = [
                [escape(label), h[:12], "", "", "", "", "yes"] for h, label in saved.items()
            ]
        else:
            if as_json:
                emit_json({"address": target, "apikeys": found})
                return
            rows = [_key_row(k, saved) for k in found]
        if not rows:
            _say(f"No API keys on {target}: ubc apikey create")
            return
        show_table(
            f"API keys of {escape(target)}",
            [
                Column("label", wrap=True),
                Column("key"),
                Column("scopes"),
                Column("limits", wrap=True),
                Column("status"),
                Column("spent", "right"),
                Column("saved here"),
            ],
            rows,
            caption="spent: in all (in the latest epoch); key: the start of its SHA-256",
        )


def apikey_revoke(
    key: Annotated[str, typer.Argument(help="the key's label (saved here) or its hash")],
    account: Annotated[
        str | None,
        typer.Option("--account", help="cause:SLUG (default: your account)", show_default=False),
    ] = None,
    server: Server = None,
) -> None:
    """Revoke an API key: it stops working at once."""
    with _reported():
        config = CliConfig.load()
        handle = config.member_handle()
        label, key_hash, target = _resolve_key(config, key, account, handle, server)
        with _client(config, server, key=config.member_key(), handle=handle) as client:
            receipt = client.revoke_api_key(key_hash, account=target)
        if label is not None:
            saved = config.api_keys.pop(label)
            path = config.path(saved["file"])
            if path is not None:
                path.unlink(missing_ok=True)
            if config.api_key == saved["file"]:
                config.api_key = _latest_read_key(config, f"member:{handle}")
            config.save()
        name = f"{label!r} " if label else ""
        _say(f"Revoked API key {name}({key_hash[:12]}) on {target} ({_entry(receipt)}).")


def balance(
    address: Annotated[
        str | None, typer.Argument(help="handle or address (default: your account)")
    ] = None,
    as_json: JsonFlag = False,
    server: Server = None,
) -> None:
    """Show an account's balances."""
    with _reported():
        config = CliConfig.load()
        target = to_address(address) if address else f"member:{config.member_handle()}"
        with _client(config, server, token=_read_token(config, target)) as client:
            account = client.balance(target)
        if as_json:
            emit_json(account)
            return
        _say(_describe_balances(account))


def history(
    address: Annotated[
        str | None, typer.Argument(help="handle or address (default: your account)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="postings")] = 20,
    as_json: JsonFlag = False,
    server: Server = None,
) -> None:
    """Show an account's latest postings, newest first."""
    with _reported():
        config = CliConfig.load()
        target = to_address(address) if address else f"member:{config.member_handle()}"
        with _client(config, server, token=_read_token(config, target)) as client:
            page = client.history(target, limit=limit)
        if as_json:
            emit_json(page)
            return
        if not page["items"]:
            _say(f"No postings yet on {target}.")
            return
        show_table(
            f"History of {escape(target)}",
            [
                Column("when"),
                Column("kind"),
                Column("amount", "right"),
                Column("counterparty"),
                Column("balance", "right"),
                Column("memo", wrap=True),
            ],
            [_history_row(item) for item in page["items"]],
        )
        if page["next_cursor"] is not None:
            _say(f"(showing the latest {limit}; use --limit for more)")


def send(
    to: Annotated[str, typer.Argument(help="handle or address of the receiver")],
    amount_: AmountText,
    memo: Annotated[str | None, typer.Option("--memo", help="a note for the receiver")] = None,
    asset: Asset = "CU",
    server: Server = None,
) -> None:
    """Send compute (or another asset) to a member or a cause."""
    with _reported():
        value = positive_amount(amount_)
        config = CliConfig.load()
        with _client(config, server, key=config.member_key(), handle=config.member_handle()) as c:
            receipt = c.send(to, value, asset=asset, memo=memo)
        _say(f"Sent {amount(value, asset)} to {to_address(to)} ({_entry(receipt)}).")


def deposit(
    address: Annotated[str, typer.Argument(help="handle or address to credit")],
    amount_: AmountText,
    ref: Annotated[
        str,
        typer.Option(
            "--ref",
            help="external reference (payment id): the same --ref and amount again is "
            "answered 'already done'; another amount is refused",
        ),
    ],
    asset: Asset = "CU",
    operator_key: OperatorKey = None,
    server: Server = None,
) -> None:
    """Credit an account with value that came from outside the ledger (operator)."""
    with _reported():
        value = positive_amount(amount_)
        target = to_address(address)
        config = CliConfig.load()
        with _client(config, server, key=_operator_key(config, operator_key)) as client:
            try:
                receipt = client.deposit(target, value, asset, external_ref=ref)
            except UbcApiError as exc:
                if exc.status != 409 or "envelope_id" not in exc.detail:
                    raise
                _repeated_deposit(client, config, exc, target, value, asset, ref)
        _say(f"Deposited {amount(value, asset)} to {target} ({_entry(receipt)}).")


# --- settings -----------------------------------------------------------------------------


@dataclass
class CliConfig:
    """``config.json`` in the config directory; paths are absolute or relative to it."""

    directory: Path
    server: str | None = None
    handle: str | None = None
    key: str | None = None
    api_key: str | None = None
    operator_key: str | None = None
    operator_token: str | None = None
    # label → {"account", "file", "hash", "scopes"}
    api_keys: dict[str, dict[str, str]] = field(default_factory=dict)

    _TEXT = ("server", "handle", "key", "api_key", "operator_key", "operator_token")

    @classmethod
    def load(cls) -> CliConfig:
        directory = Path(os.environ.get("UBC_CONFIG_DIR") or typer.get_app_dir("ubc"))
        config = cls(directory)
        if not config.file.exists():
            return config
        try:
            data = json.loads(config.file.read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read {config.file}: {exc}") from None
        if not isinstance(data, dict):
            raise CliError(f"{config.file} must hold a JSON object")
        for name in cls._TEXT:
            value = data.get(name)
            if isinstance(value, str):
                setattr(config, name, value)
        keys = data.get("api_keys")
        if isinstance(keys, dict):
            config.api_keys = {
                label: {k: str(v) for k, v in entry.items()}
                for label, entry in keys.items()
                if isinstance(entry, dict) and {"account", "file", "hash"} <= entry.keys()
            }
        return config

    @property
    def file(self) -> Path:
        return self.directory / CONFIG_FILE

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        data: dict[str, Any] = {
            name: getattr(self, name) for name in self._TEXT if getattr(self, name) is not None
        }
        if self.api_keys:
            data["api_keys"] = self.api_keys
        _write_private(self.file, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def store(self, path: Path) -> str:
        """How ``path`` is written in the config: relative to the config dir when it is
        inside it (the directory may move), else absolute."""
        absolute = path.absolute()
        try:
            return str(absolute.relative_to(self.directory.absolute()))
        except ValueError:
            return str(absolute)

    def path(self, value: str | None) -> Path | None:
        if not value:
            return None
        path = Path(value).expanduser()
        if path.is_absolute():
            return path
        inside = self.directory / path
        # Configs written before 0.1 stored paths relative to the working directory.
        if not inside.exists() and path.exists():
            return path
        return inside

    def key_path(self) -> Path | None:
        return self.path(self.key)

    def member_key(self) -> SigningKey:
        path = self.key_path()
        if path is None or not path.exists():
            raise CliError(
                f"no member key in {self.directory}: run `ubc keys new --handle <handle>` "
                "first (UBC_CONFIG_DIR picks another member's directory)"
            )
        return _load_key(path)

    def member_handle(self) -> str:
        if not self.handle:
            raise CliError(
                f"no member handle in {self.directory}: run `ubc keys new --handle <handle>` "
                "(UBC_CONFIG_DIR picks another member's directory)"
            )
        return self.handle


def _server(config: CliConfig, option: str | None) -> str:
    return option or config.server or os.environ.get("UBC_SERVER") or DEFAULT_SERVER


#: The journal size each server's latest write answered, per config dir (read-your-writes
#: from one command to the next where the server reads from a replica).
JOURNAL_SIZES_FILE = "journal-sizes.json"


def _journal_sizes(config: CliConfig) -> dict[str, int]:
    """The sizes remembered in ``config``'s directory; an unreadable file is no error (it
    only makes the next read possibly stale, as without it)."""
    try:
        data = json.loads((config.directory / JOURNAL_SIZES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        url: size
        for url, size in data.items()
        if isinstance(url, str) and type(size) is int and size >= 0
    }


def _remember_journal_size(config: CliConfig, url: str, size: int) -> None:
    """Keep the largest size seen for ``url`` (another command may have written meanwhile);
    a config dir that cannot be written is no error for the command that wrote."""
    sizes = _journal_sizes(config)
    if sizes.get(url, -1) >= size:
        return
    sizes[url] = size
    with contextlib.suppress(OSError):
        config.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = json.dumps(sizes, indent=2, sort_keys=True) + "\n"
        _write_private(config.directory / JOURNAL_SIZES_FILE, text)


@contextlib.contextmanager
def _client(
    config: CliConfig,
    server: str | None,
    *,
    key: SigningKey | None = None,
    handle: str | None = None,
    token: str | None = None,
) -> Iterator[UbcClient]:
    """A client for one command. Its reads ask for at least the journal size of the
    latest write any command of this config dir made on that server (kept in
    ``journal-sizes.json``), so ``ubc send`` then ``ubc balance`` shows the send even where
    reads go to a read replica that has not replayed it yet."""
    url = _server(config, server)
    remembered = _journal_sizes(config).get(url)
    with UbcClient(url, key=key, handle=handle, token=token) as client:
        client.journal_size = remembered
        try:
            yield client
        finally:
            if client.journal_size is not None and client.journal_size != remembered:
                _remember_journal_size(config, url, client.journal_size)


def _data_dir() -> Path:
    return Path(os.environ.get("UBC_DATA_DIR") or "ubc-data")


def _operator_key(config: CliConfig, option: Path | None) -> SigningKey:
    path = option or config.path(config.operator_key) or _data_dir() / "operator.key"
    if not path.exists():
        raise CliError(
            f"no operator key at {path}: pass --operator-key PATH or set operator_key "
            f"in {config.file}"
        )
    return _load_key(path)


def _read_token(config: CliConfig, address: str | None = None) -> str:
    """What to read with: $UBC_TOKEN, your API key, else the operator's token (said on
    stderr in a member's config dir: the reader is then the operator, not the member)."""
    token = os.environ.get("UBC_TOKEN")
    if token:
        return token
    own = config.path(config.api_key)
    if own is not None and own.exists():
        return _read_secret(own)
    if own is not None:
        raise CliError(f"your API key file {own} is gone: run `ubc apikey create --replace`")
    for path in (config.path(config.operator_token), _data_dir() / "operator.token"):
        if path is not None and path.exists():
            if config.handle:  # a member's terminal: say that the reader is not the member
                _note(
                    f"No API key of member:{config.handle} in {config.directory}: reading "
                    f"{address + ' ' if address else ''}as the operator (token {path}); "
                    "`ubc apikey create` makes yours."
                )
            return _read_secret(path)
    raise CliError(
        f"nothing to read with: no API key in {config.directory}; run `ubc apikey create` "
        "(an API key with the read scope), or set UBC_TOKEN"
    )


def _operator_token(config: CliConfig) -> str:
    token = os.environ.get("UBC_TOKEN")
    if token:
        return token
    for path in (config.path(config.operator_token), _data_dir() / "operator.token"):
        if path is not None and path.exists():
            return _read_secret(path)
    raise CliError(
        "no operator token: set UBC_TOKEN, operator_token in the config, or UBC_DATA_DIR"
    )


def _read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc}") from None


def _load_key(path: Path) -> SigningKey:
    try:
        return load_signing_key(path)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot load the key {path}: {exc}") from None


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, readable only by its owner, atomically."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# --- helpers of the commands --------------------------------------------------------------


def positive_amount(text: str) -> int:
    """An AMOUNT argument: a positive integer (typed as text so that ``-5`` is an amount,
    not an unknown option)."""
    try:
        value = int(text.replace("_", ""), 10)
    except ValueError:
        raise CliError(f"the amount must be a positive integer, not {text!r}") from None
    if value < 1:
        raise CliError(f"the amount must be a positive integer, not {value}")
    return value


def _check_tier(client: UbcClient, tier: str) -> str | None:
    """Once epochs have named tiers, another name is probably a typo: confirm it, or
    ``--new-tier``. Before the first epoch every tier is new: said, not refused."""
    epochs: list[dict[str, Any]] = client._get("/api/epochs")["epochs"]
    known = sorted({t for e in epochs for t in e.get("allocations", {})})
    if tier in known:
        return None
    if not epochs:
        return f"Tier {tier!r} is new: the first epoch's --allocation {tier}=AMOUNT funds it."
    listed = ", ".join(known) or "none"
    question = f"No epoch has allocated to tier {tier!r} (epochs named: {listed}). Use it?"
    if sys.stdin.isatty() and typer.confirm(question, default=False):
        return None
    raise CliError(
        f"no epoch has allocated to tier {tier!r} (epochs named: {listed}): check its "
        "spelling, or pass --new-tier to admit into a new tier"
    )


def _repeated_deposit(
    client: UbcClient,
    config: CliConfig,
    exc: UbcApiError,
    target: str,
    value: int,
    asset: str,
    ref: str,
) -> NoReturn:
    """The --ref was used before: the same deposit again is done (exit 0), another is a
    conflict (exit 1)."""
    envelope_id = str(exc.detail["envelope_id"])
    try:
        client.token = _operator_token(config)
        legs = client.transfer(envelope_id)["transfers"]
    except (CliError, UbcApiError):
        raise CliError(
            f"{exc.message}; set UBC_TOKEN to the operator token to compare it with this one"
        ) from None
    done = [
        (leg["credit"], leg["asset"], leg["amount"]) for leg in legs if leg["kind"] == "deposit"
    ]
    if done == [(target, asset, value)]:
        _say(
            f"Already done: deposit {ref!r} credited {amount(value, asset)} to {target} "
            f"(envelope {envelope_id}); nothing changed."
        )
        raise typer.Exit(code=0)
    what = (
        ", ".join(f"{amount(a, s)} to {c}" for c, s, a in done) or "something else (a withdrawal)"
    )
    raise CliError(
        f"conflict: --ref {ref} was already used for {what}, not {amount(value, asset)} to "
        f"{target}; nothing changed (use another --ref for another deposit)"
    )


def _resolve_key(
    config: CliConfig, key: str, account: str | None, handle: str, server: str | None
) -> tuple[str | None, str, str]:
    """(label saved here or None, hash, account) of the key named by label or hash."""
    if key in config.api_keys:
        saved = config.api_keys[key]
        return key, saved["hash"], saved["account"]
    target = to_address(account) if account else f"member:{handle}"
    if not re.fullmatch(r"[0-9a-f]{6,64}", key):
        raise CliError(
            f"no API key labelled {key!r} is saved in {config.directory}: give its hash "
            "(see `ubc apikey list`)"
        )
    local = [(label, v) for label, v in config.api_keys.items() if v["hash"].startswith(key)]
    if len(local) == 1:
        label, saved = local[0]
        return label, saved["hash"], saved["account"]
    if len(key) == 64:
        return None, key, target
    with _client(config, server, token=_read_token(config, target)) as client:
        matches = [k["key_hash"] for k in client.api_keys(target) if k["key_hash"].startswith(key)]
    if len(matches) != 1:
        raise CliError(
            f"{'no' if not matches else 'more than one'} API key on {target} starts with {key}"
        )
    return None, matches[0], target


def _latest_read_key(config: CliConfig, own: str) -> str | None:
    for saved in reversed(config.api_keys.values()):
        if saved["account"] == own and "read" in saved.get("scopes", "read").split(","):
            return saved["file"]
    return None


def _key_row(k: ApiKeyInfo, saved: dict[str, str]) -> list[str]:
    limits = []
    if k["spend_cap_per_epoch"] is not None:
        limits.append(f"cap {amount(k['spend_cap_per_epoch'], 'CU')}/epoch")
    if k["models"] is not None:
        limits.append("models " + ", ".join(k["models"]))
    if k["rpm"] is not None:
        limits.append(f"{k['rpm']} rpm")
    if k["tpm"] is not None:
        limits.append(f"{k['tpm']} tpm")
    if k["expires_at"] is not None:
        limits.append(f"until {_when(k['expires_at'])}")
    status = "active"
    if k["revoked"]:
        status = "revoked"
    elif k["expires_at"] is not None and datetime.fromisoformat(k["expires_at"]) <= datetime.now(
        UTC
    ):
        status = "expired"
    spent = amount(k["spent"], "CU")
    if k["epoch"] is not None:
        spent += f" ({k['spent_in_epoch']} in epoch {k['epoch']})"
    return [
        escape(k["label"]),
        k["key_hash"][:12],
        ",".join(k["scopes"]),
        escape("; ".join(limits) or "-"),
        status,
        spent,
        escape(saved.get(k["key_hash"], "-")),
    ]


def _history_row(item: HistoryItem) -> list[str]:
    asset = item["asset"]
    kind = item["kind"]
    if item["phase"] == "pending":
        kind += " (held)"
        change = f"{signed_amount(item['pending'], asset)} held"
    elif item["phase"] == "void":
        kind += " (released)"
        change = f"{amount(abs(item['pending']), asset)} released"
    else:
        change = signed_amount(item["amount"], asset)
    return [
        _when(item["created_at"], seconds=False),
        escape(kind),
        change,
        escape(item["counterparty"]),
        amount(item["balance_after"], asset),
        escape(item["memo"] or ""),
    ]


def _expiry(value: str) -> str:
    """``--expires``: a duration from now (30m, 2h, 7d) or an RFC 3339 time."""
    found = _DURATION.match(value)
    if found:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[found.group(2)]
        moment = datetime.now(UTC) + timedelta(**{unit: int(found.group(1))})
        return format_timestamp(moment)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"--expires {value!r}: give a duration (30m, 2h, 7d) or a time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return format_timestamp(moment)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# --- output -------------------------------------------------------------------------------


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    """Turn every expected failure into a red line on stderr and exit status 1."""
    try:
        yield
    except UbcApiError as exc:
        _fail(exc.message or f"the ledger answered {exc.status} {exc.type}")
    except CliError as exc:
        _fail(str(exc))
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        _fail(explain(exc) or f"cannot reach the ledger: {exc}")


def _fail(message: str) -> NoReturn:
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[red]Error: {escape(message)}[/red]"
    )
    raise typer.Exit(code=1)


def _say(text: str) -> None:
    Console(highlight=False, soft_wrap=True).print(escape(text))


def _note(text: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[yellow]{escape(text)}[/yellow]")


def _entry(receipt: Receipt) -> str:
    return f"journal entry {receipt['seq']}"


def _describe_balances(account: Account) -> str:
    parts: list[str] = []
    for b in account["balances"]:
        asset = b["asset"]
        text = amount(b["available"], asset)
        extra: dict[str, int] = {}
        if b["posted"] != b["available"]:
            extra["posted"] = b["posted"]
        if b["pending_debits"]:
            extra["held"] = b["pending_debits"]
        if b["pending_credits"]:
            extra["incoming"] = b["pending_credits"]
        if extra:
            text += " (" + ", ".join(f"{k} {amount(v, asset)}" for k, v in extra.items()) + ")"
        parts.append(text)
    return f"{account['address']} has {', '.join(parts) or 'no balances'} available."


def _when(created_at: str, *, seconds: bool = True) -> str:
    try:
        moment = datetime.fromisoformat(created_at).astimezone()
    except ValueError:
        return created_at
    return moment.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def saved_api_key() -> str | None:
    """The API key this config dir reads with (``ubc apikey create``), if there is one."""
    config = CliConfig.load()
    path = config.path(config.api_key)
    return _read_secret(path) if path is not None and path.exists() else None
