"""The members' command line end to end against a real server, one config dir per person."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

from typer.testing import CliRunner, Result

from tests.conftest import LiveServer
from ubc.cli import app as cli
from ubc.client import UbcClient

runner = CliRunner()


class Person:
    """Someone at their own terminal: their own config dir, and no stray settings."""

    def __init__(self, config_dir: Path, **env: str) -> None:
        self.config_dir = config_dir
        self.env: dict[str, str | None] = {
            "UBC_CONFIG_DIR": str(config_dir),
            "UBC_SERVER": None,
            "UBC_TOKEN": None,
            "UBC_DATA_DIR": str(config_dir / "no-data-dir"),
            "COLUMNS": "120",
            **env,
        }

    def run(self, *args: str) -> Result:
        result = runner.invoke(cli, list(args), env=self.env)
        # Failures are a red line and exit status 1, never a traceback.
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.output
        return result

    def ok(self, *args: str) -> str:
        result = self.run(*args)
        assert result.exit_code == 0, result.output
        return result.stdout

    def fails(self, *args: str) -> str:
        result = self.run(*args)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("Error: ")
        return " ".join(result.stderr.split())

    def config(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.config_dir / "config.json").read_text())
        return data


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def entry(output: str) -> int:
    found = re.search(r"\(journal entry (\d+)\)", output)
    assert found, output
    return int(found.group(1))


def cu(client: UbcClient, address: str) -> int:
    [balance] = [b for b in client.balance(address)["balances"] if b["asset"] == "CU"]
    return balance["available"]


def test_members_register_get_admitted_funded_and_send(
    live_server: LiveServer, tmp_path: Path
) -> None:
    alice = Person(tmp_path / "alice")
    bob = Person(tmp_path / "bob", UBC_SERVER=live_server.url)
    # The operator's key is found in $UBC_DATA_DIR, as on the server's own machine.
    op = Person(tmp_path / "op", UBC_DATA_DIR=str(live_server.data_dir))

    out = alice.ok("keys", "new", "--handle", "alice", "--server", live_server.url)
    assert "Created your member key" in out
    assert "ubc member register" in out
    key_file = alice.config_dir / "member.key"
    assert mode(key_file) == 0o600
    # Paths inside the config dir are kept relative to it (the directory may move).
    assert alice.config() == {"handle": "alice", "key": "member.key", "server": live_server.url}
    assert "already exists" in alice.fails("keys", "new", "--handle", "alice")
    bob.ok("keys", "new", "--handle", "bob")
    assert "must be 3 to 32" in Person(tmp_path / "x").fails("keys", "new", "--handle", "X")

    out = alice.ok("member", "register", "--display-name", "Alice")
    assert "Registered member:alice (journal entry 1)." in out
    assert "ubc member admit alice --tier <tier>" in out
    bob.ok("member", "register")
    assert "taken" in bob.fails("member", "register")

    assert "member alice is not admitted yet" in alice.fails("send", "bob", "5")

    # The operator admits with an explicit key path, and with the one in $UBC_DATA_DIR.
    operator_key = str(live_server.data_dir / "operator.key")
    admit = ("member", "admit", "alice", "--tier", "basic", "--operator-key", operator_key)
    out = op.ok(*admit, "--server", live_server.url)
    assert out.startswith("Admitted member:alice into tier basic (journal entry ")
    op.ok("member", "admit", "bob", "--tier", "basic", "--server", live_server.url)
    assert "no operator key" in alice.fails("member", "admit", "bob", "--tier", "basic")
    assert "already admitted" in op.fails(
        "member", "admit", "bob", "--tier", "basic", "--server", live_server.url
    )

    out = op.ok("deposit", "alice", "100", "--ref", "wire-1", "--server", live_server.url)
    assert out.startswith("Deposited 100 CU to member:alice (journal entry ")
    # The same deposit again is done already; another under the same --ref is a conflict.
    again = op.ok("deposit", "member:alice", "100", "--ref", "wire-1", "--server", live_server.url)
    assert again.startswith("Already done: deposit 'wire-1' credited 100 CU to member:alice")
    assert "conflict: --ref wire-1 was already used for 100 CU to member:alice" in op.fails(
        "deposit", "member:alice", "101", "--ref", "wire-1", "--server", live_server.url
    )

    # API keys: shown once, kept by label in the config dir (0600) for reading.
    assert "nothing to read with" in alice.fails("balance")
    out = alice.ok("apikey", "create", "--label", "laptop")
    secret = out.strip().splitlines()[-1]
    assert secret.startswith("ubc_sk_")
    api_key_file = alice.config_dir / "api_keys" / "laptop"
    assert api_key_file.read_text().strip() == secret
    assert mode(api_key_file) == 0o600
    assert mode(alice.config_dir / "config.json") == 0o600
    assert alice.config()["api_key"] == "api_keys/laptop"
    bob.ok("apikey", "create", "--scopes", "read")

    out = alice.ok("send", "bob", "30", "--memo", "lunch")
    sent = entry(out)
    assert out.strip() == f"Sent 30 CU to member:bob (journal entry {sent})."
    message = alice.fails("send", "member:bob", "1000")
    assert "member:alice has 70 CU available, 1000 needed" in message
    assert "no account member:nobody" in alice.fails("send", "nobody", "1")
    assert "must be a positive integer, not 'lots'" in alice.fails("send", "bob", "lots")

    assert alice.ok("balance").strip() == "member:alice has 70 CU, $0.00 available."
    assert bob.ok("balance").strip() == "member:bob has 30 CU, $0.00 available."
    assert "may not read member:bob" in alice.fails("balance", "bob")
    bob.ok("send", "alice", "5", "--memo", "change")

    history = alice.ok("history")
    assert "History of member:alice" in history
    rows = [
        [cell.strip() for cell in line.strip("│ ").split("│")[1:]]
        for line in history.splitlines()
        if " CU " in line
    ]
    assert rows == [
        ["transfer", "+5 CU", "member:bob", "75 CU", "change"],
        ["transfer", "-30 CU", "member:bob", "70 CU", "lunch"],
        ["deposit", "+100 CU", "system:deposits", "100 CU", "external_ref wire-1"],
    ]
    assert "--limit for more" in alice.ok("history", "--limit", "1")
    assert "no account member:carol" in op.fails("history", "carol", "--server", live_server.url)

    # The balances the CLI printed are the ledger's: read them back through the client.
    with UbcClient(live_server.url, token=live_server.operator_token) as reader:
        assert cu(reader, "member:alice") == 75
        assert cu(reader, "member:bob") == 25
        lunch = reader.history("alice")["items"][1]
        [leg] = reader.transfer(lunch["transfer_id"])["transfers"]
        assert (leg["debit"], leg["credit"], leg["amount"], leg["memo"]) == (
            "member:alice",
            "member:bob",
            30,
            "lunch",
        )
    with UbcClient(live_server.url, token=secret) as own:
        assert cu(own, "member:alice") == 75
