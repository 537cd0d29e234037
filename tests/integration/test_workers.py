"""``serve --workers N``: workers do not outlive a parent killed hard."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import cli_env, run_cli

SMALL_POOL = {"REPLAYGUARD_DB_POOL_SIZE": "3"}


async def test_workers_exit_when_their_parent_is_killed(
    tmp_path: Path, fresh_database: Callable[[], Any], service_factory: Callable[..., Any],
) -> None:
    """Worker processes exit when their parent is killed with SIGKILL, and the port is freed."""
    dsn = await fresh_database()
    service = await service_factory(data_dir=tmp_path / "data", database_url=dsn, extra_args=("--workers", "2"),
                                    env=cli_env(**SMALL_POOL))
    workers = psutil.Process(service.proc.pid).children()
    assert len(workers) >= 2
    service.kill(signal.SIGKILL)  # the parent gets no chance to stop them
    _gone, alive = psutil.wait_procs(workers, timeout=20)
    for proc in alive:  # leave nothing behind even when the assertion fails
        proc.kill()
    assert not alive, f"workers outlived their parent: {[p.pid for p in alive]}"
    # And the port is free again.
    port = int(service.url.rsplit(":", 1)[1])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
            c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in psutil.net_connections("tcp")):
        time.sleep(0.1)
    assert not any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                   for c in psutil.net_connections("tcp"))


def test_port_zero_with_several_workers_is_a_start_up_error(tmp_path: Path) -> None:
    """`serve --port 0 --workers 2` stops at start-up with one
    line and status 2 (each worker would get its own port)."""
    done = run_cli("serve", "--port", "0", "--workers", "2", "--data-dir", str(tmp_path / "d"),
                   "--database-url", "postgresql://postgres@127.0.0.1:5432/postgres")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "port 0" in done.stderr
