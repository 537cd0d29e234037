"""Whole-file writes that survive a crash: a file is replaced entirely or not at all, and
the replacement is on disk, under its name, before the call returns.

Used for every small state file the service and its relays keep beside PostgreSQL: key
files, the embedded server's password, access and user files, relay cursors and spooled
events, a ``file:`` witness's checkpoint, a sink outbox's cursor. When root writes them into a
directory another user owns, they go to that owner (``inherited_owner``, ``adopt``).
"""

from __future__ import annotations

import os
import secrets
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
