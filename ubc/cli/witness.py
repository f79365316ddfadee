"""Run a C2SP witness for peer ledgers: ``ubc witness init|vkey|serve``.

ubc witness init --key witness.key --name witness.example.org/w1
    a new Ed25519 key (one line of base64, mode 0600, never overwritten) and its vkey
ubc witness vkey --key witness.key --name witness.example.org/w1
    the vkey of an existing key, to hand to the ledgers that will ask for cosignatures
ubc witness serve --key witness.key --name witness.example.org/w1 \\
    --log peer.example.org/ledger=peer.example.org/ledger+1a2b3c4d+AX... \\
    --database-url sqlite:///witness.db --host 0.0.0.0 --port 8080
    serve POST /add-checkpoint for the logs given (docs/witness.md)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from nacl.signing import SigningKey
from rich.console import Console
from rich.markup import escape

from ubc.signing import generate_signing_key, load_signing_key, write_signing_key
from ubc.witness.cosignature import Cosigner

__all__ = ["register"]

console = Console()

KeyFile = Annotated[
    Path, typer.Option("--key", help="the witness's key file (one line of base64, mode 0600)")
]
Name = Annotated[
    str,
    typer.Option(
        "--name",
        help="the witness's name, a schema-less URL such as witness.example.org/w1 "
        "(it names every cosignature)",
    ),
]


def register(app: typer.Typer) -> None:
    witness = typer.Typer(
        help="A C2SP tlog-witness that cosigns peer ledgers' checkpoints.",
        no_args_is_help=True,
    )
    witness.command("init")(init)
    witness.command("vkey")(show_vkey)
    witness.command("serve")(serve)
    app.add_typer(witness, name="witness")


def init(key: KeyFile, name: Name) -> None:
    """Write a new witness key (refusing to overwrite one) and print its vkey."""
    signing_key = generate_signing_key()
    cosigner = _cosigner(name, signing_key)
    try:
        write_signing_key(key, signing_key)
    except FileExistsError:
        _fail(f"{key} already exists: a witness key is never overwritten")
    except OSError as exc:
        _fail(f"cannot write {key}: {exc.strerror or exc}")
    console.print(f"Wrote the witness key to {escape(str(key))} (mode 0600).")
    console.print(f"Witness vkey: {cosigner.vkey}", soft_wrap=True)


def show_vkey(key: KeyFile, name: Name) -> None:
    """Print the vkey of the witness key (cosignature type 0x04)."""
    typer.echo(_cosigner(name, _load_key(key)).vkey)


def serve(
    key: KeyFile,
    name: Name,
    log: Annotated[
        list[str],
        typer.Option(
            "--log",
            help="a log to witness, ORIGIN=VKEY (the log's checkpoint vkey); repeat for "
            "each log, or for each key of one log",
        ),
    ],
    database_url: Annotated[
        str,
        typer.Option(
            "--database-url",
            envvar="UBC_WITNESS_DATABASE_URL",
            help="where the latest checkpoint of each log is kept (SQLite or PostgreSQL)",
        ),
    ] = "sqlite:///ubc-witness.db",
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=1, max=65535)] = 8080,
    access_log: Annotated[bool, typer.Option(help="log every request")] = False,
) -> None:
    """Serve POST /add-checkpoint (C2SP tlog-witness) for the logs given."""
    import uvicorn
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from ubc.db import make_engine
    from ubc.signing.note import NoteVerifier
    from ubc.witness.app import create_witness_app
    from ubc.witness.protocol import Witness, parse_log_option
    from ubc.witness.store import WitnessStore

    cosigner = _cosigner(name, _load_key(key))
    if not log:
        _fail("give at least one --log ORIGIN=VKEY: a witness cosigns only logs it knows")
    logs: dict[str, list[NoteVerifier]] = {}
    for item in log:
        try:
            origin, verifier = parse_log_option(item)
        except ValueError as exc:
            _fail(f"--log {exc}")
        keys = logs.setdefault(origin, [])
        if any(k.vkey == verifier.vkey for k in keys):
            _fail(f"--log {origin}: the same vkey is given twice")
        keys.append(verifier)
    try:
        engine = make_engine(database_url)
        store = WitnessStore(engine)
        store.create()
    except (ArgumentError, ValueError) as exc:
        _fail(f"--database-url {database_url!r} is not a database URL: {exc}")
    except SQLAlchemyError as exc:
        _fail(f"cannot open the database {database_url!r}: {str(exc).splitlines()[0]}")
    app = create_witness_app(Witness(cosigner, logs, store))
    console.print(f"Witness {escape(name)}, vkey {cosigner.vkey}", soft_wrap=True)
    for origin in sorted(logs):
        console.print(f"  witnessing {escape(origin)}", soft_wrap=True)
    console.print(f"Serving POST /add-checkpoint on http://{host}:{port}")
    try:
        uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info")
    finally:
        engine.dispose()


def _load_key(path: Path) -> SigningKey:
    try:
        return load_signing_key(path)
    except FileNotFoundError:
        _fail(f"no key file at {path} (make one with `ubc witness init`)")
    except (OSError, ValueError) as exc:
        _fail(f"cannot read the key {path}: {exc}")


def _cosigner(name: str, signing_key: SigningKey) -> Cosigner:
    try:
        return Cosigner(name, signing_key)
    except ValueError as exc:
        _fail(f"--name {name!r}: {exc}")


def _fail(message: str) -> NoReturn:
    """One line on stderr and exit status 1."""
    Console(stderr=True).print(f"[red]Error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=1)
