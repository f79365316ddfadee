"""Epochs and the utilization report, from the command line.

The operator opens and closes epochs, signing with the operator key (found like for
``ubc member admit``); anyone may list and show them:

    ubc epoch open --epoch 3 --allocation basic=100 --allocation pro=250 --carryover-cap 50
    ubc epoch close 3          ubc epoch list          ubc epoch show 3

``epoch open`` waits until every allocation is applied (a large epoch is applied in
batches by the server), with a progress bar. The operator and auditors read the report:

    ubc report utilization --epoch 3 --below 50 --output epoch-3.csv
    ubc report utilization --epoch 3 --csv > epoch-3.csv       (CSV on stdout, no table)

The table (and ``--json``) gathers the report's pages; the CSV of ``--csv`` and
``--output`` is the server's stream, written as it arrives.

Listings take ``--json``; amounts are in the epoch's asset (CU unless said otherwise).

Errors print the ledger's message in red and exit with status 1.
"""

from __future__ import annotations

import re
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TextIO, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from ubc.cli._output import Column, CsvFlag, JsonFlag, OutputFile, amount, emit_json, show_table
from ubc.cli.member import (
    Asset,
    CliConfig,
    CliError,
    OperatorKey,
    Server,
    _client,
    _entry,
    _operator_key,
    _read_token,
    _reported,
    _say,
    _when,
)
from ubc.client import UbcClient
from ubc.envelopes.payloads import format_timestamp
from ubc.epochs.report import MAX_LIMIT, PERCENT_PATTERN

DEFAULT_LENGTH = timedelta(days=30)
#: Members per page when the CLI reads the report as JSON (the server's largest page).
REPORT_PAGE = MAX_LIMIT
POLL_SECONDS = 0.25


def register(app: typer.Typer) -> None:
    epoch = typer.Typer(
        help="Allocation epochs: open, close (operator), list, show.", no_args_is_help=True
    )
    epoch.command("open")(epoch_open)
    epoch.command("close")(epoch_close)
    epoch.command("list")(epoch_list)
    epoch.command("show")(epoch_show)
    app.add_typer(epoch, name="epoch")
    report = typer.Typer(help="Reports (operator and auditors).", no_args_is_help=True)
    report.command("utilization")(report_utilization)
    app.add_typer(report, name="report")


# --- commands -----------------------------------------------------------------------------


def epoch_open(
    epoch: Annotated[int, typer.Option("--epoch", min=1, help="the new epoch's number")],
    allocation: Annotated[
        list[str],
        typer.Option(
            "--allocation",
            help="TIER=AMOUNT: what each active member of TIER gets (repeat per tier)",
        ),
    ],
    carryover_cap: Annotated[
        int | None,
        typer.Option(
            "--carryover-cap",
            min=0,
            help="at close, balances above this expire (default: nothing expires)",
            show_default=False,
        ),
    ] = None,
    asset: Asset = "CU",
    starts_at: Annotated[
        str | None,
        typer.Option(
            "--starts-at",
            help="RFC 3339 time (default: now; no zone means UTC)",
            show_default=False,
        ),
    ] = None,
    ends_at: Annotated[
        str | None,
        typer.Option(
            "--ends-at", help="RFC 3339 time (default: 30 days after the start)", show_default=False
        ),
    ] = None,
    operator_key: OperatorKey = None,
    server: Server = None,
) -> None:
    """Open an epoch: allocate to every active member of the listed tiers (operator)."""
    with _reported():
        allocations = _allocations(allocation)
        start = _moment(starts_at, "--starts-at") if starts_at else datetime.now(UTC)
        end = _moment(ends_at, "--ends-at") if ends_at else start + DEFAULT_LENGTH
        config = CliConfig.load()
        with _client(config, server, key=_operator_key(config, operator_key)) as client:
            receipt = client.submit(
                client.envelope(
                    "epoch.open",
                    actor="operator",
                    epoch=epoch,
                    asset=asset,
                    allocations=allocations,
                    carryover_cap=carryover_cap,
                    starts_at=format_timestamp(start),
                    ends_at=format_timestamp(end),
                )
            )
            info = _wait_until_applied(client, epoch)
        summary: dict[str, Any] = cast(dict[str, Any], receipt).get("summary") or {}
        _say(f"Opened epoch {epoch} ({_entry(receipt)}).")
        rows: list[list[str] | None] = [
            [escape(tier), str(row["amount"]), str(row["members"]), str(row["total"])]
            for tier, row in sorted(summary.get("tiers", {}).items())
        ]
        rows += [None, ["total", "", str(info["members"]), f"{info['issued']} {escape(asset)}"]]
        show_table(
            f"Epoch {epoch}: {escape(asset)} issued",
            [
                Column("tier"),
                Column("each", "right"),
                Column("members", "right"),
                Column("issued", "right"),
            ],
            rows,
        )


