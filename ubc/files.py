"""Files that hold ledger data are created readable by their owner only (mode 0600).

The process umask usually leaves new files world-readable (0644). The journal, the
balances and an audit export are not public: :func:`open_private` writes a file that
nobody else can read, whatever the umask, and :func:`create_private_sqlite` creates a
SQLite database file 0600 before SQLite first opens it, so that its ``-wal`` and
``-shm`` files (which SQLite creates with the mode of the database file) are 0600 too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO

from sqlalchemy.engine import make_url

PRIVATE_MODE = 0o600


def open_private(path: str | os.PathLike[str], *, encoding: str = "utf-8") -> IO[str]:
    """Open ``path`` for writing text, truncated, with mode 0600.

    A new file is created 0600; an existing one is narrowed to 0600 before anything is
    written to it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    try:
        if _is_regular(fd):
            os.fchmod(fd, PRIVATE_MODE)
        return os.fdopen(fd, "w", encoding=encoding)
    except BaseException:
        os.close(fd)
        raise


def create_private(path: str | os.PathLike[str]) -> bool:
    """Create ``path`` empty with mode 0600 if it does not exist; True if it was created.

    An existing file is left as it is (its owner chose its mode).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, or None for an in-memory or ``file:`` URI database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    if parsed.query.get("uri") in ("true", "1"):
        return None
    return Path(database)


def create_private_sqlite(url: str) -> None:
    """Create the database file of a SQLite ``url`` with mode 0600 if it does not exist.

    An empty file is a valid empty SQLite database. Call it before the first connection
    (``ubc.db.make_engine``); a missing directory is left for SQLite to report.
    """
    path = sqlite_path(url)
    if path is None or not path.parent.is_dir():
        return
    create_private(path)


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)
