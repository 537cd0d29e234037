"""The key-file rule: owner, mode, directory and symlink target of files holding secrets."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from replayguard.errors import ConfigError
from replayguard.private_files import check_private_file

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
