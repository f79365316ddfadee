"""The model endpoint from the command line: ``ubc models`` and ``ubc usage``.

ubc models                       the models this ledger meters, with their prices
ubc usage [--since 2026-11-01]   your spend by day and model (your API key)
ubc apikey list                  your spend by API key

Both take ``--json``.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

import typer
from rich.markup import escape

from ubc.cli._output import Column, JsonFlag, amount, emit_json, show_table
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


def models(as_json: JsonFlag = False, server: Server = None) -> None:
    """List the models of the endpoint and their prices (CU per 1K tokens)."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server) as client:
            answer: dict[str, Any] = client._get("/v1/models")
        if as_json:
            emit_json(answer)
            return
        data: list[dict[str, Any]] = answer["data"]
        rows = []
        for model in data:
            price = model.get("pricing") or {}
            rows.append(
                [
                    escape(model["id"]),
                    escape(str(model.get("kind", ""))),
                    str(price.get("input", "-")),
                    str(price.get("output", "-")),
                ]
            )
        show_table(
            "Models (prices in CU per 1,000 tokens)",
            [Column("model"), Column("kind"), Column("input", "right"), Column("output", "right")],
            rows,
        )
        _say(f"Use them with any OpenAI client: base_url={client.base_url}/v1, your API key.")


def usage(
    address: Annotated[
        str | None, typer.Argument(help="handle or address (default: your account)")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="first UTC day, YYYY-MM-DD (default: 30 days ago)")
    ] = None,
    until: Annotated[str | None, typer.Option(help="last UTC day (default: today)")] = None,
    as_json: JsonFlag = False,
    server: Server = None,
) -> None:
    """Show model spend by day and model (by API key: ubc apikey list)."""
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
        with _client(config, server, token=_read_token(config, target)) as client:
            report = client._get(f"/api/accounts/{target}/usage", params)
        if as_json:
            emit_json(report)
            return
        if not report["items"]:
            _say(f"No model calls on {target} from {report['since']} to {report['until']}.")
            return
        show_table(
            f"Model spend of {escape(target)}, {report['since']} to {report['until']}",
            [
                Column("day"),
                Column("model"),
                Column("calls", "right"),
                Column("input tokens", "right"),
                Column("output tokens", "right"),
                Column("CU", "right"),
            ],
            [
                [
                    row["day"],
                    escape(row["model"]),
                    str(row["calls"]),
                    str(row["input_tokens"]),
                    str(row["output_tokens"]),
                    str(row["cost"]),
                ]
                for row in report["items"]
            ],
        )
        _say(f"Total: {amount(report['total_cost'], 'CU')}.")
