"""Follow the journal live: ``ubc events tail``.

ubc events tail [--from SEQ] [--type T ...] [--json] [--count N]
    one line per journal entry as it is appended (GET /journal/stream), reconnecting
    with Last-Event-ID after a dropped connection, so that no entry is lost or repeated
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import typer

from ubc.cli._errors import CliError

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
    """The stream's entries, reconnecting after the last one received on a dropped
    connection; an HTTP error (401, 403, ...) ends it with a message."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    last: int | None = None
    failures = 0
    timeout = httpx.Timeout(10.0, read=60.0)  # keep-alives come every 15 s
    with httpx.Client(base_url=server.rstrip("/"), timeout=timeout, transport=transport) as client:
        while True:
            params: dict[str, Any] = {"type": types}
            sent = dict(headers)
            if last is not None:
                sent["Last-Event-ID"] = str(last)
            elif start is not None:
                params["from"] = start
            try:
                with client.stream("GET", "/journal/stream", params=params, headers=sent) as r:
                    if r.status_code == 503:
                        raise httpx.TransportError("the server has no stream free")
                    if r.status_code != 200:
                        r.read()
                        raise CliError(f"the stream was refused: {_message(r)}")
                    for seq, data in read_events(r.iter_lines()):
                        failures = 0
                        last = seq
                        yield data
            except (httpx.TransportError, httpx.RemoteProtocolError):
                pass
            time.sleep(BACKOFF[min(failures, len(BACKOFF) - 1)])
            failures += 1


def read_events(lines: Iterator[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(seq, data) of each ``entry`` event of SSE ``lines``; comments are skipped."""
    fields: dict[str, str] = {}
    for raw in lines:
        if raw == "":
            if fields.get("event") == "entry" and "id" in fields and "data" in fields:
                yield int(fields["id"]), json.loads(fields["data"])
            fields = {}
            continue
        if raw.startswith(":"):
            continue
        name, _, value = raw.partition(":")
        fields[name] = value[1:] if value.startswith(" ") else value


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


def _message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{response.status_code} {error['type']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.text[:200]}"
