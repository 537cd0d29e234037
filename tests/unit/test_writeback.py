"""The embedded server's write-back of its growing data files (``replayguard/pg/writeback.py``).

Which files a pass takes, that the kernel is asked for real, and that of the processes
sharing one data dir one at a time does it, the next taking over when it stops.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from replayguard import page_cache
from replayguard.pg.writeback import Writeback, start_writeback, written_since
from tests.waiting import until

pytestmark = pytest.mark.skipif(not page_cache.available(), reason="sync_file_range is Linux's")


def _cluster(root: Path) -> Path:
    pgdata = root / "pg"
    for oid in ("1", "16384"):
        (pgdata / "base" / oid).mkdir(parents=True)
    return pgdata


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_pass_takes_the_databases_files_written_since_its_start(tmp_path: Path) -> None:
    """Files of every database written at or after ``since`` are taken; older ones,
    directories, symlinks and files outside ``base/`` are not."""
    pgdata = _cluster(tmp_path)
    fresh = [pgdata / "base" / "16384" / "16400", pgdata / "base" / "1" / "1259", pgdata / "base" / "16384" / "16400.1"]
    old = pgdata / "base" / "16384" / "16401"
    for path in [*fresh, old, pgdata / "global_file"]:
        path.write_bytes(b"\0" * 8192)
    _age(old, 60)
    (pgdata / "base" / "16384" / "pgsql_tmp").mkdir()
    (pgdata / "base" / "16384" / "16402").symlink_to(fresh[0])
    since = time.time() - 30

    assert sorted(written_since(pgdata, since)) == sorted(fresh)
    assert list(written_since(pgdata, time.time() + 60)) == []


def test_a_pass_over_a_missing_cluster_takes_nothing(tmp_path: Path) -> None:
    """No ``base/`` (an external server's settings, a cluster not yet initialised): no files, no error."""
    assert list(written_since(tmp_path / "absent", 0)) == []
    assert Writeback(tmp_path / "absent", tmp_path / "lock").pass_once(0) == 0


def test_the_kernel_is_asked_to_write_back_a_dirty_file(tmp_path: Path) -> None:
    """A file with dirty pages is handed to ``sync_file_range``; a missing file or a symlink is not."""
    path = tmp_path / "16400"
    with path.open("wb") as out:
        out.write(os.urandom(1 << 20))
    link = tmp_path / "link"
    link.symlink_to(path)

    assert start_writeback(path) is True
    assert start_writeback(tmp_path / "gone") is False
    assert start_writeback(link) is False  # O_NOFOLLOW: nothing planted in the data dir is followed


def test_a_pass_counts_the_files_it_handed_to_the_kernel(tmp_path: Path) -> None:
    """``pass_once`` reports each pass's count to ``on_pass``, and the count is that of the files written."""
    pgdata = _cluster(tmp_path)
    for name in ("16400", "16401", "16402"):
        (pgdata / "base" / "16384" / name).write_bytes(b"x" * 8192)
    counts: list[int] = []
    wb = Writeback(pgdata, tmp_path / "lock", on_pass=counts.append)

    assert wb.pass_once(time.time() - 30) == 3
    assert wb.pass_once(time.time() + 60) == 0
    assert counts == [3, 0] and wb.passes == 2


async def test_one_process_of_a_data_dir_writes_back_and_the_next_takes_over(tmp_path: Path) -> None:
    """Two writers on one lock file: one passes, the other waits; when the first stops, the
    second takes the lock and passes."""
    pgdata = _cluster(tmp_path)
    (pgdata / "base" / "16384" / "16400").write_bytes(b"x" * 8192)
    lock = tmp_path / "pg.writeback.lock"
    first = Writeback(pgdata, lock, interval_s=0.01)
    second = Writeback(pgdata, lock, interval_s=0.01)
    assert first.start() and second.start()
    try:
        await until(lambda: first.passes + second.passes >= 5, "passes")
        leader, other = (first, second) if first.passes else (second, first)
        assert other.passes == 0 and not other.leading
        leader.stop()
        await until(lambda: other.passes >= 3, "the other writer's passes")
        assert other.leading
    finally:
        first.stop()
        second.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root creates a file for another user")
def test_as_root_the_lock_file_belongs_to_the_data_dirs_owner(tmp_path: Path) -> None:
    """Root's lock file is handed to the data dir's owner, who may serve without root later
    and must then be able to take it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.chown(data_dir, 65534, 65534)
    wb = Writeback(data_dir / "pg", data_dir / "pg.writeback.lock")
    try:
        assert wb.holds_lock()
        assert (os.stat(data_dir / "pg.writeback.lock").st_uid, os.stat(data_dir / "pg.writeback.lock").st_gid) \
            == (65534, 65534)
    finally:
        wb.stop()
