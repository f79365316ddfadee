"""The architecture, checked by the test suite (DESIGN section 2; issue 13, item 6).

1. Every import-linter contract of ``.importlinter``, one test each, run through the
   ``lint-imports`` command line exactly as a developer runs it. This test is the one
   place the contracts are enforced (``.ci/run`` runs pytest). A contract that the code
   breaks today is marked ``xfail(strict=True)`` with the reason: the test passes while
   the contract stays broken, and fails the moment the code keeps it, so that the marker
   is removed then and the contract holds from that commit on. Only a *broken* contract
   counts as the expected failure; a contract that cannot be checked (a misspelt or
   missing module, a syntax error) fails the test either way.
2. The client reaches only the modules it is meant to share with the server (an allow
   list, complementing the contract's deny list).
3. Only ``ubc/ledger`` writes the ledger's tables (import-linter cannot say this).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grimp
import pytest

from ubc.ledger.models import Account, Posting, Transfer

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ubc"
CONTRACTS = ROOT / ".importlinter"

# --- 1. the import-linter contracts -----------------------------------------------------


class ContractBroken(AssertionError):
    """lint-imports checked the contract and found it broken."""


def _lint_imports() -> list[str]:
    beside = Path(sys.executable).with_name("lint-imports")
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is missing: install the test extra (import-linter)")
    return [found]


def _check_contract(contract: str) -> None:
    result = subprocess.run(
        [*_lint_imports(), "--no-logo", "--no-cache", "--contract", contract, str(CONTRACTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        timeout=120,
        check=False,
    )
    report = result.stdout + result.stderr
    if result.returncode == 0 and "Contracts: 1 kept, 0 broken." in report:
        return
    if "Contracts: 0 kept, 1 broken." in report:
        raise ContractBroken(f"contract {contract!r} is broken:\n{report}")
    raise RuntimeError(f"lint-imports could not check contract {contract!r}:\n{report}")


def _broken_today(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(raises=ContractBroken, strict=True, reason=reason)


# Contract ids of .importlinter, each with its marker while the code still breaks it.
CONTRACT_IDS = [
    pytest.param("acyclic"),
    pytest.param("signing"),
    pytest.param("audit"),
    pytest.param("client"),
    pytest.param("rules-without-fastapi"),
    pytest.param("layers"),
]


@pytest.mark.parametrize("contract", CONTRACT_IDS)
def test_import_contract(contract: str) -> None:
    _check_contract(contract)


def test_every_contract_has_a_test() -> None:
    declared = set(re.findall(r"^\[importlinter:contract:([^\]]+)\]", CONTRACTS.read_text(), re.M))
    tested = {param.values[0] for param in CONTRACT_IDS}
    assert declared == tested


# --- 2. the client's allow list ---------------------------------------------------------

# What the HTTP client may import of ubc: the version, signing, and the pure payload
# formats (a module here imports only modules here and third-party libraries the
# client contract allows).
CLIENT_MAY_USE = {"ubc", "ubc.signing", "ubc.errors", "ubc.envelopes", "ubc.envelopes.payloads"}


def test_the_client_reaches_only_shared_modules() -> None:
    graph = grimp.build_graph("ubc", cache_dir=None)
    reached = {
        module
        for module in graph.find_upstream_modules("ubc.client", as_package=True)
        if not module.startswith("ubc.client")
    }
    signing = {m for m in reached if m.startswith("ubc.signing.")}
    assert reached - signing - CLIENT_MAY_USE == set()


# --- 3. only ubc/ledger writes the ledger tables ----------------------------------------
#
# The ledger's tables are ``accounts`` (with the balances), ``transfers`` and ``postings``
# (ubc/ledger/models.py). Every module of ubc outside ubc/ledger/ is read (the migrations
# live outside the package, in alembic/) and its syntax tree searched for a write:
#
# - SQL text (a string or f-string part, docstrings excepted) with ``INSERT INTO``,
#   ``UPDATE``, ``DELETE FROM``, ``TRUNCATE`` or ``COPY`` followed by a ledger table;
# - SQLAlchemy Core: ``insert(T)``, ``update(T)``, ``delete(T)`` (any module's, e.g.
#   ``sa.insert``, ``postgresql.insert``), ``T.insert()``, ``T.update()``, ``T.delete()``
#   and ``bulk_insert_mappings``/``bulk_update_mappings``, where ``T`` is a ledger model
#   class, its ``__table__``, a name assigned from one, ``table("transfers")`` or
#   ``metadata.tables["transfers"]``;
# - a call like ``driver.insert("transfers", ...)`` naming a ledger table;
# - the ORM: creating a ledger row (``Transfer(...)``), or assigning a balance column
#   (``account.debits_posted = ...``; those names exist only on the ledger's tables).
#
# Ledger model names are followed through ``from ubc.ledger.models import Account as A``,
# ``from ubc.ledger import models`` and ``import ubc.ledger.models as m``. Not seen: SQL
# assembled from variables (a table name passed in at run time), and writes through the
# ledger's own functions, which are the ledger writing.

LEDGER_MODELS = {model.__name__: str(model.__tablename__) for model in (Account, Transfer, Posting)}
LEDGER_TABLES = frozenset(LEDGER_MODELS.values())
BALANCE_COLUMNS = frozenset(
    {
        "debits_posted",
        "credits_posted",
        "debits_pending",
        "credits_pending",
        "balance_after",
        "available_after",
    }
)
_TABLES = "|".join(sorted(LEDGER_TABLES))
SQL_WRITE = re.compile(
    rf"\b(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM|TRUNCATE(?:\s+TABLE)?|COPY)\s+\"?(?:{_TABLES})\b",
    re.IGNORECASE,
)
WRITE_FUNCTIONS = frozenset(
    {"insert", "update", "delete", "bulk_insert_mappings", "bulk_update_mappings"}
)
LEDGER_MODULE = "ubc.ledger.models"


@dataclass(frozen=True)
class Write:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


class _LedgerWrites(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path = path
        self.writes: list[Write] = []
        self.model_names: dict[str, str] = {}  # local name -> ledger table
        self.module_names: set[str] = set()  # local names bound to ubc.ledger.models
        self.table_names: dict[str, str] = {}  # local name -> ledger table (aliases)
        self.docstrings: set[int] = set()

    def found(self, node: ast.AST, what: str) -> None:
        self.writes.append(Write(self.path, getattr(node, "lineno", 0), what))

    # names

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            local = alias.asname or alias.name
            if node.module == LEDGER_MODULE and alias.name in LEDGER_MODELS:
                self.model_names[local] = LEDGER_MODELS[alias.name]
            elif node.module == "ubc.ledger" and alias.name == "models":
                self.module_names.add(local)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == LEDGER_MODULE:
                self.module_names.add(alias.asname or LEDGER_MODULE)

    def ledger_model(self, node: ast.expr) -> str | None:
        """The table of the ledger model class ``node`` names, else None."""
        if isinstance(node, ast.Name):
            return self.model_names.get(node.id)
        if isinstance(node, ast.Attribute) and node.attr in LEDGER_MODELS:
            if ast.unparse(node.value) in self.module_names:
                return LEDGER_MODELS[node.attr]
        return None

    def ledger_table(self, node: ast.expr) -> str | None:
        """The ledger table ``node`` stands for (a model, its table, an alias), else None."""
        if (table := self.ledger_model(node)) is not None:
            return table
        if isinstance(node, ast.Name):
            return self.table_names.get(node.id)
        if isinstance(node, ast.Attribute) and node.attr == "__table__":
            return self.ledger_model(node.value)
        if isinstance(node, ast.Subscript) and _constant(node.slice) in LEDGER_TABLES:
            return _constant(node.slice)  # metadata.tables["transfers"]
        if isinstance(node, ast.Call):
            name = _called_name(node.func)
            if name == "table" and node.args and _constant(node.args[0]) in LEDGER_TABLES:
                return _constant(node.args[0])  # sqlalchemy.table("transfers", ...)
            if name == "cast" and len(node.args) == 2:
                return self.ledger_table(node.args[1])
        return None

    def _bind(self, targets: list[ast.expr], value: ast.expr | None) -> None:
        table = self.ledger_table(value) if value is not None else None
        for target in targets:
            if isinstance(target, ast.Name):
                if table is not None:
                    self.table_names[target.id] = table
                else:
                    self.table_names.pop(target.id, None)

    # writes

    def visit_Assign(self, node: ast.Assign) -> None:
        self._bind(node.targets, node.value)
        for target in node.targets:
            self._balance_assignment(target)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._bind([node.target], node.value)
        self._balance_assignment(node.target)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._balance_assignment(node.target)
        self.generic_visit(node)

    def _balance_assignment(self, target: ast.expr) -> None:
        if isinstance(target, ast.Attribute) and target.attr in BALANCE_COLUMNS:
            self.found(target, f"assigns the balance column {ast.unparse(target)}")

    def visit_Call(self, node: ast.Call) -> None:
        name = _called_name(node.func)
        if (table := self.ledger_model(node.func)) is not None:
            self.found(node, f"creates a {table} row: {_short(node)}")
        elif name in WRITE_FUNCTIONS:
            receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
            if node.args and (table := self.ledger_table(node.args[0])) is not None:
                self.found(node, f"{name}() on {table}: {_short(node)}")
            elif node.args and _constant(node.args[0]) in LEDGER_TABLES:
                self.found(node, f"{name}() on {_constant(node.args[0])}: {_short(node)}")
            elif receiver is not None and (table := self.ledger_table(receiver)) is not None:
                self.found(node, f"{name}() on {table}: {_short(node)}")
        self.generic_visit(node)

    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            self.docstrings.add(id(node.value))  # prose, not SQL
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and id(node) not in self.docstrings:
            if match := SQL_WRITE.search(node.value):
                self.found(node, f"SQL {match.group(0)!r}")


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _constant(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _short(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text if len(text) <= 80 else text[:77] + "..."


def ledger_writes(source: str, path: str = "<source>") -> list[Write]:
    visitor = _LedgerWrites(path)
    visitor.visit(ast.parse(source))
    return visitor.writes


def _modules_outside_the_ledger() -> Iterator[Path]:
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in {"ledger", "_alembic"}:
            continue
        yield path


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('t = text("INSERT INTO transfers (id) VALUES (1)")', 1),
        ('sql = f"UPDATE accounts SET {c} = {c} + 1"', 1),
        ('s = "delete from postings where id = 1"', 1),
        ('"""Update accounts on every call: a docstring."""', 0),
        ('s = "UPDATE usage_records SET x = 1"', 0),
        ("from ubc.ledger.models import Transfer as T\nsession.add(T(id=1))", 1),
        ("from ubc.ledger.models import Account\nx = insert(Account)", 1),
        ("from ubc.ledger.models import Account\nsession.execute(select(Account))", 0),
        ("from ubc.ledger import models\nsa.update(models.Posting).values(x=1)", 1),
        ("import ubc.ledger.models as m\nt = m.Transfer.__table__\nt.delete()", 1),
        ("from ubc.ledger.models import Account\na_t = Account.__table__\nupdate(a_t)", 1),
        ("from ubc.ledger.models import Account\na_t = Account.__table__\nselect(a_t)", 0),
        ('driver.insert("transfers", "id", rows)', 1),
        ('driver.insert("gateway_holds", "id", rows)', 0),
        ('postgresql.insert(metadata.tables["postings"])', 1),
        ("account.debits_posted += 5", 1),
        ("usage.amount = 5", 0),
    ],
)
def test_the_ledger_write_scanner(source: str, expected: int) -> None:
    assert len(ledger_writes(source)) == expected, ledger_writes(source)


def test_the_scanner_sees_the_ledgers_own_writes() -> None:
    """The ledger itself writes its tables: proof that the scanner would see them."""
    writes = [
        write
        for path in sorted((PACKAGE / "ledger").rglob("*.py"))
        for write in ledger_writes(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert writes


def test_only_the_ledger_writes_the_ledger_tables() -> None:
    writes = [
        str(write)
        for path in _modules_outside_the_ledger()
        for write in ledger_writes(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert writes == [], "outside ubc/ledger/:\n" + "\n".join(writes)
