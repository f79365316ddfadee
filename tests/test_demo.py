"""`ubc demo` tells the whole story on a fresh SQLite ledger, and its audit finds nothing."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from ubc.cli import app


def test_the_demo_runs_and_its_audit_is_clean(tmp_path: Path) -> None:
    directory = str(tmp_path / "demo")
    result = CliRunner().invoke(app, ["demo", "--dir", directory], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for step in (
        "Four members join",
        "The operator opens epoch 1",
        "Alice spends compute through the OpenAI SDK",
        "Alice sends 150 CU to Bob",
        "The cause spends its compute",
        "Carol sells compute; Bob buys some",
        "The operator closes epoch 1",
        "The utilization report",
        "no findings.",
    ):
        assert step in text
    entries = (tmp_path / "demo" / "journal.jsonl").read_text().splitlines()[1:]
    seqs = [json.loads(line)["seq"] for line in entries]
    assert seqs == list(range(len(entries)))
    # A second run into the same directory refuses to mix ledgers.
    again = CliRunner().invoke(app, ["demo", "--dir", directory])
    assert again.exit_code == 1
    assert "already holds a ledger" in " ".join(again.output.split())
