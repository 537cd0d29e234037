"""The key-file rule: who may have written a file the service trusts with a secret.

Key files, secret files named by ``*_FILE`` and a config file holding secrets must be:
owned by the user running replayguard, by root, or (run as root) by the data dir's owner;
readable by nobody else (no group or other bits, except group bits that only show the mask
of a POSIX ACL whose entries grant nothing to anyone but the file's owner, the user running
replayguard and root: how systemd hands a ``LoadCredential=`` file, root's and 0400, to a
service's ``User=``); in a directory that nobody else can write (so nobody can swap the
file), checked on the path after resolving symlinks, with
every directory above it either not writable by others or sticky (like /tmp). Each
failure is one ``ConfigError`` line naming the file and the fix. A directory about to
receive such a file (the keys dir, before a key is created in it) is held to the same
rule first, so nothing is written where it could not be trusted when read.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import struct
from pathlib import Path

from .errors import ConfigError


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def trusted_owners(data_dir: Path | None) -> set[int]:
    """The users whose files replayguard trusts: itself, root, and (as root) the data dir's owner."""
    owners = {os.geteuid(), 0}
    if os.geteuid() == 0 and data_dir is not None:
        with contextlib.suppress(OSError):
            owners.add(data_dir.stat().st_uid)
    return owners


def check_private_file(path: Path, what: str, *, data_dir: Path | None) -> None:
    """Raises ``ConfigError`` unless ``path`` (symlinks resolved) obeys the key-file rule."""
    real, st, shown = _resolved(path, what)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {shown} is not a regular file")
    owners = trusted_owners(data_dir)
    me = _user(os.geteuid())
    if st.st_uid not in owners:
        raise ConfigError(f"{what} {shown} belongs to user {_user(st.st_uid)}, not to {me} or root: "
                          f"replace it with one of your own (chown {me} {real})")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) and not _acl_keeps_private(real, st):
        raise ConfigError(f"{what} {shown} is accessible by group or others "
                          f"(mode {stat.S_IMODE(st.st_mode):o}): run chmod 600 {real}")
    _check_directories(real, shown, what, owners, me)


_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def _acl_entries(data: bytes) -> list[tuple[int, int, int]] | None:
    """The (tag, perm, id) entries of a ``system.posix_acl_access`` value (Linux's binary form:
    a little-endian u32 version 2, then u16 tag, u16 perm, u32 id per entry); None if malformed."""
    if len(data) < 4 or (len(data) - 4) % 8 or struct.unpack_from("<I", data)[0] != _ACL_VERSION:
        return None
    return [struct.unpack_from("<HHI", data, offset) for offset in range(4, len(data), 8)]


def _acl_keeps_private(real: Path, st: os.stat_result) -> bool:
    """True when the group bits of ``st`` only show a POSIX ACL's mask and the ACL lets nobody
    but the file's owner, the user running replayguard and root at it: no other bits, the
    owning group and others get nothing, named users are those three, named groups get nothing."""
    if st.st_mode & stat.S_IRWXO:
        return False
    try:
        entries = _acl_entries(os.getxattr(real, _ACL_XATTR))
    except OSError:  # no ACL (ENODATA), or a file system without them
        return False
    if not entries or not any(tag == _ACL_MASK for tag, _perm, _id in entries):
        return False  # without a mask the group bits are the owning group's own
    allowed = {st.st_uid, os.geteuid(), 0}
    for tag, perm, ident in entries:
        if tag in (_ACL_GROUP_OBJ, _ACL_GROUP, _ACL_OTHER) and perm:
            return False
        if tag == _ACL_USER and perm and ident not in allowed:
            return False
        if tag not in (_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER):
            return False
    return True


def check_private_dir(directory: Path, what: str, *, data_dir: Path | None) -> None:
    """Raises ``ConfigError`` unless a file created in ``directory`` (symlinks resolved) would
    pass the rule's directory checks: a trusted owner, and nobody else can write it or above it."""
    real, st, shown = _resolved(directory, what)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {shown} is not a directory")
    me = _user(os.geteuid())
    if st.st_uid not in trusted_owners(data_dir):
        raise ConfigError(f"{what} {shown} belongs to user {_user(st.st_uid)}, not to {me} or root: "
                          f"remove it, or chown {me} {real}")
    open_dir = _writable_by_others(real)
    if open_dir is not None:
        raise ConfigError(f"{what} {shown}: {open_dir} can be written by others "
                          f"(mode {stat.S_IMODE(open_dir.stat().st_mode):o}): run chmod go-w {open_dir}")


def _resolved(path: Path, what: str) -> tuple[Path, os.stat_result, str]:
    """``path`` with symlinks resolved, its stat, and how a message shows it."""
    try:
        real = path.resolve(strict=True)
        st = real.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    return real, st, f"{path}" if real == path else f"{path} (-> {real})"


def _writable_by_others(parent: Path) -> Path | None:
    """The first of ``parent`` and the directories above it that others can write, the sticky
    ones above it (like /tmp) excepted; None when there is none."""
    for directory in (parent, *parent.parents):
        dst = directory.stat()
        writable = dst.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not (dst.st_mode & stat.S_ISVTX and directory != parent):
            return directory
    return None


def _check_directories(real: Path, shown: str, what: str, owners: set[int], me: str) -> None:
    parent = real.parent
    pst = parent.stat()
    if pst.st_uid not in owners:
        raise ConfigError(f"{what} {shown} is in {parent}, which belongs to user {_user(pst.st_uid)}, "
                          f"not to {me} or root: move the file to a directory of yours")
    directory = _writable_by_others(parent)
    if directory is not None:
        raise ConfigError(f"{what} {shown} is in {directory}, which others can write "
                          f"(mode {stat.S_IMODE(directory.stat().st_mode):o}): run chmod go-w {directory}")
