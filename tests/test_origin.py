"""The ledger origin is unique per installation (issue 12): ``ubc init`` chooses and
records one, the server uses it, an envelope signed for one installation is refused by
another, and ``ubc serve`` refuses the shared default on a public interface."""

from __future__ import annotations

import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from tests.test_connections import serve
from ubc import serving
from ubc.cli import app as cli
from ubc.client import UbcApiError, UbcClient
from ubc.config import Settings, get_settings
from ubc.db import make_engine, make_session_factory
from ubc.runtime import DEFAULT_ORIGIN, SetupError, find_origin, load_runtime, resolve_origin
from ubc.serving import ServerConfig
from ubc.signing import encode_public_key, generate_signing_key

runner = CliRunner()


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    """The CLI reads ``get_settings()`` (cached): let each run see its own environment."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def ubc(*args: str, **env: str | None) -> Result:
    get_settings.cache_clear()
    result = runner.invoke(cli, list(args), env={"UBC_ORIGIN": None, "COLUMNS": "200", **env})
    # Failures are a red line and exit status 1, never a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def init(data_dir: Path, *args: str, **env: str | None) -> str:
    result = ubc("init", "--data-dir", str(data_dir), *args, **env)
    assert result.exit_code == 0, result.output
    return result.stdout


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: "), result.stderr
    return " ".join(result.stderr.split())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """What `ubc serve` would have run (nothing is served)."""
    configs: list[ServerConfig] = []
    monkeypatch.setattr(serving, "run", configs.append)
    return configs


# --- ubc init ------------------------------------------------------------------------------


def test_init_writes_an_origin_unique_to_each_installation(tmp_path: Path) -> None:
    out_a = init(tmp_path / "a")
    out_b = init(tmp_path / "b")
    origin_a = (tmp_path / "a" / "origin").read_text().strip()
    origin_b = (tmp_path / "b" / "origin").read_text().strip()
    assert origin_a != origin_b
    assert origin_a.split("/")[1].startswith("ubc-")
    assert mode(tmp_path / "a" / "origin") == 0o600
    assert f"Ledger origin: {origin_a}" in out_a
    assert f"Ledger origin: {origin_b}" in out_b
    assert f"(vkey): {origin_a}+" in out_a  # the checkpoint key name is the origin
    # The server would use exactly that.
    assert resolve_origin(Settings(data_dir=tmp_path / "a")) == origin_a


def test_init_takes_an_origin_and_never_changes_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert "Ledger origin: ubc.example.org/ledger" in init(
        data, "--origin", "ubc.example.org/ledger"
    )
    assert (data / "origin").read_text() == "ubc.example.org/ledger\n"
    # Kept on the next start; the same origin again is fine, another one is refused.
    assert "keeping them" in init(data, "--keep-existing")
    init(data, "--keep-existing", "--origin", "ubc.example.org/ledger")
    refused = one_line_error(
        ubc("init", "--data-dir", str(data), "--keep-existing", "--origin", "x/y")
    )
    assert "already names the ledger 'ubc.example.org/ledger'" in refused
    assert (data / "origin").read_text() == "ubc.example.org/ledger\n"
    # A new init refuses to overwrite the origin like the keys.
    again = ubc("init", "--data-dir", str(data))
    assert again.exit_code == 1
    assert str(data / "origin") in " ".join(again.output.split())


def test_init_takes_the_origin_from_ubc_origin(tmp_path: Path) -> None:
    init(tmp_path / "data", UBC_ORIGIN="env.example/ledger")
    assert (tmp_path / "data" / "origin").read_text() == "env.example/ledger\n"


@pytest.mark.parametrize("bad", ["with space/x", "a+b/c", "", "tab\there"])
def test_init_refuses_an_invalid_origin(tmp_path: Path, bad: str) -> None:
    result = ubc("init", "--data-dir", str(tmp_path / "data"), "--origin", bad)
    assert "is not a valid ledger origin" in one_line_error(result)
    assert not (tmp_path / "data").exists()


def test_keys_without_an_origin_file_keep_working_as_before(tmp_path: Path) -> None:
    """Keys made before `ubc init` wrote origins: nothing is chosen for them (a ledger may
    already be running under the default), the operator is told what to do."""
    data = tmp_path / "data"
    init(data)
    (data / "origin").unlink()
    out = " ".join(init(data, "--keep-existing").split())
    assert "the ledger origin is the default 'localhost/ubc'" in out
    assert "set UBC_ORIGIN" in out
    assert not (data / "origin").exists()
    assert find_origin(Settings(data_dir=data)).is_bare_default
    # Recording one for such keys is explicit.
    init(data, "--keep-existing", "--origin", "legacy.example/ubc")
    assert resolve_origin(Settings(data_dir=data)) == "legacy.example/ubc"


# --- resolution ----------------------------------------------------------------------------


def test_the_origin_is_ubc_origin_then_the_origin_file_then_the_default(tmp_path: Path) -> None:
    choice = find_origin(Settings(data_dir=tmp_path))
    assert (choice.origin, choice.source, choice.is_bare_default) == (
        DEFAULT_ORIGIN,
        "default",
        True,
    )
    (tmp_path / "origin").write_text("file.example/ledger\n")
    choice = find_origin(Settings(data_dir=tmp_path))
    assert (choice.origin, choice.source) == ("file.example/ledger", "origin file")
    # Set explicitly, even to the default's value, UBC_ORIGIN wins.
    choice = find_origin(Settings(data_dir=tmp_path, origin="localhost/ubc"))
    assert (choice.origin, choice.source, choice.is_bare_default) == (
        "localhost/ubc",
        "UBC_ORIGIN",
        False,
    )
    (tmp_path / "origin").write_text("two words\n")
    with pytest.raises(SetupError, match="is not a valid ledger origin"):
        find_origin(Settings(data_dir=tmp_path))


def test_a_ledger_keeps_the_origin_of_its_genesis(
    tmp_path: Path, sqlite_template: Path, ran: list[ServerConfig]
) -> None:
    data = tmp_path / "data"
    init(data, "--origin", "first.example/ledger")
    database = tmp_path / "ubc.db"
    shutil.copyfile(sqlite_template, database)
    url = f"sqlite:///{database}"
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    try:
        with sessions() as session:
            runtime = load_runtime(Settings(database_url=url, data_dir=data), session)
            session.commit()
        assert runtime.info["origin"] == "first.example/ledger"
        with sessions() as session, pytest.raises(SetupError) as caught:
            load_runtime(Settings(database_url=url, data_dir=data, origin="other/x"), session)
    finally:
        engine.dispose()
    message = (
        "this database holds ledger 'first.example/ledger', not 'other/x' (from UBC_ORIGIN): "
        "set UBC_ORIGIN=first.example/ledger to serve it"
    )
    assert str(caught.value) == message
    # `ubc serve` says it in one line before starting anything.
    env = {"UBC_DATABASE_URL": url, "UBC_DATA_DIR": str(data)}
    refused = ubc("serve", "--no-migrate", UBC_ORIGIN="other/x", **env)
    assert one_line_error(refused) == f"Error: {message}"
    assert ran == []
    assert ubc("serve", "--no-migrate", **env).exit_code == 0
    assert len(ran) == 1


# --- one envelope, one ledger ---------------------------------------------------------------


def test_an_envelope_for_one_installation_is_refused_by_another(
    tmp_path: Path, sqlite_template: Path
) -> None:
    installations = []
    for name in ("a", "b"):
        init(tmp_path / name)
        database = tmp_path / f"{name}.db"
        shutil.copyfile(sqlite_template, database)
        # No origin in the settings: each server reads its data dir's, as `ubc serve` does.
        installations.append(
            Settings(database_url=f"sqlite:///{database}", data_dir=tmp_path / name)
        )
    key = generate_signing_key()
    with serve(installations[0]) as (host, port_a), serve(installations[1]) as (_, port_b):
        url_a, url_b = f"http://{host}:{port_a}", f"http://{host}:{port_b}"
        # The member's client learns A's origin from GET /api/ledger and signs for it.
        with UbcClient(url_a, key=key) as on_a:
            assert on_a.origin == (tmp_path / "a" / "origin").read_text().strip()
            envelope = on_a.envelope(
                "member.register",
                actor="member:alice",
                handle="alice",
                public_key=encode_public_key(bytes(key.verify_key)),
            )
            assert on_a.submit(envelope)["type"] == "member.register"
        with UbcClient(url_b) as on_b:
            assert on_b.origin == (tmp_path / "b" / "origin").read_text().strip()
            with pytest.raises(UbcApiError) as caught:
                on_b.submit(envelope)
    assert caught.value.status == 400
    assert caught.value.message.startswith(f"envelope is for ledger {on_a.origin!r}")
    assert caught.value.detail == {"ledger": on_a.origin, "expected": on_b.origin}


# --- ubc serve ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "ubc.example.org"])
def test_serve_refuses_the_default_origin_on_a_public_interface(
    tmp_path: Path, ran: list[ServerConfig], host: str
) -> None:
    result = ubc("serve", "--no-migrate", "--host", host, UBC_DATA_DIR=str(tmp_path))
    error = one_line_error(result)
    assert error == (
        f"Error: refusing to serve on {host} with the default ledger origin 'localhost/ubc', "
        "which other installations share: run `ubc init` or set UBC_ORIGIN (docs/origin.md)"
    )
    assert len(result.stderr.strip().splitlines()) == 1
    assert ran == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_serve_on_loopback_keeps_the_default(
    tmp_path: Path, ran: list[ServerConfig], host: str
) -> None:
    result = ubc("serve", "--no-migrate", "--host", host, UBC_DATA_DIR=str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "Serving ledger localhost/ubc" in result.stdout
    assert len(ran) == 1


def test_serve_on_a_public_interface_with_a_chosen_origin(
    tmp_path: Path, ran: list[ServerConfig]
) -> None:
    init(tmp_path / "data")
    origin = (tmp_path / "data" / "origin").read_text().strip()
    result = ubc("serve", "--no-migrate", "--host", "0.0.0.0", UBC_DATA_DIR=str(tmp_path / "data"))
    assert result.exit_code == 0, result.output
    assert f"Serving ledger {origin} on http://0.0.0.0:8000" in result.stdout
    # The default chosen on purpose (a ledger started with it before) is served, with a
    # warning.
    result = ubc(
        "serve",
        "--no-migrate",
        "--host",
        "0.0.0.0",
        UBC_DATA_DIR=str(tmp_path),
        UBC_ORIGIN=DEFAULT_ORIGIN,
    )
    assert result.exit_code == 0, result.output
    assert "is shared by every installation that keeps it" in " ".join(result.stdout.split())
    assert len(ran) == 2
