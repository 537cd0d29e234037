"""``serve --workers N``: workers do not outlive a parent killed hard, and a worker that fails
ends the service with a failure status."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import cli_env, free_port, run_cli, uid

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


async def test_serve_with_workers_whose_start_fails_exits_2_in_one_line_each(
        fresh_database: Callable[[], Any], tmp_path: Path) -> None:
    """With --workers 2, a check that runs in the workers (here: the database is bound to other
    keys) makes each worker say why in one line, and `serve` exits 2, as with one worker."""
    dsn = await fresh_database()
    made = await asyncio.to_thread(run_cli, "token", "create", "--role", "analyst", "--name", uid("a"),
                                   "--database-url", dsn, "--data-dir", str(tmp_path / "one"))
    assert made.returncode == 0, made.stderr
    done = await asyncio.to_thread(run_cli, "serve", "--workers", "2", "--port", str(free_port()),
                                   "--database-url", dsn, "--data-dir", str(tmp_path / "two"),
                                   env=cli_env(**SMALL_POOL), timeout=90)
    assert done.returncode == 2, (done.returncode, done.stderr[-400:])
    assert "Traceback" not in done.stderr, done.stderr[-400:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("replayguard: error: ")]
    assert 1 <= len(errors) <= 2 and all("keys" in line for line in errors), done.stderr[-400:]


async def test_a_worker_killed_ends_the_service_with_a_failure(
    tmp_path: Path, fresh_database: Callable[[], Any], service_factory: Callable[..., Any],
) -> None:
    """A worker killed by a signal stops the other workers, and `serve` exits 128 + the signal's
    number, so a supervisor (Restart=on-failure) starts the whole service again."""
    dsn = await fresh_database()
    service = await service_factory(data_dir=tmp_path / "data", database_url=dsn, extra_args=("--workers", "2"),
                                    env=cli_env(**SMALL_POOL))
    workers = [child for child in psutil.Process(service.proc.pid).children()
               if any("spawn_main" in part for part in child.cmdline())]  # not multiprocessing's resource tracker
    assert len(workers) == 2
    workers[0].kill()
    status = await asyncio.to_thread(service.proc.wait, 30)
    _gone, alive = psutil.wait_procs(workers, timeout=20)
    for proc in alive:
        proc.kill()
    assert status == 128 + signal.SIGKILL and not alive, (status, [p.pid for p in alive])
