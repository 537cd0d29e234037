"""Whole-file writes that survive a crash: a file is replaced entirely or not at all, and
the replacement is on disk, under its name, before the call returns.

Used for every small state file the service and its relays keep beside PostgreSQL: key
files, the embedded server's password, access and user files, relay cursors and spooled
events, a ``file:`` witness's checkpoint, a sink outbox's cursor. When root writes them into a
directory another user owns, they go to that owner (``inherited_owner``, ``adopt``).

Lock files (``lock_file``, ``locked``) serialise such writers across processes: the
embedded server's start and stop, its data files' write-back, a ``file:`` witness.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, owner: tuple[int, int] | None = None, exclusive: bool = False) -> None:
    """Write a whole file or nothing: a fresh tmp file, fsync, rename, fsync the directory.

    The tmp file has a random name in the target's directory and is opened with
    ``O_CREAT | O_EXCL | O_NOFOLLOW``: a symlink or file planted there is an error, never
    followed or truncated; the rename replaces a symlink at ``path`` itself, not its target.
    ``owner`` (uid, gid), when given, owns the file from before it takes its name.
    ``exclusive`` never replaces: the file is linked in, and ``FileExistsError`` says
    another writer got there first.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    if exclusive:
        try:
            os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)


def inherited_owner(directory: Path) -> tuple[int, int] | None:
    """Who should own what root writes in ``directory``: its owner, unless that is root
    (``None`` too when not running as root, where files are the writer's anyway)."""
    if os.geteuid() != 0:
        return None
    st = directory.stat()
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def adopt(path: Path, directory: Path) -> None:
    """Gives ``path``, which root just created, to ``directory``'s owner (see ``inherited_owner``)."""
    owner = inherited_owner(directory)
    if owner is not None:
        os.chown(path, *owner, follow_symlinks=False)


def fsync_dir(directory: Path) -> None:
    """Makes the directory's entries (a rename, a new or removed file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_file(path: Path, *, owner: tuple[int, int] | None = None, wait: bool = True) -> int:
    """An open descriptor of ``path`` holding its exclusive ``flock``; closing it releases.

    The file is created 0600 if missing and opened with ``O_NOFOLLOW``: a symlink planted at
    ``path`` is an ``OSError``, never followed to create or lock another file. ``owner``
    (uid, gid), when given, owns it, so a later run without root can take it. Without
    ``wait``, a lock another process holds raises ``BlockingIOError`` at once.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def locked(path: Path, *, owner: tuple[int, int] | None = None) -> Iterator[None]:
    """Holds ``path``'s exclusive lock (``lock_file``, waiting for it) for the block."""
    fd = lock_file(path, owner=owner)
    try:
        yield
    finally:
        os.close(fd)
