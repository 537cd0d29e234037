"""``serve --workers N``: workers do not outlive a parent killed hard, and a worker that fails
ends the service with a failure status."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import cli_env, free_port, run_cli, uid
from tests.waiting import until

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


def _decisions_total(text: str) -> float:
    """The sum of every ``replayguard_decisions_total`` series in a scrape."""
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "replayguard_decisions" for sample in family.samples
               if sample.name == "replayguard_decisions_total")


def _workers_seen(text: str) -> set[str]:
    """The process ids the ``worker`` label of the background metrics names in a scrape."""
    return {sample.labels["worker"] for family in text_string_to_metric_families(text)
            if family.name == "replayguard_background_runs" for sample in family.samples}


async def test_metrics_with_two_workers_count_the_whole_service(
    tmp_path: Path, fresh_database: Callable[[], Any], service_factory: Callable[..., Any],
) -> None:
    """With --workers 2, decisions made by both workers (each on a new connection, which
    SO_REUSEPORT spreads over the workers) are counted whole: every scrape, whichever worker
    answers it, reports no more than were made and never less than the scrape before, and
    once the workers have shared their counts every scrape reports them all. The workers share
    them through a directory of their own (0700) that is gone once serve has stopped."""
    dsn = await fresh_database()
    data_dir, tmp = tmp_path / "data", tmp_path / "tmp"
    tmp.mkdir()
    made = await asyncio.to_thread(run_cli, "token", "create", "--role", "callout", "--name", uid("c"),
                                   "--database-url", dsn, "--data-dir", str(data_dir))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    service = await service_factory(data_dir=data_dir, database_url=dsn, extra_args=("--workers", "2"),
                                    env=cli_env(**SMALL_POOL, TMPDIR=str(tmp)))
    scope = uid("metrics")
    totals: list[float] = []
    made_count = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:

        async def scrape() -> str:
            async with session.get(service.url + "/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            total = _decisions_total(text)
            assert total <= made_count and (not totals or total >= totals[-1]), [*totals, total]
            totals.append(total)
            return text

        for round_ in range(4):
            for i in range(12):
                async with session.post(service.url + "/v1/nonces/consume",
                                        json={"vm_id": "vm-1", "scope": scope, "nonce": f"n-{round_}-{i}"},
                                        headers={"Authorization": f"Bearer {token}"}) as resp:
                    assert resp.status == 200 and (await resp.json())["decision"] == "accept"
                made_count += 1
            for _ in range(3):
                await scrape()

        async def every_decision_counted() -> bool:
            await scrape()
            return totals[-1] == made_count

        await until(every_decision_counted, "a scrape that counts every decision", every=0.1)
        for _ in range(10):
            text = await scrape()
        assert totals[-10:] == [made_count] * 10, totals
        workers = [child.pid for child in psutil.Process(service.proc.pid).children()
                   if any("spawn_main" in part for part in child.cmdline())]
        assert _workers_seen(text) == {str(pid) for pid in workers}, (_workers_seen(text), workers)
    shared = list(tmp.glob("replayguard-metrics-*"))
    assert len(shared) == 1, shared
    mode = shared[0].lstat()
    assert stat.S_ISDIR(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o700 and mode.st_uid == os.geteuid()
    service.kill(signal.SIGTERM)
    assert service.proc.returncode == 0, service.log()[-2000:]
    assert not list(tmp.iterdir()), list(tmp.iterdir())
