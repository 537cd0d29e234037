"""The key-file rule: owner, mode, directory and symlink target of files holding secrets."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from replayguard.errors import ConfigError
from replayguard.private_files import check_private_file
from replayguard.settings import Secret, load_settings

if TYPE_CHECKING:
    from _typeshed import FileDescriptorOrPath, StrOrBytesPath

NOBODY = 65534


def _private(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    path = directory / "k"
    path.write_text("x\n")
    path.chmod(0o600)
    return path


def _readable(path: Path) -> Path:
    path.chmod(0o644)
    return path


def _dir_world_writable(path: Path) -> Path:
    path.parent.chmod(0o777)
    return path


def _dir_group_writable(path: Path) -> Path:
    path.parent.chmod(0o770)
    return path


def _someone_elses(path: Path) -> Path:
    os.chown(path, NOBODY, NOBODY)
    return path


def _someone_elses_dir(path: Path) -> Path:
    os.chown(path.parent, NOBODY, NOBODY)
    return path


def _link_to_readable(path: Path) -> Path:
    path.chmod(0o644)
    link = path.parent.parent / "link"
    link.symlink_to(path)
    return link


def _link_into_open_dir(path: Path) -> Path:
    open_dir = path.parent.parent / "open"
    open_dir.mkdir(mode=0o700)
    open_dir.chmod(0o777)
    target = open_dir / "k"
    path.rename(target)
    link = path.parent / "k"
    link.symlink_to(target)
    return link


CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("readable by others", _readable, "accessible by group or others .*chmod 600"),
    ("directory writable by others", _dir_world_writable, "which others can write .*chmod go-w"),
    ("directory writable by the group", _dir_group_writable, "which others can write"),
    ("symlink to a readable file", _link_to_readable, r"\(-> .*\) is accessible by group or others"),
    ("symlink into an open directory", _link_into_open_dir, "which others can write"),
]
if os.geteuid() == 0:
    CASES += [
        ("owned by another user", _someone_elses, "belongs to user nobody"),
        ("in another user's directory", _someone_elses_dir, "which belongs to user nobody"),
    ]


@pytest.mark.parametrize(("spoil", "message"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_spoiled_file_is_refused_with_the_fix(tmp_path: Path, spoil: Callable[[Path], Path], message: str) -> None:
    """Each way someone else could read or swap a secret file stops start-up with one line naming the fix."""
    path = spoil(_private(tmp_path))
    with pytest.raises(ConfigError, match=message):
        check_private_file(path, "key file", data_dir=tmp_path)


def test_private_file_passes(tmp_path: Path) -> None:
    """A 0600 file of this user's, in a 0700 directory of this user's, passes."""
    check_private_file(_private(tmp_path), "key file", data_dir=tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="root trusts the data dir's owner")
def test_root_trusts_the_data_dirs_owner(tmp_path: Path) -> None:
    """Run as root, a key file of the data dir's owner (the service user) passes."""
    path = _private(tmp_path)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for p in (data_dir, path, path.parent):
        os.chown(p, NOBODY, NOBODY)
    check_private_file(path, "key file", data_dir=data_dir)


SERVICE_UID = 10001  # stands for a unit's User=replayguard
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def _acl(owner_perm: int, uid: int, user_perm: int, *, group_perm: int = 0, other_perm: int = 0,
         extra: tuple[tuple[int, int, int], ...] = ()) -> bytes:
    """A POSIX access ACL (system.posix_acl_access): owner, user:<uid>, owning group, mask, other."""
    entries = [(_USER_OBJ, owner_perm, _NO_ID), (_USER, user_perm, uid), *extra, (_GROUP_OBJ, group_perm, _NO_ID),
               (_MASK, 7, _NO_ID), (_OTHER, other_perm, _NO_ID)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def _with_acl(path: Path, acl: bytes, mode: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gives ``path`` the ACL (as a real xattr; where the file system has no ACLs, as what
    os.getxattr answers for it) and the mode stat then shows."""
    try:
        os.setxattr(path, "system.posix_acl_access", acl)
    except OSError:
        real_getxattr = os.getxattr

        def getxattr(target: FileDescriptorOrPath, name: StrOrBytesPath, *, follow_symlinks: bool = True) -> bytes:
            if name == "system.posix_acl_access" and Path(str(target)) == path:
                return acl
            return real_getxattr(target, name, follow_symlinks=follow_symlinks)

        monkeypatch.setattr(os, "getxattr", getxattr)
    path.chmod(mode)


def test_a_systemd_credential_of_the_service_user_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A credential systemd writes for a unit's non-root User= (LoadCredential=: root's, 0400,
    plus an ACL entry user:<service>:r--, so stat shows mode 440) passes the rule: the ACL lets
    only root and the service user read it."""
    creds = tmp_path / "credentials" / "replayguard.service"
    creds.mkdir(parents=True, mode=0o700)
    secret = creds / "database_url"
    secret.write_text("postgresql://replayguard:pw@db/replayguard\n")
    _with_acl(secret, _acl(4, SERVICE_UID, 4), 0o440, monkeypatch)
    creds.chmod(0o550)
    assert secret.stat().st_mode & 0o777 == 0o440
    monkeypatch.setattr(os, "geteuid", lambda: SERVICE_UID)
    settings = load_settings(env={"REPLAYGUARD_DATABASE_URL_FILE": str(secret)})
    assert settings.database_url == Secret("postgresql://replayguard:pw@db/replayguard")


ACL_CASES: list[tuple[str, Callable[[int], bytes], int]] = [
    ("a named user other than this one", lambda me: _acl(4, me, 4, extra=((_USER, 4, me + 1),)), 0o440),
    ("the owning group", lambda me: _acl(4, me, 4, group_perm=4), 0o440),
    ("a named group", lambda me: _acl(4, me, 4, extra=((_GROUP, 4, 100),)), 0o440),
    ("others", lambda me: _acl(4, me, 4, other_perm=4), 0o444),
    ("a malformed ACL", lambda me: b"\x02\x00\x00\x00\x01", 0o440),
]


@pytest.mark.parametrize(("acl", "mode"), [(c[1], c[2]) for c in ACL_CASES], ids=[c[0] for c in ACL_CASES])
def test_an_acl_letting_anyone_else_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    acl: Callable[[int], bytes], mode: int) -> None:
    """A file whose POSIX ACL grants access to anyone but its owner, the user running
    replayguard and root is refused like any file others can read."""
    path = _private(tmp_path)
    _with_acl(path, acl(os.geteuid()), mode, monkeypatch)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        check_private_file(path, "secret file", data_dir=None)


def test_an_acl_naming_only_this_user_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same file with an ACL naming only the user running replayguard passes (the control
    of the refusals above)."""
    path = _private(tmp_path)
    _with_acl(path, _acl(6, os.geteuid(), 4), 0o640, monkeypatch)
    check_private_file(path, "secret file", data_dir=None)


def test_group_bits_without_an_acl_are_refused(tmp_path: Path) -> None:
    """Mode 0440 with no ACL behind it (the owning group can read) is refused."""
    path = _private(tmp_path)
    path.chmod(0o440)
    with pytest.raises(ConfigError, match=r"accessible by group or others \(mode 440\)"):
        check_private_file(path, "key file", data_dir=tmp_path)