def epoch_close(
    epoch: Annotated[int, typer.Argument(min=1, help="the epoch to close")],
    operator_key: OperatorKey = None,
    server: Server = None,
) -> None:
    """Close an epoch: balances above its carryover cap expire (operator)."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server, key=_operator_key(config, operator_key)) as client:
            receipt = client.submit(client.envelope("epoch.close", actor="operator", epoch=epoch))
            info = _wait_until_closed(client, epoch)
        _say(f"Closed epoch {epoch} ({_entry(receipt)}).")
        cap = info["carryover_cap"]
        _say(f"Carryover cap: {'none' if cap is None else amount(cap, info['asset'])}")
        _say(f"Members expired: {info['expired_members']}")
        _say(f"Total expired: {amount(info['expired'], info['asset'])}")


def epoch_list(as_json: JsonFlag = False, server: Server = None) -> None:
    """List every epoch, oldest first."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server) as client:
            answer: dict[str, Any] = client._get("/api/epochs")
        if as_json:
            emit_json(answer)
            return
        found: list[dict[str, Any]] = answer["epochs"]
        if not found:
            _say("No epochs yet.")
            return
        columns = [Column("epoch", "right"), Column("asset"), Column("status")]
        columns += [Column("starts"), Column("ends")]
        columns += [Column(n, "right") for n in ("members", "issued", "expired")]
        show_table(
            "Epochs",
            columns,
            [
                [
                    str(e["epoch"]),
                    escape(e["asset"]),
                    _status(e),
                    _when(e["starts_at"], seconds=False),
                    _when(e["ends_at"], seconds=False),
                    str(e["members"]),
                    str(e["issued"]),
                    str(e["expired"]),
                ]
                for e in found
            ],
            caption="issued and expired in each epoch's asset",
        )


def epoch_show(
    epoch: Annotated[int, typer.Argument(min=1, help="the epoch number")],
    as_json: JsonFlag = False,
    server: Server = None,
) -> None:
    """Show one epoch: its allocations, status and totals."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server) as client:
            e: dict[str, Any] = client._get(f"/api/epochs/{epoch}")
        if as_json:
            emit_json(e)
            return
        asset = e["asset"]
        cap = e["carryover_cap"]
        rows = [
            ("status", _status(e)),
            ("asset", asset),
            ("starts", _when(e["starts_at"])),
            ("ends", _when(e["ends_at"])),
            ("opened", _when(e["opened_at"])),
            ("closed", "-" if e["closed_at"] is None else _when(e["closed_at"])),
            ("carryover cap", "none" if cap is None else amount(cap, asset)),
        ]
        rows += [
            (f"allocation {tier}", amount(value, asset))
            for tier, value in sorted(e["allocations"].items())
        ]
        rows += [
            ("members", str(e["members"])),
            ("issued", amount(e["issued"], asset)),
            ("members expired", str(e["expired_members"])),
            ("expired", amount(e["expired"], asset)),
        ]
        show_table(
            f"Epoch {e['epoch']}",
            [Column("field"), Column("value", wrap=True)],
            [[f"[bold]{escape(k)}[/bold]", escape(v)] for k, v in rows],
            show_header=False,
        )


def report_utilization(
    epoch: Annotated[int, typer.Option("--epoch", min=1, help="the epoch number")],
    csv_out: CsvFlag = False,
    output: OutputFile = None,
    below: Annotated[
        str | None,
        typer.Option(
            "--below", help="list the members whose utilization is under PERCENT", metavar="PERCENT"
        ),
    ] = None,
    as_json: JsonFlag = False,
    server: Server = None,
) -> None:
    """Per member of an epoch: allocated, used, sent, received, donated, traded, expired,
    utilization and its value in USD (operator and auditors). ``--csv`` prints the
    members' rows as CSV instead of the table; ``--output FILE`` also writes them to FILE.
    The table and ``--json`` follow the report's pages; the CSV is streamed as it comes."""
    with _reported():
        threshold = None if below is None else _percent(below)
        config = CliConfig.load()
        to_stdout = csv_out or (output is not None and str(output) == "-")
        written = 0
        with _client(config, server, token=_read_token(config)) as client:
            if to_stdout:
                _stream_csv(client, epoch, sys.stdout)
                return
            report = _whole_report(client, epoch, threshold)
            if output is not None and not as_json:
                try:
                    with output.open("w", encoding="utf-8", newline="") as out:
                        written = _stream_csv(client, epoch, out)
                except OSError as exc:
                    raise CliError(f"cannot write {output}: {exc}") from None
        members: list[dict[str, Any]] = report["members"]
        if as_json:
            emit_json(report)
            return
        asset = escape(report["asset"])
        columns = [Column("member")]
        columns += [
            Column(name, "right")
            for name in ("allocated", "used", "sent", "received", "donated", "sold", "bought")
        ]
        columns += [Column("expired", "right"), Column("used %", "right")]
        columns += [Column("USD allocated", "right"), Column("USD used", "right")]
        show_table(
            f"Utilization of epoch {report['epoch']} ({report['status']}), in {asset}",
            columns,
            [*(_cells(row) for row in members), None, _cells(report["totals"])],
            caption=f"{_when(report['from'])} to {_when(report['to'])}; "
            f"1 {asset} = {report['cu_price_usd']} USD",
            bold_last=True,
        )
        if not members:
            _say(f"No member activity in epoch {report['epoch']}.")
        if report["below"] is not None:
            under: list[str] = report["below_members"]
            by_address = {m["address"]: m for m in members}
            if under:
                _say(f"{len(under)} member(s) under {report['below']}%:")
                for address in under:
                    _say(f"  {address}  {by_address[address]['utilization']}%")
            else:
                _say(f"No member under {report['below']}%.")
        if output is not None:
            _say(f"Wrote {written} rows to {output}.")


