"""Follow the journal live: ``ubc events tail``.

ubc events tail [--from SEQ] [--type T ...] [--json] [--count N]
    one line per journal entry as it is appended (GET /journal/stream), reconnecting
    with Last-Event-ID after a dropped connection, so that no entry is lost or repeated
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import typer

from ubc.cli._errors import CliError
from ubc.client import UbcApiError, UbcClient, read_events

__all__ = ["register", "read_events"]

DEFAULT_SERVER = "http://127.0.0.1:8000"
#: Waits between reconnections, in seconds, growing to the last while the server is away.
BACKOFF = (0.2, 1.0, 2.0, 5.0)


def register(app: typer.Typer) -> None:
    events = typer.Typer(help="The journal's entries as they are appended.", no_args_is_help=True)
    events.command("tail")(tail)
    app.add_typer(events, name="events")


def tail(
    start: Annotated[
        int | None,
        typer.Option("--from", min=0, help="the first entry's seq (default: new entries only)"),
    ] = None,
    types: Annotated[
        list[str] | None,
        typer.Option("--type", help="only entries of this type (repeatable), e.g. transfer"),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print each event's JSON object, one per line")
    ] = False,
    count: Annotated[
        int | None, typer.Option("--count", min=1, help="stop after this many entries")
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            "--server", help=f"the ledger's URL (default: $UBC_SERVER, else {DEFAULT_SERVER})"
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="operator or auditor token, or an API key with the read scope "
            "(default: $UBC_TOKEN; none on a public journal)",
        ),
    ] = None,
) -> None:
    """Print the journal's entries as they are appended, until interrupted."""
    url = server or os.environ.get("UBC_SERVER") or DEFAULT_SERVER
    bearer = token or os.environ.get("UBC_TOKEN")
    printed = 0
    for item in follow(url, bearer, start=start, types=types or []):
        typer.echo(json.dumps(item, separators=(",", ":")) if as_json else line(item))
        printed += 1
        if count is not None and printed >= count:
            return


def follow(
    server: str,
    token: str | None,
    *,
    start: int | None,
    types: list[str],
    transport: httpx.BaseTransport | None = None,
) -> Iterator[dict[str, Any]]:
    """The stream's entries through :meth:`UbcClient.events`, reconnecting after the
    last one received on a dropped connection; an HTTP error (401, 403, ...) ends it with
    a message."""
    with UbcClient(server, token=token, transport=transport) as client:
        try:
            yield from client.events(from_seq=start, types=types, backoff=BACKOFF)
        except UbcApiError as exc:
            raise CliError(f"the stream was refused: {exc}") from None


def line(item: dict[str, Any]) -> str:
    """``<seq> <committed_at> <type> <payload id>``, or ``<seq> <type>`` without contents."""
    entry = item.get("entry")
    if entry is None:
        return f"{item['seq']} {item.get('type', '?')}"
    body = json.loads(base64.b64decode(entry))
    payload = json.loads(base64.b64decode(body["envelope"]["payload"]))
    effects = " ".join(
        f"{e.get('debit')}→{e.get('credit')} {e.get('amount')} {e.get('asset')}"
        for e in body.get("effects", [])
        if "amount" in e
    )
    parts = [str(item["seq"]), body["committed_at"], item.get("type", "?"), str(payload.get("id"))]
    return " ".join(parts + ([effects] if effects else []))
