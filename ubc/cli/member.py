"""Members' commands, and the operator's admissions and deposits.

``ubc keys new --handle alice --server URL`` writes the member's key and a ``config.json``
into the config directory (``$UBC_CONFIG_DIR``, else the user's config dir for ``ubc``);
after that a member types no key paths:

    ubc member register          ubc apikey create          ubc send bob 30
    ubc balance                  ubc history

The operator signs with the key at ``--operator-key``, else config ``operator_key``, else
``$UBC_DATA_DIR/operator.key`` (``./ubc-data/operator.key``):

    ubc member admit alice --tier basic        ubc deposit alice 100 --ref wire-2026-001

Amounts are integers in the asset's smallest unit. Errors print the ledger's message and
exit with status 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from nacl.signing import SigningKey
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ubc.client import Account, Receipt, UbcApiError, UbcClient, to_address
from ubc.envelopes.payloads import HANDLE_PATTERN
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
API_KEY_FILE = "api_key"

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
    app.add_typer(apikey, name="apikey")
    app.command("balance")(balance)
    app.command("history")(history)
    app.command("send")(send)
    app.command("deposit")(deposit)


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
        key = generate_signing_key()
        write_signing_key(path, key)
        config.key = str(path)
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
    operator_key: OperatorKey = None,
    server: Server = None,
) -> None:
    """Admit a registered member into a tier (operator)."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server, key=_operator_key(config, operator_key)) as client:
            receipt = client.admit(handle, tier)
        _say(f"Admitted member:{handle} into tier {tier} (journal entry {receipt['seq']}).")


def apikey_create(
    label: Annotated[str, typer.Option("--label", help="a name for the key")] = "cli",
    scopes: Annotated[
        str, typer.Option("--scopes", help="comma-separated: models, read")
    ] = "models,read",
    server: Server = None,
) -> None:
    """Grant an API key on your account; its secret is shown once and saved (mode 0600)."""
    with _reported():
        config = CliConfig.load()
        wanted = [s.strip() for s in scopes.split(",") if s.strip()]
        with _client(config, server, key=config.member_key(), handle=config.member_handle()) as c:
            secret, receipt = c.grant_api_key(label, scopes=wanted)
        path = config.directory / API_KEY_FILE
        _write_private(path, secret + "\n")
        config.api_key = str(path)
        config.save()
        _say(
            f"Created API key {label!r} ({', '.join(wanted)}) for member:{config.handle} "
            f"(journal entry {receipt['seq']}); saved to {path}."
        )
        _say("Secret (shown once):")
        typer.echo(secret)


def balance(
    address: Annotated[
        str | None, typer.Argument(help="handle or address (default: your account)")
    ] = None,
    server: Server = None,
) -> None:
    """Show an account's balances."""
    with _reported():
        config = CliConfig.load()
        target = to_address(address) if address else f"member:{config.member_handle()}"
        with _client(config, server, token=_read_token(config)) as client:
            account = client.balance(target)
        _say(_describe_balances(account))


