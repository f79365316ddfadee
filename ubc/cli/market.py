"""The market, causes and withdrawals from the command line.

Members (their key and handle from ``ubc keys new``; reads with their API key)::

    ubc market list                       ubc market sell 100 --price 250 [--expires 2h]
    ubc market buy OFFER [AMOUNT]         ubc market cancel OFFER
    ubc market trades
    ubc cause list                        ubc cause show malaria-research
    ubc donate malaria-research 25        ubc donations
    ubc withdraw 500 --asset USD --ref payout-2026-001

The operator (key found like for ``ubc member admit``, reads with the operator token)::

    ubc cause register malaria-research --name "Malaria research" \\
        --description "..." --steward alice --steward bob
    ubc cause update malaria-research --name ... --description ... --steward alice
    ubc withdrawals pending               ubc withdrawals approve ID

Prices are totals for the whole amount, in the price asset's smallest unit (USD: cents);
the unit price shown is for display only. Errors print the ledger's message in red and
exit with status 1.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ubc.cli.member import (
    Asset,
    CliConfig,
    CliError,
    OperatorKey,
    Server,
    _client,
    _data_dir,
    _entry,
    _operator_key,
    _read_token,
    _reported,
    _say,
    _when,
)
from ubc.client._client import Offer
from ubc.envelopes.payloads import SLUG_PATTERN, format_timestamp

PriceAsset = Annotated[str, typer.Option("--price-asset", help="asset the price is paid in")]
_DURATION = re.compile(r"^(\d+)([smhd])$")


def register(app: typer.Typer) -> None:
    market = typer.Typer(help="Sell and buy compute for a settlement asset.", no_args_is_help=True)
    market.command("list")(market_list)
    market.command("sell")(market_sell)
    market.command("buy")(market_buy)
    market.command("cancel")(market_cancel)
    market.command("trades")(market_trades)
    app.add_typer(market, name="market")
    cause = typer.Typer(help="Causes that receive donations.", no_args_is_help=True)
    cause.command("list")(cause_list)
    cause.command("show")(cause_show)
    cause.command("register")(cause_register)
    cause.command("update")(cause_update)
    app.add_typer(cause, name="cause")
    app.command("donate")(donate)
    app.command("donations")(donations)
    app.command("withdraw")(withdraw)
    withdrawals = typer.Typer(
        help="Withdrawals waiting for the operator (operator).", no_args_is_help=True
    )
    withdrawals.command("pending")(withdrawals_pending)
    withdrawals.command("approve")(withdrawals_approve)
    app.add_typer(withdrawals, name="withdrawals")


# --- the market ---------------------------------------------------------------------------


def market_list(
    asset: Asset = "CU",
    price_asset: PriceAsset = "USD",
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 20,
    server: Server = None,
) -> None:
    """Show open offers, cheapest per unit first."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server) as client:
            offers = client.offers(sell_asset=asset, price_asset=price_asset, limit=limit)
        if not offers:
            _say(f"No open offers of {asset} for {price_asset}.")
            return
        table = Table(title=f"Offers of {escape(asset)} for {escape(price_asset)}")
        for name in ("offer", "seller", "left", "price", "per unit", "expires"):
            table.add_column(name, justify="right" if name in ("left", "price") else "left")
        for offer in offers:
            table.add_row(
                offer["id"],
                escape(offer["seller"]),
                f"{offer['remaining_amount']} {escape(asset)}",
                f"{offer['remaining_price']} {escape(price_asset)}",
                _unit_price(offer),
                _when(offer["expires_at"]) if offer["expires_at"] else "",
            )
        Console(highlight=False).print(table)


def market_sell(
    amount: Annotated[int, typer.Argument(help="units to sell, in the asset's smallest unit")],
    price: Annotated[int, typer.Option("--price", help="total price for all of them")],
    expires: Annotated[
        str | None,
        typer.Option(
            "--expires",
            help="when the offer ends: a duration (30m, 2h, 7d) or an RFC 3339 time",
            show_default=False,
        ),
    ] = None,
    asset: Asset = "CU",
    price_asset: PriceAsset = "USD",
    server: Server = None,
) -> None:
    """Offer compute for sale; it moves to escrow at once."""
    with _reported():
        config = CliConfig.load()
        expires_at = _expiry(expires) if expires else None
        with _client(config, server, key=config.member_key(), handle=config.member_handle()) as c:
            receipt = c.sell(
                amount, price, asset=asset, price_asset=price_asset, expires_at=expires_at
            )
        _say(
            f"Offered {amount} {asset} for {price} {price_asset} ({_entry(receipt)}). "
            f"Offer id: {receipt['id']}"
        )


