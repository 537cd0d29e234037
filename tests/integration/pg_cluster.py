"""A PostgreSQL primary and a streaming standby that a test owns (Debian's PostgreSQL 15).

Both run as the ``postgres`` user from directories the test creates, reached over Unix
sockets only (each server's own short directory under /tmp, so no TCP port is picked and
released, and none can be taken by another process in between); they are stopped by PID
(``kill -9`` for a crash). ``pg_basebackup -R`` makes the standby; ``SYNCHRONOUS`` (run on
the primary once the standby streams) makes it synchronous.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")
STANDBY_NAME = "standby1"


def available() -> bool:
    return (BIN / "pg_basebackup").exists() and os.geteuid() == 0 and shutil.which("runuser") is not None


def _as_postgres(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, user="postgres", timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL, cwd="/tmp")
    assert done.returncode == 0, f"{args[0]}: {done.stdout}{done.stderr}"
    return done


class Server:
    """One PostgreSQL server on a data directory and a socket directory of its own."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.socket_dir = Path(tempfile.mkdtemp(prefix="rg-pg-", dir="/tmp"))  # short: sun_path is 108 bytes
        shutil.chown(self.socket_dir, "postgres")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port=5432"

    def start(self) -> None:
        _as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-l", str(self.data / "log"),
                     "-o", f"-p 5432 -k {self.socket_dir}", "start", timeout=90)

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def crash(self) -> None:
        """kill -9 of the postmaster and every child of it, by PID."""
        pid = self.pid()
        if pid is None:
            return
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
        for child in [pid, *map(int, children.stdout.split())]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)

    def discard(self) -> None:
        """Kills the server (if up) and removes its socket directory."""
        self.crash()
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def stop(self) -> None:
        """A fast shutdown (SIGINT to the postmaster), waited for."""
        pid = self.pid()
        if pid is None or not _alive(pid):
            return
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            self.crash()

    def detach(self) -> None:
        """A standby stops receiving WAL (empty primary_conninfo, configuration reloaded)."""
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            conf.write("primary_conninfo = ''\n")
        _as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "reload")

    def promote(self) -> None:
        _as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "promote", timeout=90)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


def make_primary(root: Path) -> Server:
    root.mkdir(parents=True, exist_ok=True)
    for directory in (root.parent, root):  # the test's own scratch directories, handed to the server's user
        shutil.chown(directory, "postgres")
    data = root / "primary"
    _as_postgres(str(BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-N")
    settings = ["listen_addresses = ''", "wal_level = replica", "max_wal_senders = 5",
                "hot_standby = on", "fsync = on", "shared_buffers = 16MB", "max_connections = 60",
                "wal_keep_size = 64MB"]
    with open(data / "postgresql.conf", "a") as conf:
        conf.write("\n".join(settings) + "\n")
    server = Server(data)  # initdb's pg_hba.conf trusts local (socket) replication
    server.start()
    return server


SYNCHRONOUS = (f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'",
               "ALTER SYSTEM SET synchronous_commit = 'remote_apply'", "SELECT pg_reload_conf()")


def make_standby(root: Path, primary: Server) -> Server:
    data = root / "standby"
    _as_postgres(str(BIN / "pg_basebackup"), "-h", str(primary.socket_dir), "-p", "5432", "-U", "postgres",
                 "-D", str(data), "-R", "-X", "stream", "-c", "fast", timeout=120)
    with open(data / "postgresql.auto.conf", "a") as conf:
        conf.write(f"primary_conninfo = 'host={primary.socket_dir} port=5432 user=postgres "
                   f"application_name={STANDBY_NAME}'\n")
    server = Server(data)
    server.start()
    return server