# --- helpers ------------------------------------------------------------------------------


def _whole_report(client: UbcClient, epoch: int, below: str | None) -> dict[str, Any]:
    """The report as one document, page after page (``next_cursor``): the first page's
    fields and totals, with every page's members and members under ``below``."""
    page = client.utilization(epoch, below=below, limit=REPORT_PAGE)
    report = {k: v for k, v in page.items() if k != "next_cursor"}
    members: list[dict[str, Any]] = list(page["members"])
    under: list[str] = list(page["below_members"])
    while page["next_cursor"] is not None:
        page = client.utilization(epoch, below=below, cursor=page["next_cursor"], limit=REPORT_PAGE)
        members += page["members"]
        under += page["below_members"]
    report["members"] = members
    report["below_members"] = under
    return report


def _stream_csv(client: UbcClient, epoch: int, out: TextIO) -> int:
    """Write the report's CSV to ``out`` as the server streams it: the header and the
    members' rows, not the server's final ``total`` row (the CLI's CSV has only members,
    as a table to sum). That row ends a complete answer: without it, an error. The number
    of members' rows written."""
    rest = ""
    held: str | None = None  # the last complete line: written once another follows it
    lines = 0
    for text in client.iter_utilization_csv(epoch):
        *complete, rest = (rest + text).split("\n")
        for line in complete:
            if held is not None:
                out.write(held + "\n")
                lines += 1
            held = line
    if rest or held is None or not held.startswith("total,"):
        raise CliError(f"the report of epoch {epoch} ended before its total row")
    return lines - 1  # the header is not a row


def _wait_until_applied(client: UbcClient, number: int) -> dict[str, Any]:
    """Poll the epoch until its allocations are all applied, with a progress bar."""
    info: dict[str, Any] = client._get(f"/api/epochs/{number}")
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with progress:
        task = progress.add_task(
            "allocating", total=info["members"] or 1, completed=info["applied"]
        )
        while info["status"] == "opening":
            time.sleep(POLL_SECONDS)
            info = client._get(f"/api/epochs/{number}")
            progress.update(task, completed=info["applied"])
        progress.update(task, completed=info["members"] or 1)
    return info


def _wait_until_closed(client: UbcClient, number: int) -> dict[str, Any]:
    """Poll the epoch until its expiry steps have covered every member account."""
    info: dict[str, Any] = client._get(f"/api/epochs/{number}")
    if info["status"] != "closing":
        return info
    with Console(stderr=True).status("expiring") as status:
        while info["status"] == "closing":
            status.update(
                f"expiring: {info['expired_members']} members, through {info['close_cursor']}"
            )
            time.sleep(POLL_SECONDS)
            info = client._get(f"/api/epochs/{number}")
    return info


def _allocations(items: list[str]) -> dict[str, int]:
    allocations: dict[str, int] = {}
    for item in items:
        tier, sep, amount = item.partition("=")
        tier = tier.strip()
        if not sep or not tier:
            raise CliError(f"--allocation {item!r} must be TIER=AMOUNT")
        try:
            value = int(amount.strip())
        except ValueError:
            raise CliError(f"--allocation {item!r}: {amount!r} is not an integer") from None
        if value < 1:
            raise CliError(f"--allocation {item!r}: the amount must be at least 1")
        if tier in allocations:
            raise CliError(f"--allocation: tier {tier!r} is given twice")
        allocations[tier] = value
    if not allocations:
        raise CliError("give at least one --allocation TIER=AMOUNT")
    return allocations


def _moment(value: str, option: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise CliError(f"{option} {value!r} is not a time like 2026-12-01T00:00:00Z") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _percent(value: str) -> str:
    number = value.strip().removesuffix("%")
    if not re.fullmatch(PERCENT_PATTERN, number):
        raise CliError(f"--below {value!r} is not a percent like 50 or 12.5")
    return number


def _status(e: dict[str, Any]) -> str:
    if e["status"] == "opening":
        return f"opening ({e['applied']}/{e['members']})"
    if e["status"] == "closing":
        return f"closing (through {e['close_cursor']})"
    return str(e["status"])


def _cells(row: dict[str, Any]) -> list[str]:
    utilization = row["utilization"]
    return [
        escape(row["address"]),
        *(
            str(row[c])
            for c in ("allocated", "used", "sent", "received", "donated", "sold", "bought")
        ),
        str(row["expired"]),
        "-" if utilization is None else f"{utilization}%",
        str(row["allocated_usd"]),
        str(row["used_usd"]),
    ]
