"""The Alembic migrations, found wherever ubc runs from, and the calls ubc makes on them.

The scripts live in the repository's top-level ``alembic/`` (with ``alembic.ini`` at the
root, so ``alembic upgrade head`` works from a checkout). A wheel carries the same folder
inside the package as ``ubc/_alembic`` (setup.py maps it: a top-level ``alembic`` would
shadow the Alembic library), so ``ubc db upgrade`` and ``ubc serve`` migrate from an
installed ubc too. :func:`script_location` picks the packaged copy, else the checkout's.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

__all__ = [
    "alembic_config",
    "current_revision",
    "head_revision",
    "script_location",
    "upgrade",
]

PACKAGE = Path(__file__).resolve().parent.parent  # the ubc package's directory
PACKAGED = PACKAGE / "_alembic"  # inside an installed wheel
CHECKOUT = PACKAGE.parent / "alembic"  # a source checkout (editable install, PYTHONPATH)
#: The PostgreSQL advisory lock that serialises migrations of one database: several hosts
#: started at once (each ``ubc serve`` migrates) migrate in turn, and all but the first
#: find nothing left to do.
MIGRATION_LOCK_KEY = 0x75626320_6D696772  # "ubc migr"


def _is_script_directory(path: Path) -> bool:
    return (path / "env.py").is_file() and (path / "versions").is_dir()


def script_location(candidates: tuple[Path, ...] = (PACKAGED, CHECKOUT)) -> Path:
    """The first folder of ``candidates`` holding Alembic scripts (env.py and versions/).

    Installed, ``site-packages/alembic`` next to ubc is the Alembic library itself: it has
    no ``env.py``, so it is never mistaken for ubc's scripts.
    """
    for path in candidates:
        if _is_script_directory(path):
            return path
    searched = ", ".join(str(path) for path in candidates)
    raise RuntimeError(f"ubc's migration scripts are missing (searched {searched})")


def alembic_config(url: str | None = None) -> Config:
    """An Alembic configuration for ubc's scripts, with no ini file (no logging set-up)."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.set_main_option("path_separator", "os")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database behind ``engine`` to ``revision``."""
    config = alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Held until this transaction ends (the migration's own, DDL included).
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
