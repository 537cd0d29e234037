"""Servers a test owns and may stop, crash and restart: PostgreSQL and Redis.

``OwnedPostgres`` is the service's embedded server (``replayguard.pg.embedded``) in a test's
directory, stopped with ``pg_ctl -m immediate`` (an abrupt stop, like a crash) and started
again on the same data directory and socket, so its URL does not change. ``OwnedRedis`` is a
``redis-server`` subprocess on a Unix socket of its own (no TCP port to pick and release,
so nothing else can take it between restarts), without persistence, so a restart comes
back empty. ``stop_embedded`` stops the PostgreSQL a ``replayguard serve`` started under
its data dir (the service leaves it running by design).

Embedded servers live in ``scratch_dir``s, not under pytest's ``tmp_path``: as root the
server runs as the ``replayguard`` system user, who must traverse the path, and pytest's
``/tmp/pytest-of-<user>`` is 0700.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from replayguard.pg.embedded import EmbeddedServer, claim_data_dir

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _server(data_dir: Path) -> EmbeddedServer:
    return EmbeddedServer(data_dir, claim_data_dir(data_dir, embedded=True))


@contextlib.contextmanager
def scratch_dir(prefix: str = "rg-test-") -> Iterator[Path]:
    """A short-lived directory under /tmp, outside pytest's (see the module docstring)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o711)  # made just now: as root, the embedded server's user must pass through it
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stop_embedded(data_dir: Path) -> None:
    """Stops (immediately) a server left running under ``data_dir``; a stopped one is fine."""
    if (data_dir / "pg" / "postmaster.pid").exists():
        _server(data_dir).stop("immediate")


class OwnedPostgres:
    """An embedded PostgreSQL the test can take down and bring back on the same URL."""

    def __init__(self, data_dir: Path) -> None:
        self.server = _server(data_dir.absolute())
        with self.server.locked():
            self.socket_dir = self.server.start()
        self.url = self.server.dsn(self.socket_dir)

    def stop(self) -> None:
        """An abrupt stop: every connection drops, nothing is shut down cleanly."""
        self.server.stop("immediate")

    def start(self) -> None:
        """Starts the server again on the same data dir and socket (so the same URL)."""
        with self.server.locked():
            assert self.server.start() == self.socket_dir

    def close(self) -> None:
        self.server.stop("immediate")
        shutil.rmtree(self.server.data_dir, ignore_errors=True)


def free_port() -> int:
    """A port free a moment ago, for servers that cannot bind port 0 and report it (PostgreSQL
    names its socket after its port). Racy in principle; prefer a server-chosen port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
