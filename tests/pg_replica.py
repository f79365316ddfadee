"""A real PostgreSQL primary and a streaming replica of it, for the read-replica tests.

:func:`start_pair` initdb's a new primary cluster in a temporary directory on a free
port (``wal_level = replica``, replication trusted from 127.0.0.1), takes a base backup
of it with ``pg_basebackup -R`` into a second directory, starts that as a hot standby on
another free port and waits until it streams. :meth:`ReplicaPair.stop` stops both and
removes the directories. Running as root, the PostgreSQL binaries run as the
``postgres`` user (``runuser``), since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")


class Unavailable(Exception):
    """PostgreSQL's server binaries (or a user to run them as) are not on this machine."""


def bin_dir() -> Path:
    """The directory of initdb, pg_ctl and pg_basebackup: ``$UBC_PG_BINDIR``, else the
    newest /usr/lib/postgresql/<version>/bin, else where ``initdb`` is on the PATH."""
    candidates: list[Path] = []
    if os.environ.get("UBC_PG_BINDIR"):
        candidates.append(Path(os.environ["UBC_PG_BINDIR"]))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(re.sub(r"\D", "", Path(p).parent.name) or 0), reverse=True)
    candidates.extend(Path(p) for p in versions)
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).resolve().parent)
    for folder in candidates:
        if all((folder / tool).exists() for tool in TOOLS):
            return folder
    raise Unavailable("no PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) found")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ReplicaPair:
    """A primary and its streaming standby, each a cluster of its own."""

    root: Path
    bindir: Path
    primary_port: int
    standby_port: int
    as_postgres: bool

    @property
    def primary_dir(self) -> Path:
        return self.root / "primary"

    @property
    def standby_dir(self) -> Path:
        return self.root / "standby"

    def url(self, database: str, *, standby: bool = False) -> str:
        port = self.standby_port if standby else self.primary_port
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"

    def conninfo(self, database: str = "postgres", *, standby: bool = False) -> str:
        port = self.standby_port if standby else self.primary_port
        return f"host=127.0.0.1 port={port} user=postgres dbname={database} connect_timeout=5"

    # --- running the binaries ---

    def run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr or done.stdout}")

    def pg_ctl(self, data: Path, action: str) -> None:
        args = ["-D", str(data), "-w", "-t", "60"]
        if action == "start":
            args += ["-l", str(data.parent / f"{data.name}.log")]
        if action == "stop":
            args += ["-m", "fast"]
        self.run("pg_ctl", *args, action)

    # --- the standby ---

    def stop_standby(self) -> None:
        self.pg_ctl(self.standby_dir, "stop")

    def start_standby(self) -> None:
        self.pg_ctl(self.standby_dir, "start")
        self.wait_streaming()

    def pause_replay(self) -> None:
        with psycopg.connect(self.conninfo(standby=True), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        with psycopg.connect(self.conninfo(standby=True), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    def wait_streaming(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(psycopg.Error):
                with psycopg.connect(self.conninfo(), autocommit=True) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                    ).fetchone()
                    if row is not None and row[0] >= 1:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError("the standby did not start streaming")
            time.sleep(0.05)

    def wait_replayed(self, timeout: float = 30) -> None:
        """Until the standby has replayed everything the primary has written so far."""
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            target = row[0]
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.conninfo(standby=True), autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target]
                ).fetchone()
                if row is not None and row[0]:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError("the standby did not catch up")
                time.sleep(0.02)

    def stop(self) -> None:
        for data in (self.standby_dir, self.primary_dir):
            if (data / "postmaster.pid").exists():
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self.run("pg_ctl", "-D", str(data), "-w", "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


_PRIMARY_CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sockets}'
wal_level = replica
max_wal_senders = 5
hot_standby = on
max_connections = 300
shared_buffers = 32MB
fsync = off
full_page_writes = off
"""


def start_pair() -> ReplicaPair:
    """A running primary and standby (see the module's docstring); :class:`Unavailable`
    when this machine cannot run them."""
    bindir = bin_dir()
    as_postgres = os.geteuid() == 0
    if as_postgres:
        if shutil.which("runuser") is None:
            raise Unavailable("running as root, but no runuser to run PostgreSQL as postgres")
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise Unavailable("running as root, but there is no postgres user") from None
    # Under /tmp when the binaries run as postgres: a $TMPDIR of root's may be closed to it.
    parent = "/tmp" if as_postgres and os.path.isdir("/tmp") else None
    root = Path(tempfile.mkdtemp(prefix="ubc-pgreplica-", dir=parent))
    if as_postgres:
        os.chown(root, user.pw_uid, user.pw_gid)
    pair = ReplicaPair(root, bindir, _free_port(), _free_port(), as_postgres)
    try:
        pair.run(
            "initdb",
            "-D",
            str(pair.primary_dir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        # initdb -A trust lets every local and 127.0.0.1 connection in, replication too.
        with (pair.primary_dir / "postgresql.conf").open("a") as conf:
            conf.write(_PRIMARY_CONF.format(port=pair.primary_port, sockets=root))
        pair.pg_ctl(pair.primary_dir, "start")
        pair.run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(pair.primary_port),
            "-U",
            "postgres",
            "-D",
            str(pair.standby_dir),
            "-R",  # standby.signal and primary_conninfo: a streaming standby
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        )
        with (pair.standby_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {pair.standby_port}\n")
        pair.start_standby()
    except BaseException:
        pair.stop()
        raise
    return pair
