"""Alembic's ``upgrade head`` on an empty database gives exactly the models' schema, and
the scripts are found from a checkout (``alembic upgrade head``) as from ubc
(``ubc db upgrade``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_URL, _admin_conninfo
from ubc import migrations
from ubc.db import make_engine
from ubc.migrations import current_revision, head_revision, upgrade
from ubc.models import metadata

ROOT = Path(__file__).resolve().parent.parent


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


# --- alembic's own command line, from the checkout --------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two empty databases of one engine; PostgreSQL's as a provider hands the URL out
    (``postgresql://``, no driver), which ubc and alembic/env.py both normalise."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
        return
    request.getfixturevalue("postgres_template")  # skips (or fails) without PostgreSQL
    names = [f"ubc_mig_{os.getpid()}_{which}" for which in ("a", "b")]
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
    bare = make_url(POSTGRES_URL).set(drivername="postgresql")
    a, b = (bare.set(database=name).render_as_string(hide_password=False) for name in names)
    yield a, b
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run(argv: list[str], url: str, tmp_path: Path) -> None:
    env = {**os.environ, "UBC_DATABASE_URL": url, "UBC_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _schema(engine: Engine) -> dict[str, Any]:
    inspector = inspect(engine)
    return {
        table: sorted(
            (column["name"], str(column["type"]), column["nullable"])
            for column in inspector.get_columns(table)
        )
        for table in sorted(inspector.get_table_names())
    }


def test_alembic_upgrade_head_from_the_checkout(
    empty_urls: tuple[str, str], tmp_path: Path
) -> None:
    by_alembic, by_ubc = empty_urls
    _run([sys.executable, "-m", "alembic", "upgrade", "head"], by_alembic, tmp_path)
    _run(
        [sys.executable, "-c", "from ubc.cli import main; main()", "db", "upgrade"],
        by_ubc,
        tmp_path,
    )
    alembic_engine, ubc_engine = make_engine(by_alembic), make_engine(by_ubc)
    try:
        assert current_revision(alembic_engine) == current_revision(ubc_engine) == head_revision()
        with alembic_engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
        assert _schema(alembic_engine) == _schema(ubc_engine)
    finally:
        alembic_engine.dispose()
        ubc_engine.dispose()


def test_the_checkout_keeps_alembic_where_alembic_users_look() -> None:
    assert (ROOT / "alembic.ini").is_file()
    assert migrations.script_location() == ROOT / "alembic"
    assert not (ROOT / "alembic" / "__init__.py").exists()  # would shadow the library


def test_an_installed_ubc_finds_its_packaged_scripts(tmp_path: Path) -> None:
    """In a wheel the scripts are ubc/_alembic, next to which (in site-packages) lies the
    Alembic library's own ``alembic`` package: the packaged copy wins, the library is
    never taken for ubc's scripts."""
    site = tmp_path / "site-packages"
    packaged = site / "ubc" / "_alembic"
    (packaged / "versions").mkdir(parents=True)
    (packaged / "env.py").touch()
    (site / "alembic").mkdir()
    (site / "alembic" / "__init__.py").touch()
    library = site / "alembic"
    assert migrations.script_location((packaged, library)) == packaged
    with pytest.raises(RuntimeError, match="migration scripts are missing"):
        migrations.script_location((site / "ubc" / "_missing", library))
