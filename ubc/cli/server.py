"""Operator set-up and the service: ``ubc init``, ``ubc serve``, ``ubc db upgrade``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from ubc.config import Settings, get_settings
from ubc.db import make_engine, make_session_factory
from ubc.migrations import upgrade
from ubc.runtime import (
    DEFAULT_ORIGIN,
    ORIGIN_FILE,
    OriginChoice,
    SetupError,
    check_genesis_origin,
    check_origin,
    find_origin,
    is_loopback,
    new_origin,
    read_origin,
    write_origin,
)
from ubc.serving import MAX_HEAD_BYTES
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
    origin: Annotated[
        str | None,
        typer.Option(
            "--origin",
            help="the ledger origin, e.g. ubc.example.org/ledger [default: $UBC_ORIGIN if "
            "set, else <hostname>/ubc-<random hex>, unique to this installation]",
        ),
    ] = None,
) -> None:
    """Write the ledger and operator keys, the operator and auditor tokens, and the ledger
    origin (DATA_DIR/origin, which names this ledger in every signature).

    Refuses to overwrite any existing key, token or origin.
    """
    settings = get_settings()
    directory = data_dir or settings.data_dir
    origin_path = directory / ORIGIN_FILE
    try:
        if origin is not None:
            check_origin(origin, "--origin")
        elif "origin" in settings.model_fields_set:
            origin = check_origin(settings.origin, "UBC_ORIGIN")
        recorded = read_origin(directory)
    except SetupError as exc:
        _fail(str(exc))
    paths = [directory / name for name in (*KEY_FILES, *TOKEN_FILES)]
    existing = [p for p in paths if p.exists()]
    if existing and keep_existing and len(existing) == len(paths):
        console.print(f"Keys already in {directory}; keeping them.")
        if origin is not None and recorded is not None and origin != recorded:
            _fail(
                f"{origin_path} already names the ledger {recorded!r}; an origin never "
                f"changes (every signature names it): {origin!r} refused"
            )
        if origin is not None and recorded is None:
            # Keys made before `ubc init` wrote origins, or by hand: record the one given.
            write_origin(directory, origin)
            console.print(f"Wrote the ledger origin to {origin_path} (mode 0600).")
        _show(directory, settings)
        return
    if existing or origin_path.exists():
        console.print(
            f"[red]Refusing to overwrite existing keys, tokens or origin:[/red] "
            f"{', '.join(str(p) for p in (*existing, origin_path) if p.exists())}"
        )
        raise typer.Exit(code=1)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    for name in KEY_FILES:
        write_signing_key(directory / name, generate_signing_key())
    for name in TOKEN_FILES:
        write_token(directory / name)
    write_origin(directory, origin or new_origin())
    console.print(f"Wrote keys, tokens and the ledger origin to {directory} (mode 0600).")
    _show(directory, settings)


def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes", min=1)] = 1,
    migrate: Annotated[bool, typer.Option(help="apply migrations before serving")] = True,
    access_log: Annotated[
        bool,
        typer.Option(
            help="one log line per request (ubc.access) and per journaled model call (ubc.usage)"
        ),
    ] = False,
    log_format: Annotated[
        str | None,
        typer.Option(
            "--log-format",
            help="text or json (one object per line) [default: $UBC_LOG_FORMAT or text]",
        ),
    ] = None,
    timeout_keep_alive: Annotated[
        float | None,
        typer.Option(
            help="seconds an idle connection is kept [default: $UBC_TIMEOUT_KEEP_ALIVE_SECONDS "
            "or 5]",
            min=0.001,
        ),
    ] = None,
    timeout_request: Annotated[
        float | None,
        typer.Option(
            help="seconds a request's line and headers may take to arrive "
            "[default: $UBC_TIMEOUT_REQUEST_SECONDS or 30]",
            min=0.001,
        ),
    ] = None,
    max_connections: Annotated[
        int | None,
        typer.Option(
            help="open connections per worker; a request beyond them answers 503 "
            "[default: $UBC_MAX_CONNECTIONS or 1000]",
            min=1,
        ),
    ] = None,
    max_header_bytes: Annotated[
        int,
        typer.Option(help="the largest request line and headers; more answers 431", min=1024),
    ] = MAX_HEAD_BYTES,
) -> None:
    """Run the service (migrating the database first)."""
    from ubc.gateway.catalog import load_catalog
    from ubc.serving import run, uvicorn_config
    from ubc.witness.cosigning import parse_witnesses, witnessing_of

    settings = get_settings()
    overrides = {
        "timeout_keep_alive_seconds": timeout_keep_alive,
        "timeout_request_seconds": timeout_request,
        "max_connections": max_connections,
    }
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    if log_format is not None:
        if log_format not in ("text", "json"):
            _fail(f"--log-format must be text or json, not {log_format!r}")
        settings = settings.model_copy(update={"log_format": log_format})
    # A models file that is missing or wrong is one line here, not a worker's traceback.
    load_catalog(settings.models_file)
    try:  # UBC_WITNESSES and UBC_WITNESS_QUORUM, in one line
        witnessing_of(
            parse_witnesses(settings.witnesses),
            settings.witness_quorum,
            settings.witness_interval_seconds,
        )
    except ValueError as exc:
        _fail(str(exc))
    try:
        choice = find_origin(settings)
    except SetupError as exc:
        _fail(str(exc))
    if not is_loopback(host):
        if choice.is_bare_default:
            _fail(
                f"refusing to serve on {host} with the default ledger origin "
                f"{choice.origin!r}, which other installations share: run `ubc init` or "
                "set UBC_ORIGIN (docs/origin.md)"
            )
        if choice.origin == DEFAULT_ORIGIN:
            console.print(
                f"[yellow]Warning:[/yellow] the ledger origin {DEFAULT_ORIGIN!r} (from "
                f"{choice.where}) is shared by every installation that keeps it: envelopes "
                "signed for one are valid on the others (docs/origin.md)."
            )
    if migrate:
        _migrate(settings.database_url)
    _check_genesis(settings.database_url, choice)
    console.print(f"Serving ledger {choice.origin} on http://{host}:{port}")
    run(
        uvicorn_config(
            settings,
            host=host,
            port=port,
            workers=workers,
            access_log=access_log,
            max_head_bytes=max_header_bytes,
        )
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


def _check_genesis(url: str, choice: OriginChoice) -> None:
    """Refuse, in one line, an origin that is not the one of the ledger in the database."""
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            check_genesis_origin(session, choice)
    except SetupError as exc:
        _fail(str(exc))
    except SQLAlchemyError:
        pass  # not migrated, unreachable: the server says so when it starts
    finally:
        engine.dispose()


def _fail(message: str) -> NoReturn:
    """One line on stderr and exit status 1: a set-up problem, not a traceback."""
    Console(stderr=True).print(f"[red]Error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=1)


def _show(directory: Path, settings: Settings) -> None:
    """Print the ledger origin the server will use, where it comes from, and the keys."""
    try:
        choice = find_origin(settings.model_copy(update={"data_dir": directory}))
    except SetupError as exc:
        _fail(str(exc))
    if choice.is_bare_default:
        console.print(
            f"[yellow]No {directory / ORIGIN_FILE}:[/yellow] the ledger origin is the default "
            f"{choice.origin!r}, shared by every installation that keeps it. For a ledger "
            "already started with it, set UBC_ORIGIN to it (`ubc serve` refuses it on a "
            "public interface otherwise); before the first start, choose one with "
            "`ubc init --keep-existing --origin NAME`."
        )
    else:
        where = escape(choice.where)
        console.print(f"Ledger origin: {escape(choice.origin)} (from {where})", soft_wrap=True)
    _show_keys(directory, choice.origin)


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
