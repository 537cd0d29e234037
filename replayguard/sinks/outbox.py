"""A sink's durable outbox: an append-only JSON-lines spool and its delivered-offset cursor.

``<spool_dir>/<name>.jsonl`` holds every record submitted to the sink; ``<name>.cursor``
holds the byte offset delivered so far, committed by atomic rename, so a sink that is
down, or a restart, loses nothing: delivery resumes at the cursor.

Run as root, what the spool creates belongs to the owner of the directory it is created
in (the data dir's owner): the service user can still open the outbox after a root run.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import structlog

from ..durable import adopt, atomic_write, inherited_owner
from ..errors import ConfigError


class Spool:
    """One sink's outbox: an append-only JSON-lines file and the committed delivered offset.

    Opened under an exclusive ``flock`` so two processes never deliver the same outbox. A
    torn last line (crash mid-append) is cut off at open; a cursor beyond the end (crash
    between a compaction's truncate and its cursor commit) is clamped to the end.
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / f"{name}.jsonl"
        self._cursor_path = directory / f"{name}.cursor"
        self._fd = -1
        self.end = 0
        self.cursor = 0

    def open(self) -> int:
        """Open, repair and load the cursor; returns the number of undelivered lines."""
        directory = self.path.parent
        if not directory.is_dir():
            directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:
                pass
            else:
                _inherit_owner(directory)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        _inherit_owner(self.path, self._fd)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise ConfigError(f"spool {self.path} is in use by another replayguard process") from None
        for stale in directory.glob(f".{self._cursor_path.name}.*.tmp"):  # a commit a crash cut short
            stale.unlink(missing_ok=True)
        self.end = _complete_length(self._fd)
        os.ftruncate(self._fd, self.end)
        self.cursor = min(self._read_cursor(), self.end)
        return sum(line.count(b"\n") for line in _chunks(self._fd, self.cursor, self.end))

    def _read_cursor(self) -> int:
        try:
            return int(self._cursor_path.read_text(encoding="ascii").strip())
        except FileNotFoundError:
            return 0
        except ValueError:  # redelivering beats losing: receivers deduplicate by id
            structlog.get_logger().warning("sink_cursor_corrupt", path=str(self._cursor_path))
            return 0

    def append(self, line: bytes) -> tuple[int, int]:
        """Append one line; returns its (start, end) offsets. A short write is undone."""
        start = self.end
        written = os.write(self._fd, line)
        if written != len(line):
            os.ftruncate(self._fd, start)
            raise OSError(f"short write to {self.path}")
        self.end = start + written
        return start, self.end

    def read(self, start: int, stop: int, limit: int) -> list[tuple[int, int, bytes]]:
        """Up to ``limit`` complete lines in [start, stop) as (start, end, line)."""
        lines: list[tuple[int, int, bytes]] = []
        with open(self.path, "rb") as handle:
            handle.seek(start)
            while len(lines) < limit and start < stop:
                line = handle.readline(stop - start)
                if not line.endswith(b"\n"):
                    break
                lines.append((start, start + len(line), line))
                start += len(line)
        return lines

    def sync(self) -> None:
        os.fsync(self._fd)

    def commit(self, offset: int) -> None:
        """Record ``offset`` as delivered, atomically and durably (``durable.atomic_write``)."""
        atomic_write(self._cursor_path, f"{offset}\n".encode("ascii"), owner=inherited_owner(self._cursor_path.parent))
        self.cursor = offset

    def compact(self) -> None:
        """Empty a fully delivered spool. Truncate (durably) before committing offset 0, so a
        crash in between leaves a cursor past the end, which ``open`` clamps: no duplicates."""
        os.ftruncate(self._fd, 0)
        self.end = self.cursor = 0  # the file is empty now, even if what follows fails
        os.fsync(self._fd)
        self.commit(0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _inherit_owner(path: Path, fd: int | None = None) -> None:
    """As root, gives ``path`` (or the file open at ``fd``) to its directory's owner, unless that is root."""
    if fd is None:
        adopt(path, path.parent)
        return
    owner = inherited_owner(path.parent)
    if owner is not None and os.fstat(fd).st_uid == 0:
        os.fchown(fd, *owner)


def _chunks(fd: int, start: int, stop: int, size: int = 1 << 16) -> list[bytes]:
    return [os.pread(fd, min(size, stop - pos), pos) for pos in range(start, stop, size)]


def _complete_length(fd: int) -> int:
    """Length of the file up to and including its last newline."""
    end = os.fstat(fd).st_size
    while end > 0:
        chunk = os.pread(fd, min(1 << 16, end), max(0, end - (1 << 16)))
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return end - len(chunk) + cut + 1
        end -= len(chunk)
    return 0
