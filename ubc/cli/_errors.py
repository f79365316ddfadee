"""The one top-level handler of the ``ubc`` command line.

Every failure a user can cause or fix (a server that is not running, a file that is not
there, a database that cannot be opened, a setting that is wrong) becomes one red line
on stderr saying what to do, and exit status 1. Anything else is a bug: one line too,
naming the exception and pointing at ``UBC_DEBUG=1``, which prints the traceback (for
expected failures as well).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from types import TracebackType
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["CliError", "explain", "run"]

DEBUG_VARIABLE = "UBC_DEBUG"


class CliError(Exception):
    """A problem on this side (missing key, no handle); printed in red, exit status 1.

    Defined here, below the commands that raise it (``ubc.cli.member`` and the others
    import it from there), so that explaining an error imports no command module.
    """


def run(app: typer.Typer, args: Sequence[str] | None = None) -> NoReturn:
    """Run ``app`` (with ``args``, else ``sys.argv``) and exit; failures are one line."""
    try:
        app(args=list(args) if args is not None else None, prog_name="ubc")
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _print("Interrupted.")
        sys.exit(130)
    except Exception as exc:
        debug = os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
        message = explain(exc)
        if debug:
            traceback.print_exception(exc)
        if message is None:
            message = f"unexpected error: {type(exc).__name__}: {_first_line(exc)}"
            if not debug:
                message += f" (set {DEBUG_VARIABLE}=1 for the traceback)"
        _print(f"Error: {message}")
        sys.exit(1)
    sys.exit(0)  # pragma: no cover - click exits by itself in standalone mode


def explain(exc: BaseException) -> str | None:
    """One line saying what went wrong and what to do, or None for an unexpected error."""
    import httpx
    import pydantic
    from sqlalchemy import exc as sa

    from ubc.client import UbcApiError

    if isinstance(exc, CliError):
        return str(exc)
    if isinstance(exc, UbcApiError):
        return exc.message or f"the ledger answered {exc.status} {exc.type}"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return f"cannot reach the server at {_server(exc)}: is `ubc serve` running?"
    if isinstance(exc, httpx.TimeoutException):
        return f"the server at {_server(exc)} did not answer in time; try again"
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return f"not a server URL ({_first_line(exc)}): give one like http://127.0.0.1:8000"
    if isinstance(exc, httpx.TransportError):
        return f"lost the connection to the server at {_server(exc)}: {_first_line(exc)}"
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {exc.filename}" if exc.filename else f"no such file: {exc}"
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename} is a directory, not a file"
    if isinstance(exc, NotADirectoryError):
        return f"{exc.filename}: a part of this path is not a directory"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc}"
    if isinstance(exc, sa.OperationalError):
        where = _database_url(exc.__traceback__)
        reason = _db_reason(exc)
        hint = ""
        if "does not exist" in reason and where and where.startswith("postgresql"):
            hint = f" (create it: createdb {where.rsplit('/', 1)[-1].split('?')[0]})"
        return f"cannot open the database{' ' + where if where else ''}: {reason}{hint}"
    if isinstance(exc, sa.NoSuchModuleError):
        return (
            f"unknown kind of database URL ({_first_line(exc)}): use sqlite:///FILE or "
            "postgresql://USER@HOST/DB"
        )
    if isinstance(exc, sa.ArgumentError):
        return f"not a database URL: {_first_line(exc)}"
    if isinstance(exc, pydantic.ValidationError):
        problems = "; ".join(
            f"UBC_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        return f"invalid setting: {problems}"
    if _is_setup_error(exc):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return None


def _is_setup_error(exc: BaseException) -> bool:
    from ubc.gateway.catalog import ModelsFileError
    from ubc.runtime import SetupError

    return isinstance(exc, ModelsFileError | SetupError)


def _server(exc: BaseException) -> str:
    import httpx

    try:
        request = exc.request if isinstance(exc, httpx.RequestError) else None
    except RuntimeError:  # no request attached
        request = None
    if request is None:
        return "the configured URL"
    url = request.url
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"


def _database_url(tb: TracebackType | None) -> str | None:
    """The URL (password hidden) of the engine whose connection failed, found in the stack."""
    from sqlalchemy import Engine

    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, Engine):
            return candidate.url.render_as_string(hide_password=True)
        engine = tb.tb_frame.f_locals.get("engine")
        if isinstance(engine, Engine):
            return engine.url.render_as_string(hide_password=True)
        tb = tb.tb_next
    return None


def _db_reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    reason = " ".join(str(orig if orig is not None else exc).split())
    return reason.removeprefix("connection failed: ")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _print(text: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]{escape(text)}[/red]")