def history(
    address: Annotated[
        str | None, typer.Argument(help="handle or address (default: your account)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="postings")] = 20,
    server: Server = None,
) -> None:
    """Show an account's latest postings, newest first."""
    with _reported():
        config = CliConfig.load()
        target = to_address(address) if address else f"member:{config.member_handle()}"
        with _client(config, server, token=_read_token(config)) as client:
            page = client.history(target, limit=limit)
        if not page["items"]:
            _say(f"No postings yet on {target}.")
            return
        table = Table(title=f"History of {escape(target)}")
        table.add_column("when", no_wrap=True)
        table.add_column("kind", no_wrap=True)
        table.add_column("amount", justify="right", no_wrap=True)
        table.add_column("counterparty", no_wrap=True)
        table.add_column("balance", justify="right", no_wrap=True)
        table.add_column("memo", overflow="fold")
        for item in page["items"]:
            table.add_row(
                _when(item["created_at"]),
                item["kind"] + ("" if item["phase"] == "posted" else f" ({item['phase']})"),
                f"{item['amount']:+d} {item['asset']}",
                escape(item["counterparty"]),
                f"{item['balance_after']} {item['asset']}",
                escape(item["memo"] or ""),
            )
        Console(highlight=False).print(table)
        if page["next_cursor"] is not None:
            _say(f"(showing the latest {limit}; use --limit for more)")


def send(
    to: Annotated[str, typer.Argument(help="handle or address of the receiver")],
    amount: Annotated[int, typer.Argument(help="amount, in the asset's smallest unit")],
    memo: Annotated[str | None, typer.Option("--memo", help="a note for the receiver")] = None,
    asset: Asset = "CU",
    server: Server = None,
) -> None:
    """Send compute (or another asset) to a member or a cause."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server, key=config.member_key(), handle=config.member_handle()) as c:
            receipt = c.send(to, amount, asset=asset, memo=memo)
        _say(f"Sent {amount} {asset} to {to_address(to)} ({_entry(receipt)}).")


def deposit(
    address: Annotated[str, typer.Argument(help="handle or address to credit")],
    amount: Annotated[int, typer.Argument(help="amount, in the asset's smallest unit")],
    ref: Annotated[
        str,
        typer.Option(
            "--ref", help="external reference (payment id); deposits are idempotent on it"
        ),
    ],
    asset: Asset = "CU",
    operator_key: OperatorKey = None,
    server: Server = None,
) -> None:
    """Credit an account with value that came from outside the ledger (operator)."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server, key=_operator_key(config, operator_key)) as client:
            receipt = client.deposit(address, amount, asset, external_ref=ref)
        _say(f"Deposited {amount} {asset} to {to_address(address)} ({_entry(receipt)}).")


# --- settings -----------------------------------------------------------------------------


class CliError(Exception):
    """A problem on this side (missing key, no handle); printed in red, exit status 1."""


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
        for field in fields(cls):
            value = data.get(field.name)
            if field.name != "directory" and isinstance(value, str):
                setattr(config, field.name, value)
        return config

    @property
    def file(self) -> Path:
        return self.directory / CONFIG_FILE

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {k: v for k, v in asdict(self).items() if k != "directory" and v is not None}
        _write_private(self.file, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def path(self, value: str | None) -> Path | None:
        if not value:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.directory / path

    def key_path(self) -> Path | None:
        return self.path(self.key)

    def member_key(self) -> SigningKey:
        path = self.key_path()
        if path is None or not path.exists():
            raise CliError("no member key yet: run `ubc keys new --handle <handle>` first")
        return _load_key(path)

    def member_handle(self) -> str:
        if not self.handle:
            raise CliError(f"no handle in {self.file}: run `ubc member register --handle <handle>`")
        return self.handle


def _server(config: CliConfig, option: str | None) -> str:
    return option or config.server or os.environ.get("UBC_SERVER") or DEFAULT_SERVER


def _client(
    config: CliConfig,
    server: str | None,
    *,
    key: SigningKey | None = None,
    handle: str | None = None,
    token: str | None = None,
) -> UbcClient:
    return UbcClient(_server(config, server), key=key, handle=handle, token=token)


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


def _read_token(config: CliConfig) -> str:
    """What to read with: $UBC_TOKEN, your API key, else the operator's token."""
    token = os.environ.get("UBC_TOKEN")
    if token:
        return token
    candidates = [config.path(config.api_key), config.path(config.operator_token)]
    candidates.append(_data_dir() / "operator.token")
    for path in candidates:
        if path is not None and path.exists():
            try:
                return path.read_text().strip()
            except OSError as exc:
                raise CliError(f"cannot read {path}: {exc}") from None
    raise CliError("nothing to read with: run `ubc apikey create` (an API key with read scope)")


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
        _fail(f"cannot reach the ledger: {exc}")


def _fail(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[red]Error: {escape(message)}[/red]"
    )
    raise typer.Exit(code=1)


def _say(text: str) -> None:
    Console(highlight=False, soft_wrap=True).print(escape(text))


def _entry(receipt: Receipt) -> str:
    return f"journal entry {receipt['seq']}"


def _describe_balances(account: Account) -> str:
    parts: list[str] = []
    for b in account["balances"]:
        text = f"{b['available']} {b['asset']}"
        extra: dict[str, Any] = {}
        if b["posted"] != b["available"]:
            extra["posted"] = b["posted"]
        if b["pending_debits"]:
            extra["held"] = b["pending_debits"]
        if b["pending_credits"]:
            extra["incoming"] = b["pending_credits"]
        if extra:
            text += " (" + ", ".join(f"{k} {v}" for k, v in extra.items()) + ")"
        parts.append(text)
    return f"{account['address']} has {', '.join(parts) or 'no balances'} available."


def _when(created_at: str) -> str:
    try:
        return datetime.fromisoformat(created_at).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return created_at
