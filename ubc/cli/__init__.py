"""The ``ubc`` command line: operator set-up, the service, and members' commands."""

from __future__ import annotations

import typer

from ubc.cli import audit, epoch, events, gateway, market, member, server, webhooks, witness

app = typer.Typer(
    name="ubc",
    help="Universal Basic Compute ledger: signed, double-entry, Merkle-logged.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
server.register(app)
member.register(app)
audit.register(app)
epoch.register(app)
market.register(app)
gateway.register(app)
witness.register(app)
events.register(app)
webhooks.register(app)


def main() -> None:
    from ubc.cli._errors import run  # every failure one line (UBC_DEBUG=1: the traceback)

    run(app)
