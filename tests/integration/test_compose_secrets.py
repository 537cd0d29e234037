"""deploy/compose/make-secrets.sh: run as root, it gives the service (uid 10001) a secret file
the service accepts; run as anyone else, it stops and says to run it with sudo."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from replayguard.settings import Secret, load_settings
from tests.conftest import REPO
from tests.integration.local_users import LocalUser, local_user, reachable_dir  # noqa: F401 - fixtures

SERVICE_UID = 10001  # the image's user (deploy/compose/Dockerfile)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="checks what root and another user get; needs root")


def _copy_script(place: Path) -> Path:
    compose = place / "compose"
    compose.mkdir()
    shutil.copy(REPO / "deploy" / "compose" / "make-secrets.sh", compose / "make-secrets.sh")
    return compose


def test_make_secrets_as_non_root_stops_and_asks_for_sudo(
    local_user: LocalUser, reachable_dir: Path  # noqa: F811
) -> None:
    """Run by a non-root user, who cannot give the file to uid 10001, make-secrets.sh exits
    non-zero saying to run it with sudo, and writes no secret (a file of that user's, or one
    others can read, would be refused by the service at start)."""
    compose = _copy_script(reachable_dir)
    os.chown(compose, local_user.uid, local_user.gid)
    done = local_user.run("/bin/sh", str(compose / "make-secrets.sh"))
    assert done.returncode != 0 and "sudo" in done.stderr, (done.returncode, done.stdout, done.stderr)
    assert "secrets ready" not in done.stdout and not (compose / "secrets").exists()


def test_make_secrets_as_root_gives_a_file_the_service_accepts(
    reachable_dir: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """Run as root, make-secrets.sh leaves secrets/database_url owned by uid 10001, mode 0600,
    which the service (uid 10001) accepts as mounted by `secrets:` (owner and mode kept)."""
    compose = _copy_script(reachable_dir)
    done = subprocess.run(["/bin/sh", str(compose / "make-secrets.sh")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and "secrets ready" in done.stdout, done.stderr
    made = compose / "secrets" / "database_url"
    st = made.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (SERVICE_UID, 0o600)
    mounted_dir = reachable_dir / "run-secrets"  # root-owned 0755, as /run/secrets in the container
    mounted_dir.mkdir(mode=0o755)
    mounted = mounted_dir / "database_url"
    shutil.copy2(made, mounted)
    os.chown(mounted, st.st_uid, st.st_gid)
    monkeypatch.setattr(os, "geteuid", lambda: SERVICE_UID)
    settings = load_settings(env={"REPLAYGUARD_DATABASE_URL_FILE": str(mounted)})
    assert settings.database_url == Secret(made.read_text().strip())
    assert settings.database_url.reveal().startswith("postgresql://replayguard:")

