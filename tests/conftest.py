"""Fixtures: every database test runs on SQLite and on PostgreSQL, each in its own database.

A migrated template is built once per engine and session; each test gets a copy (a
file copy on SQLite, ``CREATE DATABASE ... TEMPLATE`` on PostgreSQL), so tests never
share state or depend on order, and concurrency tests can use many connections.

PostgreSQL comes from ``UBC_TEST_POSTGRES_URL`` (default: the local server). Where it
cannot be reached the PostgreSQL half is skipped with a message, unless
``UBC_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), which turns that into a failure.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from nacl.signing import SigningKey
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from ubc.app import create_app
from ubc.clock import Clock, ManualClock
from ubc.config import Settings, get_settings
from ubc.db import make_engine, make_session_factory
from ubc.migrations import upgrade
from ubc.signing import generate_signing_key, load_signing_key, write_signing_key, write_token

settings.register_profile(
    "ubc",
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("ubc")


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    """Settings are cached per process (``get_settings``): each test reads its own
    environment, whatever ran before it."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


POSTGRES_URL = os.environ.get(
    "UBC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("UBC_REQUIRE_POSTGRES") == "1"
_counter = itertools.count()


def _admin_conninfo() -> str:
    url = make_url(POSTGRES_URL)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _postgres_problem() -> str | None:
    try:
        with psycopg.connect(_admin_conninfo(), connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return str(exc).strip()


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    problem = _postgres_problem()
    if problem is not None:
        message = f"PostgreSQL at {POSTGRES_URL} unreachable ({problem})"
        if REQUIRE_POSTGRES:
            pytest.fail(message + "; UBC_REQUIRE_POSTGRES=1 makes it mandatory")
        pytest.skip(message + "; set UBC_TEST_POSTGRES_URL to run the PostgreSQL half")
    name = f"ubc_tpl_{os.getpid()}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    yield name
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "ubc.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, migrated database of each engine."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "ubc.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    template_name: str = request.getfixturevalue("postgres_template")
    name = f"ubc_t_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"')
    yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is rolled back at the end of the test."""
    session = sessions()
    yield session
    session.rollback()
    session.close()


# --- a real server on loopback -------------------------------------------------------------


@dataclass
class LiveServer:
    """A ubc server in a background thread, with its data dir and keys."""

    url: str
    db_url: str
    data_dir: Path
    settings: Settings
    app: FastAPI

    @property
    def clock(self) -> ManualClock:
        """The server's clock, when it was started with a :class:`ManualClock`."""
        clock = self.app.state.clock
        assert isinstance(clock, ManualClock), "this server reads the wall clock"
        return clock

    @property
    def operator_key(self) -> SigningKey:
        return load_signing_key(self.data_dir / "operator.key")

    @property
    def ledger_key(self) -> SigningKey:
        return load_signing_key(self.data_dir / "ledger.key")

    @property
    def operator_token(self) -> str:
        return (self.data_dir / "operator.token").read_text().strip()

    @property
    def auditor_token(self) -> str:
        return (self.data_dir / "auditor.token").read_text().strip()


def make_data_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in ("ledger.key", "operator.key"):
        write_signing_key(path / name, generate_signing_key())
    for name in ("operator.token", "auditor.token"):
        write_token(path / name)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_server(
    db_url: str,
    data_dir: Path,
    *,
    clock: Clock | None = None,
    port: int | None = None,
    graceful_shutdown: float | None = None,
    **overrides: object,
) -> Iterator[LiveServer]:
    """A served ledger in a thread; ``clock``: its time (a ManualClock moves only when
    the test moves it), else the wall clock; ``port``: the port (a free one by default:
    give the same again to restart a server where its clients know it);
    ``graceful_shutdown``: how long a stopping server lets open responses (journal
    streams) run before it cuts them, as ``ubc serve`` does after 10 s (by default
    uvicorn's: until they end); ``overrides``: settings."""
    settings = Settings(
        database_url=db_url,
        data_dir=data_dir,
        origin="test.ubc/ledger",
        **overrides,  # type: ignore[arg-type]
    )
    app = create_app(settings, clock=clock)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port or _free_port(),
        log_level="warning",
        timeout_graceful_shutdown=graceful_shutdown,
    )
    with serve_in_thread(config) as url:
        yield LiveServer(url, db_url, data_dir, settings, app)


@contextlib.contextmanager
def serve_in_thread(config: uvicorn.Config) -> Iterator[str]:
    """``config``'s server in a background thread: its base URL once it has started; it
    is stopped at the end."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the test server on port {config.port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{config.host}:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def answers(process: subprocess.Popen[bytes], url: str, path: str, timeout: float = 60) -> bool:
    """Whether the server ``process`` (a ``ubc serve`` started by a test) answers 200 at
    ``url + path`` within ``timeout`` seconds; False as soon as it has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return True
        if process.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def serve_asgi(app: Any, port: int | None = None) -> contextlib.AbstractContextManager[str]:
    """Any ASGI application (a witness, a proxy) on loopback in a thread, on ``port`` or a
    free one: its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port or _free_port(), log_level="warning")
    return serve_in_thread(config)


@pytest.fixture
def live_server(db_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    """A served ledger (invite enrollment) on a fresh database of each engine."""
    with run_server(db_url, make_data_dir(tmp_path / "data")) as server:
        yield server


# --- a real browser --------------------------------------------------------------------------

CHROMIUM = os.environ.get("UBC_TEST_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium driven by Playwright (its own browser download is not used), one
    per test module: Playwright's sync API runs an event loop in the main thread while it
    is open, so that a later module's ``asyncio.run`` would fail if it stayed open.
    Missing, the browser tests are skipped, or fail under ``UBC_REQUIRE_BROWSER=1``
    (set by .ci/run, which installs chromium with apt when it is missing)."""
    if not Path(CHROMIUM).exists():
        message = f"no chromium at {CHROMIUM} (apt-get install -y chromium)"
        if os.environ.get("UBC_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context and page (no cookies or storage shared between tests);
    every request the page sends is kept in ``page.sent`` (method, url, headers, body)
    so that a test can prove what left the browser."""
    from tests.console_helpers import record_requests

    context = browser.new_context()
    page = record_requests(context.new_page())
    yield page
    context.close()
