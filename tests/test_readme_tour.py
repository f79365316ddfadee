"""The README's tour, run verbatim (extracted from README.md itself) in a fresh directory,
on SQLite and on PostgreSQL, each line through bash as a newcomer would type it.

Only the port changes (``ubc serve`` gets ``--port N``, ``localhost:8000`` becomes that
port, and ``UBC_SERVER`` points the CLI at it), so that tests can run side by side. The
terminal is 80 columns wide: no output may cut a word with an ellipsis.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_URL, REQUIRE_POSTGRES, _admin_conninfo, _postgres_problem

README = Path(__file__).resolve().parent.parent / "README.md"


def tour_lines() -> list[str]:
    """The commands of the ```sh block under "## A tour", comments and all."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## A tour\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```sh\n(.*?)\n```", section, re.DOTALL)
    assert found, "no ```sh block under ## A tour"
    return [line for line in found.group(1).splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """None for the default (``sqlite:///ubc.db`` in the tour's directory), else the URL of
    a fresh, empty PostgreSQL database (the tour's ``ubc serve`` migrates it)."""
    if request.param == "sqlite":
        yield None
        return
    problem = _postgres_problem()
    if problem is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL unreachable: {problem}")
        pytest.skip(f"PostgreSQL unreachable: {problem}")
    name = f"ubc_tour_{os.getpid()}_{tmp_path.name[-20:]}".replace("-", "_").lower()
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_readme_tour_runs_as_written(database: str | None, tmp_path: Path) -> None:
    lines = tour_lines()
    assert lines[0].startswith("ubc init")
    assert "ubc serve &" in lines[0]
    port = _free_port()
    directory = tmp_path / "tour"
    directory.mkdir()
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "ubc").exists(), "the ubc script is not installed next to python"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "COLUMNS": "80",
        "UBC_SERVER": f"http://127.0.0.1:{port}",
    }
    if database is not None:
        env["UBC_DATABASE_URL"] = database

    def as_typed(line: str) -> str:
        return line.replace("ubc serve", f"ubc serve --port {port}").replace(
            "localhost:8000", f"127.0.0.1:{port}"
        )

    server = subprocess.Popen(
        ["bash", "-c", as_typed(lines[0])],
        cwd=directory,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_until_ready(f"http://127.0.0.1:{port}/readyz")
        outputs = []
        for line in lines[1:]:
            done = subprocess.run(
                ["bash", "-c", as_typed(line)],
                cwd=directory,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            shown = f"$ {line}\n{done.stdout}{done.stderr}"
            assert done.returncode == 0, shown
            assert "Traceback" not in shown
            assert "Error" not in done.stderr, shown
            assert "…" not in shown, shown  # nothing cut at 80 columns
            outputs.append(shown)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    text = "\n".join(outputs)
    assert "Sent 30 CU to member:bob" in text
    assert "OK: " in text  # the audit found nothing
    assert (directory / "bob" / "member.key").exists()
    assert (directory / "journal.jsonl").exists()


def _wait_until_ready(url: str) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the tour's `ubc serve` did not get ready at {url}")
