"""Alembic environment: migrates the database given by the caller or the settings.

Run three ways, all with these scripts: ``alembic upgrade head`` from a checkout (the
root ``alembic.ini``), ``ubc db upgrade`` / ``ubc serve`` (``ubc.migrations.upgrade``,
which passes its own connection), and the same from an installed wheel, where this
folder ships as ``ubc/_alembic``. Without a connection or a ``sqlalchemy.url`` the
database is ``$UBC_DATABASE_URL`` (default ``sqlite:///ubc.db``), normalised as the
service does it (``postgres://`` means psycopg 3).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from ubc.config import configured_database_url
from ubc.db import make_engine
from ubc.dburl import normalise_database_url
from ubc.models import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    if config.config_file_name is not None:
        # The alembic command line: its logging, as alembic.ini says.
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    configured = config.get_main_option("sqlalchemy.url")
    url = normalise_database_url(configured) if configured else configured_database_url()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("ubc's migrations run online only (no --sql)")
run_migrations_online()
