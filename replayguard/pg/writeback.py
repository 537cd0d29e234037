"""Starts the write-back of the embedded PostgreSQL's data files as they grow.

PostgreSQL grows a table or an index a page at a time, by writing a zeroed page at the end
of its file; that page is dirty in the OS's page cache until the kernel writes it back.
Linux writes back a file once its dirty pages have waited ``vm.dirty_expire_centisecs``
(30 s by default), all of them together, so the files that grow with every decision
(``ledger``, ``uses`` and their indexes) are written back in a burst every half minute:
about 350 MB at c=64 on the benchmark machine, and the WAL's flush, which every decision
waits for, queues behind it on the same disk. PostgreSQL's ``*_flush_after`` settings
start the write-back of the buffers it writes, not of those zeroed pages.

A ``Writeback`` thread asks the kernel, once a second, to start writing back each data file
written since its last pass (``sync_file_range`` with ``SYNC_FILE_RANGE_WRITE``, as
PostgreSQL's own ``*_flush_after`` does): a second's growth at a time instead of half a
minute's. It waits for nothing and makes nothing durable (the WAL does that), reads and
writes no data, and needs only to open the files, which the process that runs the
embedded server can. Of the processes sharing one server (``--workers``), one at a time
does it: the holder of an exclusive ``flock`` on ``pg.writeback.lock`` in the data dir,
which passes to another when its holder exits.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from .. import page_cache
from ..durable import inherited_owner, lock_file

log = structlog.get_logger(__name__)

INTERVAL_S = 1.0


def written_since(pgdata: Path, since: float) -> Iterator[Path]:
    """The files of the cluster's databases (``base/<oid>/``) modified at or after ``since``
    (seconds since the epoch); files that vanish while listed are skipped."""
    try:
        databases = list(os.scandir(pgdata / "base"))
    except OSError:
        return
    for database in databases:
        try:
            with os.scandir(database.path) as files:
                for entry in files:
                    try:
                        if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime >= since:
                            yield Path(entry.path)
                    except OSError:
                        continue
        except OSError:
            continue


def start_writeback(path: Path) -> bool:
    """Asks the kernel to start writing back the dirty pages of ``path``; False when it could
    not (the file went, or no ``sync_file_range`` here)."""
    if not page_cache.available():
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return page_cache.start_writeback_fd(fd)
    finally:
        os.close(fd)


class Writeback:
    """A daemon thread that, every ``interval_s`` while it holds ``lock_path``, starts the
    write-back of the cluster's data files written since its previous pass."""

    def __init__(self, pgdata: Path, lock_path: Path, interval_s: float = INTERVAL_S,
                 on_pass: Callable[[int], None] | None = None) -> None:
        self.pgdata = pgdata
        self.lock_path = lock_path
        self.interval_s = interval_s
        self.on_pass = on_pass  # called with the number of files of each pass
        self.passes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None

    def start(self) -> bool:
        """Starts the thread; False (and nothing started) where write-back cannot be started."""
        if not page_cache.available():
            log.info("embedded_writeback_unavailable", reason="no sync_file_range on this platform")
            return False
        self._thread = threading.Thread(target=self._run, name="pg-writeback", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def leading(self) -> bool:
        """True while this writer holds the lock."""
        return self._lock_fd is not None

    def holds_lock(self) -> bool:
        """Takes the lock if free (the writer's own thread calls it); True while held."""
        if self._lock_fd is not None:
            return True
        try:
            # the data dir's owner may serve without root later
            self._lock_fd = lock_file(self.lock_path, owner=inherited_owner(self.lock_path.parent), wait=False)
        except OSError:
            return False
        return True

    def pass_once(self, since: float) -> int:
        """Starts the write-back of the files written at or after ``since``; how many."""
        count = sum(start_writeback(path) for path in written_since(self.pgdata, since))
        self.passes += 1
        if self.on_pass is not None:
            self.on_pass(count)
        return count

    def _run(self) -> None:
        since = time.time()
        while not self._stop.wait(self.interval_s):
            if not self.holds_lock():
                since = time.time()
                continue
            began = time.time()
            # The previous interval again: a file written just before a pass, with a coarse
            # modification time, is not missed; starting a clean file's write-back costs nothing.
            try:
                self.pass_once(since - self.interval_s)
            except Exception as exc:  # noqa: BLE001 - a background pass must not end the thread
                log.warning("embedded_writeback_failed", error=type(exc).__name__)
            since = began
