"""Throwaway unprivileged local users for tests of what another user on the host can do.

Created with ``useradd`` (no home, no login shell) under a unique name and removed with
``userdel`` afterwards. Needs root; tests skip with the reason otherwise.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class LocalUser:
    name: str
    uid: int
    gid: int

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Runs a command as this user (setuid in the child), with a minimal environment."""
        uid, gid = self.uid, self.gid

        def drop() -> None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

        return subprocess.run(list(args), preexec_fn=drop, capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin"}, timeout=60, check=False)


@pytest.fixture
def local_user() -> Iterator[LocalUser]:
    """A fresh unprivileged user; removed after the test."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating a throwaway local user needs root and useradd")
    name = f"rgt{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                   capture_output=True, timeout=60)
    entry = pwd.getpwnam(name)
    try:
        yield LocalUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=60)


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory other local users can traverse (pytest's own tmp dirs are 0700 root): a
    0755 directory under the system temp dir, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="rg-users-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
