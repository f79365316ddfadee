"""Database URLs as people paste them, turned into the URL SQLAlchemy needs.

Hosting providers hand out ``postgres://user:pw@host/db`` (Heroku's spelling) or
``postgresql://...`` without a driver; SQLAlchemy would refuse the first and pick
psycopg2 (not installed) for the second. ubc speaks to PostgreSQL through psycopg 3
only, so both mean ``postgresql+psycopg://``. Everything else is returned unchanged
(``sqlite:///ubc.db``, ``postgresql+psycopg://...``), as are URLs naming another
driver explicitly, which SQLAlchemy then reports on by itself.
"""

from __future__ import annotations

__all__ = [
    "POSTGRES_DRIVER",
    "missing_sqlite_file",
    "normalise_database_url",
]

POSTGRES_DRIVER = "postgresql+psycopg"
_BARE_POSTGRES = ("postgres", "postgresql")


def normalise_database_url(url: str) -> str:
    """``url`` with a bare ``postgres://`` or ``postgresql://`` scheme made
    ``postgresql+psycopg://``; surrounding whitespace is dropped; anything else unchanged.

    >>> normalise_database_url("postgres://u:p@db.example.com:5432/ubc")
    'postgresql+psycopg://u:p@db.example.com:5432/ubc'
    >>> normalise_database_url("sqlite:///ubc.db")
    'sqlite:///ubc.db'
    """
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in _BARE_POSTGRES:
        return f"{POSTGRES_DRIVER}://{rest}"
    return url


def missing_sqlite_file(url: str) -> str | None:
    """The file of a ``sqlite:///FILE`` URL when that file does not exist, else None.

    Opening it would create an empty database: a reader (an export, an audit) asks for an
    existing one. In-memory databases and anything but SQLite give None.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not url.lower().startswith("sqlite:"):
        return None
    try:
        database = make_url(url).database
    except ArgumentError:
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    from pathlib import Path

    return None if Path(database).exists() else database
