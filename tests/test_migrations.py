"""Alembic's ``upgrade head`` on an empty database gives exactly the models' schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from ubc.db import make_engine
from ubc.migrations import current_revision, head_revision, upgrade
from ubc.models import metadata


def test_upgrade_head_matches_the_models(engine: Engine) -> None:
    # The db_url fixture's database was migrated by `upgrade` from empty.
    assert current_revision(engine) == head_revision()
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, metadata)
    assert differences == []
    tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
    assert tables == set(metadata.tables)


def test_upgrade_is_idempotent(engine: Engine) -> None:
    upgrade(engine)
    assert current_revision(engine) == head_revision()


def test_empty_database_upgrades_from_nothing(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


@pytest.mark.parametrize("pragma", ["journal_mode", "synchronous", "foreign_keys"])
def test_sqlite_runs_durable_wal(tmp_path: Path, pragma: str) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        with engine.connect() as connection:
            value = connection.exec_driver_sql(f"PRAGMA {pragma}").scalar()
        assert value == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}[pragma]
    finally:
        engine.dispose()
