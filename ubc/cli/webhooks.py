"""The operator's webhook endpoints: ``ubc webhooks ...`` (docs/events.md).

ubc webhooks add URL [--type T ...] [--secret S] [--from SEQ]
    register an endpoint; the signing secret is printed once
ubc webhooks list
ubc webhooks remove ID
ubc webhooks deliveries ID [--limit N]
    the delivery log, newest first
ubc webhooks replay ID [--from SEQ]
    deliver again from SEQ (default: where it stopped; resumes a failing endpoint)

Every command reads with the operator's token: ``--token``, else ``$UBC_TOKEN``, else
``$UBC_DATA_DIR/operator.token`` (``ubc-data/operator.token``).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any

import typer

from ubc.cli._output import JsonFlag, emit_json
from ubc.cli.member import CliConfig, CliError, Server, _client, _data_dir, _reported, _say
from ubc.client import UbcClient

__all__ = ["register"]

Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="the operator's token (default: $UBC_TOKEN, else $UBC_DATA_DIR/operator.token)",
        show_default=False,
    ),
]


def register(app: typer.Typer) -> None:
    hooks = typer.Typer(
        help="Webhook endpoints the journal's entries are POSTed to (operator).",
        no_args_is_help=True,
    )
    hooks.command("add")(add)
    hooks.command("list")(list_)
    hooks.command("remove")(remove)
    hooks.command("deliveries")(deliveries)
    hooks.command("replay")(replay)
    app.add_typer(hooks, name="webhooks")


def add(
    url: Annotated[str, typer.Argument(help="the receiver's http:// or https:// URL")],
    types: Annotated[
        list[str] | None,
        typer.Option("--type", help="only entries of this payload type (repeatable); default all"),
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option("--secret", help="the signing secret (default: generated, printed once)"),
    ] = None,
    start: Annotated[
        int | None,
        typer.Option("--from", min=0, help="the first seq delivered (default: new entries)"),
    ] = None,
    as_json: JsonFlag = False,
    server: Server = None,
    token: Token = None,
) -> None:
    """Register a webhook endpoint; its signing secret is shown once."""
    with _reported(), _operator(server, token) as client:
        hook = client.add_webhook(url, types or [], secret=secret, from_seq=start)
        if as_json:
            emit_json(hook)
            return
        if not hook["created"]:
            _say(f"{hook['id']} is registered already for {hook['url']} (unchanged).")
            return
        _say(f"Registered {hook['id']}: {hook['url']} ({_types(hook)}), from seq {hook['cursor']}.")
        if secret is None:
            _say(f"Signing secret (shown once, keep it with the receiver): {hook['secret']}")


def list_(as_json: JsonFlag = False, server: Server = None, token: Token = None) -> None:
    """The webhook endpoints and how far each is delivered."""
    with _reported(), _operator(server, token) as client:
        hooks = client.webhooks()
        if as_json:
            emit_json(hooks)
            return
        if not hooks:
            _say("No webhook endpoint.")
        for h in hooks:
            line = (
                f"{h['id']}  {h['status']}  {h['url']}  types: {_types(h)}  "
                f"next seq {h['cursor']}, {h['lag']} behind"
            )
            if h["attempts"]:
                line += f"; {h['attempts']} failed attempts, next at {h['next_attempt_at']}"
                line += f" ({h['last_error']})"
            _say(line)


def remove(
    webhook_id: Annotated[str, typer.Argument(metavar="ID")],
    server: Server = None,
    token: Token = None,
) -> None:
    """Remove a webhook endpoint and its delivery log."""
    with _reported(), _operator(server, token) as client:
        client.remove_webhook(webhook_id)
        _say(f"Removed {webhook_id}.")


def deliveries(
    webhook_id: Annotated[str, typer.Argument(metavar="ID")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    as_json: JsonFlag = False,
    server: Server = None,
    token: Token = None,
) -> None:
    """The delivery log of an endpoint, newest first: seq, attempt, outcome, time."""
    with _reported(), _operator(server, token) as client:
        log = client.webhook_deliveries(webhook_id, limit=limit)["deliveries"]
        if as_json:
            emit_json(log)
            return
        if not log:
            _say("No delivery yet.")
        for d in log:
            outcome = str(d["status_code"]) if d["status_code"] is not None else d["error"]
            if d["status_code"] is not None and d["error"]:
                outcome = d["error"]
            _say(
                f"seq {d['seq']}  attempt {d['attempt']}  {outcome}  "
                f"{d['attempted_at']}  {d['duration_ms']} ms"
            )


def replay(
    webhook_id: Annotated[str, typer.Argument(metavar="ID")],
    start: Annotated[
        int | None,
        typer.Option(
            "--from",
            min=0,
            help="deliver again from this seq (default: where it "
            "stopped, which resumes a failing endpoint)",
        ),
    ] = None,
    server: Server = None,
    token: Token = None,
) -> None:
    """Deliver again from a seq, or resume an endpoint marked failing."""
    with _reported(), _operator(server, token) as client:
        hook = client.replay_webhook(webhook_id, start)
        _say(f"{hook['id']} delivers from seq {hook['cursor']} ({hook['lag']} entries).")


def _operator(server: str | None, token: str | None) -> AbstractContextManager[UbcClient]:
    config = CliConfig.load()
    secret = token or os.environ.get("UBC_TOKEN")
    if not secret:
        path = config.path(config.operator_token) or _data_dir() / "operator.token"
        if not Path(path).exists():
            raise CliError(
                f"no operator token at {path}: pass --token or set UBC_TOKEN "
                "(webhooks are the operator's)"
            )
        secret = Path(path).read_text().strip()
    return _client(config, server, token=secret)


def _types(hook: dict[str, Any]) -> str:
    return ", ".join(hook["types"]) or "all"
