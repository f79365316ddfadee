"""The model endpoint from the command line: ``ubc models`` and ``ubc usage``.

ubc models                       the models this ledger meters, with their prices
ubc usage [--since 2026-11-01]   your spend by day and model (your API key)
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ubc.cli.member import (
    CliConfig,
    Server,
    _client,
    _fail,
    _read_token,
    _reported,
    _say,
)
from ubc.client import to_address


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    app.command("usage")(usage)


def models(server: Server = None) -> None:
    """List the models of the endpoint and their prices (CU per 1K tokens)."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server) as client:
            data: list[dict[str, Any]] = client._get("/v1/models")["data"]
        table = Table(title="Models (prices in CU per 1,000 tokens)")
        table.add_column("model", no_wrap=True)
        table.add_column("kind", no_wrap=True)
        table.add_column("input", justify="right")
        table.add_column("output", justify="right")
        for model in data:
            price = model.get("pricing") or {}
            table.add_row(
                escape(model["id"]),
                model.get("kind", ""),
                str(price.get("input", "-")),
                str(price.get("output", "-")),
            )
        Console(highlight=False).print(table)
        _say(f"Use them with any OpenAI client: base_url={client.base_url}/v1, your API key.")


def usage(
    address: Annotated[
        str | None, typer.Argument(help="handle or address (default: your account)")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="first UTC day, YYYY-MM-DD (default: 30 days ago)")
    ] = None,
    until: Annotated[str | None, typer.Option(help="last UTC day (default: today)")] = None,
    server: Server = None,
) -> None:
    """Show model spend by day and model."""
    with _reported():
        config = CliConfig.load()
        target = to_address(address) if address else f"member:{config.member_handle()}"
        params = {}
        for name, value in (("since", since), ("until", until)):
            if value is not None:
                try:
                    date.fromisoformat(value)
                except ValueError:
                    _fail(f"--{name} {value!r} is not a date (YYYY-MM-DD)")
                params[name] = value
        with _client(config, server, token=_read_token(config)) as client:
            report = client._get(f"/api/accounts/{target}/usage", params)
        if not report["items"]:
            _say(f"No model calls on {target} from {report['since']} to {report['until']}.")
            return
        table = Table(
            title=f"Model spend of {escape(target)}, {report['since']} to {report['until']}"
        )
        for column in ("day", "model"):
            table.add_column(column, no_wrap=True)
        for column in ("calls", "input tokens", "output tokens", "CU"):
            table.add_column(column, justify="right")
        for row in report["items"]:
            table.add_row(
                row["day"],
                escape(row["model"]),
                str(row["calls"]),
                str(row["input_tokens"]),
                str(row["output_tokens"]),
                str(row["cost"]),
            )
        Console(highlight=False).print(table)
        _say(f"Total: {report['total_cost']} CU.")