def market_buy(
    offer_id: Annotated[str, typer.Argument(help="the offer's id")],
    amount: Annotated[
        int | None,
        typer.Argument(help="units to buy (default: all that is left)", show_default=False),
    ] = None,
    server: Server = None,
) -> None:
    """Buy from an offer: you pay the seller, the units come to you, in one step."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server, key=config.member_key(), handle=config.member_handle()) as c:
            offer = c.offer(offer_id)
            receipt = c.buy(offer_id, amount if amount is not None else offer["remaining_amount"])
        paid = sum(
            e["amount"]
            for e in receipt["effects"]
            if e["asset"] == offer["price_asset"] and e["debit"] == c.address
        )
        bought = sum(e["amount"] for e in receipt["effects"] if e["asset"] == offer["sell_asset"])
        _say(
            f"Bought {bought} {offer['sell_asset']} for {paid} {offer['price_asset']} "
            f"({_entry(receipt)})."
        )


def market_cancel(
    offer_id: Annotated[str, typer.Argument(help="the offer's id")],
    server: Server = None,
) -> None:
    """Cancel your offer; what is left comes back to you."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server, key=config.member_key(), handle=config.member_handle()) as c:
            receipt = c.cancel_offer(offer_id)
        back = sum(e["amount"] for e in receipt["effects"] if e["credit"] == c.address)
        expired = sum(e["amount"] for e in receipt["effects"] if e["kind"] == "expiry")
        text = f"Cancelled offer {offer_id}: {back} came back to you"
        if expired:
            text += f", {expired} expired under the epoch's carryover cap"
        _say(f"{text} ({_entry(receipt)}).")


