"""The one thing pyproject.toml cannot say: the top-level ``alembic/`` folder ships inside
the package as ``ubc/_alembic``.

Alembic users look for ``alembic/`` and ``alembic.ini`` at the repository root; an
installed ubc must still migrate (``ubc db upgrade``, ``ubc serve``), so the wheel
carries the scripts. Installed as a top-level ``alembic`` they would shadow the Alembic
library, hence the mapping, which needs the package list computed here
(``[tool.setuptools.packages.find]`` cannot add a package under another name). The
scripts' non-Python files are package data in pyproject.toml. Everything else about the
build is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

MIGRATIONS = "ubc._alembic"

setup(
    packages=[
        *find_namespace_packages(include=["ubc", "ubc.*"], exclude=["*.__pycache__"]),
        MIGRATIONS,
        f"{MIGRATIONS}.versions",
    ],
    package_dir={MIGRATIONS: "alembic"},
)
