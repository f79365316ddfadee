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

Prices are totals for the whole amount, in the price asset's smallest unit (USD: cents,
shown as dollars: ``--price 250`` is $2.50); the unit price shown is for display only.
Listings take ``--json``. Errors print the ledger's message in red and exit with status 1.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated

import typer
from rich.markup import escape

from ubc.cli._output import Column, JsonFlag, amount, emit_json, show_table
from ubc.cli.member import (
    AMOUNT_SETTINGS,
    AmountText,
    Asset,
    CliConfig,
    CliError,
    OperatorKey,
    Server,
    _client,
    _entry,
    _expiry,
    _operator_key,
    _operator_token,
    _read_token,
    _reported,
    _say,
    _when,
    positive_amount,
)
from ubc.client._client import Offer
from ubc.envelopes.payloads import SLUG_PATTERN

PriceAsset = Annotated[str, typer.Option("--price-asset", help="asset the price is paid in")]


def register(app: typer.Typer) -> None:
    market = typer.Typer(help="Sell and buy compute for a settlement asset.", no_args_is_help=True)
    market.command("list")(market_list)
    market.command("sell", context_settings=AMOUNT_SETTINGS)(market_sell)
    market.command("buy", context_settings=AMOUNT_SETTINGS)(market_buy)
    market.command("cancel")(market_cancel)
    market.command("trades")(market_trades)
    app.add_typer(market, name="market")
    cause = typer.Typer(help="Causes that receive donations.", no_args_is_help=True)
    cause.command("list")(cause_list)
    cause.command("show")(cause_show)
    cause.command("register")(cause_register)
    cause.command("update")(cause_update)
    app.add_typer(cause, name="cause")
    app.command("donate", context_settings=AMOUNT_SETTINGS)(donate)
    app.command("donations")(donations)
    app.command("withdraw", context_settings=AMOUNT_SETTINGS)(withdraw)
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
    as_json: JsonFlag = False,
    server: Server = None,
) -> None:
    """Show open offers, cheapest per unit first."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server) as client:
            offers = client.offers(sell_asset=asset, price_asset=price_asset, limit=limit)
        if as_json:
            emit_json({"offers": offers})
            return
        if not offers:
            _say(f"No open offers of {asset} for {price_asset}.")
            return
        show_table(
            f"Offers of {escape(asset)} for {escape(price_asset)}",
            [
                Column("offer"),
                Column("seller"),
                Column("left", "right"),
                Column("price", "right"),
                Column("per unit", "right"),
                Column("expires"),
            ],
            [
                [
                    offer["id"],
                    escape(offer["seller"]),
                    escape(amount(offer["remaining_amount"], asset)),
                    escape(amount(offer["remaining_price"], price_asset)),
                    escape(_unit_price(offer)),
                    _when(offer["expires_at"], seconds=False) if offer["expires_at"] else "",
                ]
                for offer in offers
            ],
        )


def market_sell(
    amount_: AmountText,
    price: Annotated[
        int, typer.Option("--price", help="total price for all of them (USD: in cents)")
    ],
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
        value = positive_amount(amount_)
        config = CliConfig.load()
        expires_at = _expiry(expires) if expires else None
        with _client(config, server, key=config.member_key(), handle=config.member_handle()) as c:
            receipt = c.sell(
                value, price, asset=asset, price_asset=price_asset, expires_at=expires_at
            )
        _say(
            f"Offered {amount(value, asset)} for {amount(price, price_asset)} "
            f"({_entry(receipt)}). Offer id: {receipt['id']}"
        )


def market_buy(
    offer_id: Annotated[str, typer.Argument(help="the offer's id")],
    amount_: Annotated[
        str | None,
        typer.Argument(
            metavar="[AMOUNT]", help="units to buy (default: all that is left)", show_default=False
        ),
    ] = None,
    server: Server = None,
) -> None:
    """Buy from an offer: you pay the seller, the units come to you, in one step."""
    with _reported():
        wanted = positive_amount(amount_) if amount_ is not None else None
        config = CliConfig.load()
        with _client(config, server, key=config.member_key(), handle=config.member_handle()) as c:
            offer = c.offer(offer_id)
            receipt = c.buy(offer_id, wanted if wanted is not None else offer["remaining_amount"])
        paid = sum(
            e["amount"]
            for e in receipt["effects"]
            if e["asset"] == offer["price_asset"] and e["debit"] == c.address
        )
        bought = sum(e["amount"] for e in receipt["effects"] if e["asset"] == offer["sell_asset"])
        _say(
            f"Bought {amount(bought, offer['sell_asset'])} for "
            f"{amount(paid, offer['price_asset'])} ({_entry(receipt)})."
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
        effects = receipt["effects"]
        asset = effects[0]["asset"] if effects else "CU"
        back = sum(e["amount"] for e in effects if e["credit"] == c.address)
        expired = sum(e["amount"] for e in effects if e["kind"] == "expiry")
        text = f"Cancelled offer {offer_id}: {amount(back, asset)} came back to you"
        if expired:
            text += f", {amount(expired, asset)} expired under the epoch's carryover cap"
        _say(f"{text} ({_entry(receipt)}).")


def market_trades(
    account: Annotated[
        str | None, typer.Argument(help="handle or address (default: your account)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 20,
    as_json: JsonFlag = False,
    server: Server = None,
) -> None:
    """Show your latest trades (fills you bought or sold)."""
    with _reported():
        config = CliConfig.load()
        handle = None if account else config.member_handle()
        target = account or f"member:{handle}"
        with _client(config, server, handle=handle, token=_read_token(config, target)) as client:
            found, cursor = client.trades(account, limit=limit)
        if as_json:
            emit_json({"trades": found, "next_cursor": cursor})
            return
        if not found:
            _say("No trades yet.")
            return
        rows = []
        for t in found:
            side = t.get("side", "")
            counterparty = t["seller"] if side == "buy" else t["buyer"]
            rows.append(
                [
                    str(t["seq"]),
                    side,
                    escape(amount(t["amount"], t["sell_asset"])),
                    escape(amount(t["payment"], t["price_asset"])),
                    escape(amount(t["fee"], t["price_asset"])),
                    escape(counterparty),
                    t["offer_id"],
                ]
            )
        show_table(
            "Trades",
            [
                Column("entry", "right"),
                Column("side"),
                Column("amount", "right"),
                Column("paid", "right"),
                Column("fee", "right"),
                Column("counterparty"),
                Column("offer"),
            ],
            rows,
        )


# --- causes -------------------------------------------------------------------------------


Stewards = Annotated[
    list[str], typer.Option("--steward", help="a steward's member handle (repeat for each)")
]
Name = Annotated[str, typer.Option("--name", help="the cause's name")]
Description = Annotated[str, typer.Option("--description", help="what the cause does")]


def cause_list(as_json: JsonFlag = False, server: Server = None) -> None:
    """List causes with what they received and spent."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server) as client:
            found = client.causes()
        if as_json:
            emit_json({"causes": found})
            return
        if not found:
            _say("No causes yet.")
            return
        show_table(
            "Causes",
            [
                Column("cause"),
                Column("name", wrap=True),
                Column("donated", "right"),
                Column("donors", "right"),
                Column("spent", "right"),
                Column("stewards", wrap=True),
            ],
            [
                [
                    escape(c["slug"]),
                    escape(c["name"]),
                    escape(_amounts(c["donated"])),
                    str(c["donors"]),
                    escape(_amounts(c["spent"])),
                    escape(", ".join(c["stewards"])),
                ]
                for c in found
            ],
        )


