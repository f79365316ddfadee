#!/usr/bin/env bash
# Refresh the lock (requirements/*.txt) from the ranges in pyproject.toml.
#
#   scripts/lock.sh             keep every locked version that still fits the ranges
#   scripts/lock.sh --upgrade   move every package to the newest version the ranges allow
#   scripts/lock.sh --upgrade-package NAME   move one package
#
# uv resolves once for every platform (--universal) and writes pip-compatible files with
# sha256 hashes, so installing needs nothing but pip. Run `bash .ci/run` and
# `python scripts/check_fresh_install.py` after an upgrade, and commit the three files.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
if ! uv --version 2>/dev/null | grep -q "^uv $UV_VERSION"; then
    python -m pip install -q "uv==$UV_VERSION"
fi
common=(--universal --python-version 3.11 --generate-hashes --quiet "$@")
# The service: the runtime dependencies and the build backend.
uv pip compile "${common[@]}" pyproject.toml requirements/build.in -o requirements/main.txt
# The tests: the same runtime versions (constrained by main.txt), plus the test extra.
uv pip compile "${common[@]}" pyproject.toml requirements/build.in --extra test \
    -c requirements/main.txt -o requirements/test.txt
echo "requirements/main.txt and requirements/test.txt are up to date"
