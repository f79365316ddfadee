"""Install ubc the way a library user would — the newest versions its ranges allow, not
the lock — then run the demo and a fast subset of the tests, and say which upgrade broke
what.

    python scripts/check_fresh_install.py              # the ranges of pyproject.toml
    python scripts/check_fresh_install.py --unbounded  # also lift every upper bound (<, <=, ~=)
    python scripts/check_fresh_install.py --keep DIR   # keep the virtual environment in DIR

Exit 0 when the fresh install works. Otherwise it prints each package whose version
differs from the lock, and for every step that failed it tries the locked version of
each upgraded package in turn (one at a time, in the same fresh environment) and names
the upgrades that make the step pass again when undone: the culprits. `--unbounded`
answers "can this upper bound be lifted yet?" (see docs/dependencies.md).

Run it before a release, after refreshing the lock, and on a schedule (weekly): a new
release of someone else's package is then found here, not by a newcomer.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "test.txt"
# Fast and broad: the signing contract, the ledger, the write path, the model endpoint
# through the OpenAI SDK, the API fuzzer (schemathesis + pytest), SQLite only.
SUBSET = [
    "tests/test_signing.py",
    "tests/test_ledger.py",
    "tests/test_envelopes.py",
    "tests/test_gateway.py",
    "tests/test_api_fuzz.py",
]
# The virtual environment's own installers, not dependencies of ubc.
TOOLING = {"pip", "setuptools", "wheel"}


@dataclass
class Step:
    name: str
    command: list[str]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unbounded", action="store_true", help="lift every upper bound")
    parser.add_argument("--keep", type=Path, help="build the environment here and keep it")
    parser.add_argument(
        "--no-bisect", action="store_true", help="report the differences only, try no downgrade"
    )
    args = parser.parse_args()

    home = args.keep or Path(tempfile.mkdtemp(prefix="ubc-fresh-"))
    try:
        return check(home, unbounded=args.unbounded, bisect=not args.no_bisect)
    finally:
        if args.keep is None:
            shutil.rmtree(home, ignore_errors=True)


def check(home: Path, *, unbounded: bool, bisect: bool) -> int:
    venv = home / "venv"
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    requirements = ranges(unbounded=unbounded)
    print(f"== installing ubc[test] with the newest versions of {len(requirements)} ranges")
    # The project itself without dependencies, then the ranges resolved afresh.
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)])
    run([str(python), "-m", "pip", "install", "-q", "--upgrade", *requirements])

    fresh = installed(python)
    locked = lock_versions()
    upgraded = {
        name: (locked[name], version)
        for name, version in sorted(fresh.items())
        if name in locked and locked[name] != version and name not in TOOLING
    }
    added = sorted(set(fresh) - set(locked) - TOOLING - {"ubc"})
    print(f"== {len(upgraded)} packages differ from the lock")
    for name, (old, new) in upgraded.items():
        print(f"   {name}: {old} (lock) -> {new}")
    for name in added:
        print(f"   {name}: not in the lock -> {fresh[name]}")

    steps = [
        Step("demo", [str(venv / "bin" / "ubc"), "demo"]),
        Step(
            "tests",
            [
                str(python),
                "-m",
                "pytest",
                "-q",
                "-x",
                "-p",
                "no:cacheprovider",
                "-m",
                "not postgres",
            ]
            + SUBSET,
        ),
    ]
    failed = [step for step in steps if not passes(step, home, show=True)]
    if not failed:
        print("== the fresh install works")
        return 0
    for step in failed:
        print(f"== '{step.name}' fails with the newest versions")
        if not bisect:
            continue
        culprits = []
        for name, (old, new) in upgraded.items():
            if not pin(python, name, old):
                print(f"   could not install {name}=={old}: skipped")
                continue
            if passes(step, home, show=False):
                culprits.append(f"{name} {new} (passes again with {old})")
            pin(python, name, new)
        if culprits:
            print(f"   broken by: {'; '.join(culprits)}")
        else:
            print("   no single upgrade undoes it: look at the output above")
    return 1


def ranges(*, unbounded: bool) -> list[str]:
    """The dependency ranges of pyproject.toml, the test extra included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    if not unbounded:
        return specs
    lifted = []
    for spec in specs:
        requirement = Requirement(spec)
        kept = [s for s in requirement.specifier if s.operator not in ("<", "<=", "~=", "==")]
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        lifted.append(requirement.name + extras + ",".join(str(s) for s in kept))
    return lifted


def lock_versions() -> dict[str, str]:
    """The locked version of each package for this interpreter (a universal lock may pin
    one package twice, under different environment markers)."""
    versions = {}
    lines = re.findall(
        r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)(?:\s*;\s*([^\\]+))?", LOCK.read_text(), re.M
    )
    for name, version, marker in lines:
        if not marker or Marker(marker.strip()).evaluate():
            versions[normalise(name)] = version
    return versions


def installed(python: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {
        normalise(name): version
        for name, version in (line.split("==", 1) for line in out.splitlines() if "==" in line)
    }


def pin(python: Path, name: str, version: str) -> bool:
    command = [str(python), "-m", "pip", "install", "-q", "--no-deps", f"{name}=={version}"]
    return subprocess.run(command, capture_output=True).returncode == 0


def passes(step: Step, home: Path, *, show: bool) -> bool:
    print(f"-- {step.name}: {' '.join(step.command[-3:])}" if show else f"   retry {step.name}")
    result = subprocess.run(
        step.command, cwd=home if step.name == "demo" else ROOT, capture_output=True, text=True
    )
    if show and result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-2000:], sep="\n")
    return result.returncode == 0


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(command: list[str]) -> None:
    subprocess.run(command, check=True)


if __name__ == "__main__":
    sys.exit(main())