def cause_show(
    slug: Annotated[str, typer.Argument(help="the cause's slug")],
    as_json: JsonFlag = False,
    server: Server = None,
) -> None:
    """Show one cause."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server) as client:
            c = client.cause(slug)
        if as_json:
            emit_json(c)
            return
        rows = [
            ("account", c["address"]),
            ("description", c["description"]),
            ("stewards", ", ".join(c["stewards"])),
            ("balance", _amounts(c["balances"])),
            ("donated", _amounts(c["donated"])),
            ("donors", str(c["donors"])),
            ("used on models", _amounts(c["used_on_models"])),
            ("sent", _amounts(c["sent"])),
            ("spent", _amounts(c["spent"])),
        ]
        show_table(
            escape(c["name"]),
            [Column("field"), Column("value", wrap=True)],
            [[f"[bold]{escape(k)}[/bold]", escape(v)] for k, v in rows],
            show_header=False,
        )


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
    amount_: AmountText,
    memo: Annotated[str | None, typer.Option("--memo", help="a note for the cause")] = None,
    asset: Asset = "CU",
    server: Server = None,
) -> None:
    """Donate compute (or another asset) to a cause."""
    with _reported():
        value = positive_amount(amount_)
        config = CliConfig.load()
        with _client(config, server, key=config.member_key(), handle=config.member_handle()) as c:
            receipt = c.donate(slug, value, memo, asset=asset)
        _say(
            f"Donated {amount(value, asset)} to cause:{slug.removeprefix('cause:')} "
            f"({_entry(receipt)}). Receipt: {receipt['id']}"
        )


def donations(
    address: Annotated[
        str | None, typer.Argument(help="handle or address (default: your account)")
    ] = None,
    as_json: JsonFlag = False,
    server: Server = None,
) -> None:
    """Show your donation receipts."""
    with _reported():
        config = CliConfig.load()
        handle = None if address else config.member_handle()
        target = address or f"member:{handle}"
        with _client(config, server, handle=handle, token=_read_token(config, target)) as client:
            found, cursor = client.donations(address)
        if as_json:
            emit_json({"donations": found, "next_cursor": cursor})
            return
        if not found:
            _say("No donations yet.")
            return
        show_table(
            "Donations",
            [
                Column("when"),
                Column("cause"),
                Column("amount", "right"),
                Column("entry", "right"),
                Column("receipt"),
            ],
            [
                [
                    _when(d["created_at"], seconds=False),
                    escape(d["cause"]),
                    escape(amount(d["amount"], d["asset"])),
                    str(d["seq"]),
                    d["id"],
                ]
                for d in found
            ],
        )


# --- withdrawals --------------------------------------------------------------------------


def withdraw(
    amount_: AmountText,
    ref: Annotated[
        str, typer.Option("--ref", help="external reference (payout id); idempotent on it")
    ],
    asset: Annotated[str, typer.Option("--asset", help="asset code")] = "USD",
    server: Server = None,
) -> None:
    """Ask for a withdrawal: you sign it, the operator countersigns it to pay it out."""
    with _reported():
        value = positive_amount(amount_)
        config = CliConfig.load()
        with _client(config, server, key=config.member_key(), handle=config.member_handle()) as c:
            item = c.withdraw(value, external_ref=ref, asset=asset)
        _say(
            f"Asked to withdraw {amount(value, asset)} (reference {ref}); it waits for the "
            f"operator: ubc withdrawals approve {item['id']}"
        )


def withdrawals_pending(as_json: JsonFlag = False, server: Server = None) -> None:
    """List withdrawals waiting for the operator's signature (operator)."""
    with _reported():
        config = CliConfig.load()
        with _client(config, server, token=_operator_token(config)) as client:
            found = client.withdrawals("pending")
        if as_json:
            emit_json({"withdrawals": found})
            return
        if not found:
            _say("No withdrawals are waiting.")
            return
        show_table(
            "Withdrawals waiting",
            [
                Column("id"),
                Column("account"),
                Column("amount", "right"),
                Column("reference", wrap=True),
                Column("asked"),
            ],
            [
                [
                    w["id"],
                    escape(w["account"]),
                    escape(amount(w["amount"], w["asset"])),
                    escape(w["external_ref"]),
                    _when(w["created_at"], seconds=False),
                ]
                for w in found
            ],
        )


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
            f"Paid out {amount(item['amount'], item['asset'])} from {item['account']} "
            f"(reference {item['external_ref']}, {_entry(receipt)})."
        )


# --- helpers ------------------------------------------------------------------------------


def _check_slug(slug: str) -> None:
    if not re.fullmatch(SLUG_PATTERN, slug):
        raise CliError(f"slug {slug!r} must be 2 to 64 of a-z, 0-9 and -, starting with a-z or 0-9")


def _unit_price(offer: Offer) -> str:
    """``remaining_price / remaining_amount`` to 4 decimals, for display only: ``$0.1000``
    (10 cents) per unit of a USD price."""
    if not offer["remaining_amount"]:
        return ""
    exact = Decimal(offer["remaining_price"]) / Decimal(offer["remaining_amount"])
    if offer["price_asset"] == "USD":
        return f"${(exact / 100).quantize(Decimal('0.0001'))}"
    return f"{exact.quantize(Decimal('0.0001'))} {offer['price_asset']}"


def _amounts(values: dict[str, int]) -> str:
    return ", ".join(amount(value, asset) for asset, value in sorted(values.items())) or "0"