def market_trades(
    account: Annotated[
        str | None, typer.Argument(help="handle or address (default: your account)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 20,
    server: Server = None,
) -> None:
    """Show your latest trades (fills you bought or sold)."""
    with _reported():
        config = CliConfig.load()
        handle = None if account else config.member_handle()
        with _client(config, server, handle=handle, token=_read_token(config)) as client:
            found, _ = client.trades(account, limit=limit)
        if not found:
            _say("No trades yet.")
            return
        table = Table(title="Trades")
        for name in ("seq", "side", "amount", "paid", "fee", "counterparty", "offer"):
            table.add_column(name)
        for t in found:
            side = t.get("side", "")
            counterparty = t["seller"] if side == "buy" else t["buyer"]
            table.add_row(
                str(t["seq"]),
                side,
                f"{t['amount']} {escape(t['sell_asset'])}",
                f"{t['payment']} {escape(t['price_asset'])}",
                str(t["fee"]),
                escape(counterparty),
                t["offer_id"],
            )
        Console(highlight=False).print(table)


# --- causes -------------------------------------------------------------------------------


Stewards = Annotated[
    list[str], typer.Option("--steward", help="a steward's member handle (repeat for each)")
]
Name = Annotated[str, typer.Option("--name", help="the cause's name")]
Description = Annotated[str, typer.Option("--description", help="what the cause does")]


def cause_list(server: Server = None) -> None:
    """List causes with what they received and spent."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server) as client:
            found = client.causes()
        if not found:
            _say("No causes yet.")
            return
        table = Table(title="Causes")
        for name in ("cause", "name", "donated", "donors", "spent", "stewards"):
            table.add_column(name)
        for c in found:
            table.add_row(
                escape(c["slug"]),
                escape(c["name"]),
                _amounts(c["donated"]),
                str(c["donors"]),
                _amounts(c["spent"]),
                escape(", ".join(c["stewards"])),
            )
        Console(highlight=False).print(table)


def cause_show(
    slug: Annotated[str, typer.Argument(help="the cause's slug")],
    server: Server = None,
) -> None:
    """Show one cause."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server) as client:
            c = client.cause(slug)
        table = Table(title=escape(c["name"]), show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        for field, value in (
            ("account", c["address"]),
            ("description", c["description"]),
            ("stewards", ", ".join(c["stewards"])),
            ("balance", _amounts(c["balances"])),
            ("donated", _amounts(c["donated"])),
            ("donors", str(c["donors"])),
            ("used on models", _amounts(c["used_on_models"])),
            ("sent", _amounts(c["sent"])),
            ("spent", _amounts(c["spent"])),
        ):
            table.add_row(field, escape(value))
        Console(highlight=False).print(table)


def cause_register(
    slug: Annotated[str, typer.Argument(help="short name: a-z, 0-9 and -")],
    name: Name,
    description: Description,
    steward: Stewards,
    operator_key: OperatorKey = None,
    server: Server = None,
) -> None:
    """Register a cause and its stewards (operator)."""
    with _reported():
        _check_slug(slug)
        config = CliConfig.load()
        with _client(config, server, key=_operator_key(config, operator_key)) as client:
            receipt = client.register_cause(slug, name, description, steward)
        _say(f"Registered cause:{slug} ({_entry(receipt)}); donate with: ubc donate {slug} AMOUNT")


def cause_update(
    slug: Annotated[str, typer.Argument(help="the cause's slug")],
    name: Name,
    description: Description,
    steward: Stewards,
    operator_key: OperatorKey = None,
    server: Server = None,
) -> None:
    """Change a cause's name, description and stewards (operator)."""
    with _reported():
        _check_slug(slug)
        config = CliConfig.load()
        with _client(config, server, key=_operator_key(config, operator_key)) as client:
            receipt = client.update_cause(slug, name, description, steward)
        _say(f"Updated cause:{slug} ({_entry(receipt)}).")


def donate(
    slug: Annotated[str, typer.Argument(help="the cause's slug")],
    amount: Annotated[int, typer.Argument(help="amount, in the asset's smallest unit")],
    memo: Annotated[str | None, typer.Option("--memo", help="a note for the cause")] = None,
    asset: Asset = "CU",
    server: Server = None,
) -> None:
    """Donate compute (or another asset) to a cause."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server, key=config.member_key(), handle=config.member_handle()) as c:
            receipt = c.donate(slug, amount, memo, asset=asset)
        _say(
            f"Donated {amount} {asset} to cause:{slug.removeprefix('cause:')} "
            f"({_entry(receipt)}). Receipt: {receipt['id']}"
        )


def donations(
    address: Annotated[
        str | None, typer.Argument(help="handle or address (default: your account)")
    ] = None,
    server: Server = None,
) -> None:
    """Show your donation receipts."""
    with _reported():
        config = CliConfig.load()
        handle = None if address else config.member_handle()
        with _client(config, server, handle=handle, token=_read_token(config)) as client:
            found, _ = client.donations(address)
        if not found:
            _say("No donations yet.")
            return
        table = Table(title="Donations")
        for name in ("when", "cause", "amount", "journal entry", "receipt"):
            table.add_column(name)
        for d in found:
            table.add_row(
                _when(d["created_at"]),
                escape(d["cause"]),
                f"{d['amount']} {escape(d['asset'])}",
                str(d["seq"]),
                d["id"],
            )
        Console(highlight=False).print(table)


# --- withdrawals --------------------------------------------------------------------------


def withdraw(
    amount: Annotated[int, typer.Argument(help="amount, in the asset's smallest unit")],
    ref: Annotated[
        str, typer.Option("--ref", help="external reference (payout id); idempotent on it")
    ],
    asset: Annotated[str, typer.Option("--asset", help="asset code")] = "USD",
    server: Server = None,
) -> None:
    """Ask for a withdrawal: you sign it, the operator countersigns it to pay it out."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server, key=config.member_key(), handle=config.member_handle()) as c:
            item = c.withdraw(amount, external_ref=ref, asset=asset)
        _say(
            f"Asked to withdraw {amount} {asset} (reference {ref}); it waits for the "
            f"operator: ubc withdrawals approve {item['id']}"
        )


def withdrawals_pending(server: Server = None) -> None:
    """List withdrawals waiting for the operator's signature (operator)."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server, token=_operator_token(config)) as client:
            found = client.withdrawals("pending")
        if not found:
            _say("No withdrawals are waiting.")
            return
        table = Table(title="Withdrawals waiting")
        for name in ("id", "account", "amount", "reference", "asked"):
            table.add_column(name)
        for w in found:
            table.add_row(
                w["id"],
                escape(w["account"]),
                f"{w['amount']} {escape(w['asset'])}",
                escape(w["external_ref"]),
                _when(w["created_at"]),
            )
        Console(highlight=False).print(table)


def withdrawals_approve(
    withdrawal_id: Annotated[str, typer.Argument(help="the withdrawal's id")],
    operator_key: OperatorKey = None,
    server: Server = None,
) -> None:
    """Countersign a waiting withdrawal and submit it (operator): the value leaves now."""
    with _reported():
        config = CliConfig.load()
        key = _operator_key(config, operator_key)
        with _client(config, server, key=key, token=_operator_token(config)) as client:
            item = client.withdrawal(withdrawal_id)
            receipt = client.approve_withdrawal(withdrawal_id)
        _say(
            f"Paid out {item['amount']} {item['asset']} from {item['account']} "
            f"(reference {item['external_ref']}, {_entry(receipt)})."
        )


# --- helpers ------------------------------------------------------------------------------


def _operator_token(config: CliConfig) -> str:
    token = os.environ.get("UBC_TOKEN")
    if token:
        return token
    for path in (config.path(config.operator_token), _data_dir() / "operator.token"):
        if path is not None and path.exists():
            return path.read_text().strip()
    raise CliError(
        "no operator token: set UBC_TOKEN, operator_token in the config, or UBC_DATA_DIR"
    )


def _check_slug(slug: str) -> None:
    if not re.fullmatch(SLUG_PATTERN, slug):
        raise CliError(f"slug {slug!r} must be 2 to 64 of a-z, 0-9 and -, starting with a-z or 0-9")


def _expiry(value: str) -> str:
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


def _unit_price(offer: Offer) -> str:
    """``remaining_price / remaining_amount`` to 4 decimals, for display only."""
    if not offer["remaining_amount"]:
        return ""
    exact = Decimal(offer["remaining_price"]) / Decimal(offer["remaining_amount"])
    return f"{exact.quantize(Decimal('0.0001'))}"


def _amounts(values: dict[str, int]) -> str:
    return ", ".join(f"{amount} {asset}" for asset, amount in sorted(values.items())) or "0"
