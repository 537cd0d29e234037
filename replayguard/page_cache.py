"""Starting the write-back of a file's dirty pages, so the kernel does not gather them.

Linux writes a file's dirty pages back once they have waited ``vm.dirty_expire_centisecs``
(30 s by default), all of them together: a file written all the time goes to the disk in a
burst every half minute, and a commit's WAL flush on the same disk, which every decision
waits for, queues behind it. ``sync_file_range`` with ``SYNC_FILE_RANGE_WRITE`` (what
PostgreSQL's own ``*_flush_after`` settings call) asks the kernel to start writing back
what is dirty now, without waiting for it: called once a second, it turns the burst into a
second's writes at a time. It reads and writes no data and makes nothing durable.

Used for the embedded server's data files (``pg/writeback.py``) and for the service's own
log when it is written to a file (``logging.LogWriteback``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
import sys
from collections.abc import Callable

SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-out of dirty pages not already under write-back


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range``, or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()


def available() -> bool:
    """True where the kernel can be asked to start a file's write-back (Linux)."""
    return _SYNC_FILE_RANGE is not None


def start_writeback_fd(fd: int) -> bool:
    """Asks the kernel to start writing back the dirty pages of the file open as ``fd``;
    False when it could not (no ``sync_file_range`` here, or the call failed)."""
    return _SYNC_FILE_RANGE is not None and _SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE) == 0


def regular_file(fd: int) -> bool:
    """True when ``fd`` is open on a regular file (not a pipe, a socket or a terminal)."""
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False
