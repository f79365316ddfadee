"""Operator set-up and the service: ``ubc init``, ``ubc serve``, ``ubc db upgrade``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ubc.config import get_settings
from ubc.db import make_engine
from ubc.migrations import upgrade
from ubc.signing import (
    encode_public_key,
    generate_signing_key,
    key_id,
    load_signing_key,
    write_signing_key,
    write_token,
)
from ubc.signing.note import vkey

console = Console()
KEY_FILES = ("ledger.key", "operator.key")
TOKEN_FILES = ("operator.token", "auditor.token")

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="where keys and tokens live [default: $UBC_DATA_DIR or ./ubc-data]"
    ),
]


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.command("init")(init)
    app.command("serve")(serve)
    db = typer.Typer(help="Database schema.", no_args_is_help=True)
    db.command("upgrade")(db_upgrade)
    app.add_typer(db, name="db")


def demo(
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="keep the demo's ledger, keys and journal export here (a fresh directory) "
            "[default: a temporary directory, removed at the end]",
        ),
    ] = None,
) -> None:
    """Tell the whole story on a fresh SQLite ledger: allocate, spend through the OpenAI
    SDK, send, donate, sell and buy, close the epoch, report, and audit the journal."""
    from ubc.demo import DemoFailed, run_demo

    try:
        findings = run_demo(directory, console)
    except DemoFailed as exc:
        console.print(f"[red]The demo failed: {exc}[/red]")
        raise typer.Exit(code=1) from None
    if findings:
        raise typer.Exit(code=1)


def init(
    data_dir: DataDir = None,
    keep_existing: Annotated[
        bool,
        typer.Option("--keep-existing", help="exit quietly if the keys are already there"),
    ] = False,
) -> None:
    """Write the ledger and operator keys and the operator and auditor tokens.

    Refuses to overwrite any existing key or token.
    """
    settings = get_settings()
    directory = data_dir or settings.data_dir
    paths = [directory / name for name in (*KEY_FILES, *TOKEN_FILES)]
    existing = [p for p in paths if p.exists()]
    if existing and keep_existing and len(existing) == len(paths):
        console.print(f"Keys already in {directory}; keeping them.")
        _show_keys(directory, settings.origin)
        return
    if existing:
        console.print(
            f"[red]Refusing to overwrite existing keys or tokens:[/red] "
            f"{', '.join(str(p) for p in existing)}"
        )
        raise typer.Exit(code=1)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    for name in KEY_FILES:
        write_signing_key(directory / name, generate_signing_key())
    for name in TOKEN_FILES:
        write_token(directory / name)
    console.print(f"Wrote keys and tokens to {directory} (mode 0600).")
    _show_keys(directory, settings.origin)


def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
    migrate: Annotated[bool, typer.Option(help="apply migrations before serving")] = True,
    access_log: Annotated[bool, typer.Option(help="log every request")] = False,
) -> None:
    """Run the service (migrating the database first)."""
    import uvicorn

    settings = get_settings()
    if migrate:
        _migrate(settings.database_url)
    console.print(f"Serving ledger {settings.origin} on http://{host}:{port}")
    uvicorn.run(
        "ubc.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=access_log,
    )


def db_upgrade() -> None:
    """Apply every pending migration to $UBC_DATABASE_URL."""
    settings = get_settings()
    _migrate(settings.database_url)
    console.print("Database is at the latest revision.")


def _migrate(url: str) -> None:
    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


def _show_keys(directory: Path, origin: str) -> None:
    table = Table(title="ubc keys", show_lines=False)
    table.add_column("key")
    table.add_column("key id")
    table.add_column("public key")
    for name in KEY_FILES:
        public = load_signing_key(directory / name).verify_key.encode()
        table.add_row(name.removesuffix(".key"), key_id(public), encode_public_key(public))
    console.print(table)
    ledger_public = load_signing_key(directory / "ledger.key").verify_key.encode()
    console.print(f"Checkpoint verifier key (vkey): {vkey(origin, ledger_public)}", soft_wrap=True)
