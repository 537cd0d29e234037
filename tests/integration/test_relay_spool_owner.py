"""Another local user against a relay's spool: a directory they own or can write is refused.

The attacker is a throwaway unprivileged user who prepares the spool path before the relay
starts and drops a forged revert into it; the relay (run as root here) must refuse the
directory with one line and exit 2, and deliver nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from tests.conftest import REPO, cli_env
from tests.integration.local_users import LocalUser, local_user, reachable_dir  # noqa: F401 - fixtures

FORGED = {"upid": "UPID:pve1:00000001:00000001:6B0BF2F0:qmrollback:101:ops@pve:", "type": "qmrollback"}


def relay(spool: Path, token: Path) -> subprocess.CompletedProcess[str]:
    """`replayguard-relay proxmox --from-stdin` with an empty task list, against a port nobody listens on."""
    return subprocess.run(
        [sys.executable, "-m", "replayguard.relay.proxmox", "--from-stdin", "--lookup", "none",
         "--service-url", "http://127.0.0.1:9", "--token-file", str(token), "--spool-dir", str(spool)],
        input="[]", capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=60)


def shared_tmp(base: Path) -> Path:
    """A sticky, world-writable directory like /tmp, where the attacker can create entries."""
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


def test_a_spool_precreated_by_another_user_is_refused(
    tmp_path: Path, reachable_dir: Path, local_user: LocalUser  # noqa: F811
) -> None:
    """A spool directory another user created (0700, theirs) with a forged revert in it is refused: exit 2, one line."""
    spool = shared_tmp(reachable_dir) / "spool"
    assert local_user.run("mkdir", "-m", "0700", str(spool)).returncode == 0
    forged = orjson.dumps(FORGED).decode()
    assert local_user.run("sh", "-c", f"printf '%s' '{forged}' > {spool}/evt-00000000000000000001-0123456789abcdef.json"
                          ).returncode == 0
    token = tmp_path / "token"
    token.write_text("hv-token\n")
    result = relay(spool, token)
    assert result.returncode == 2, result.stderr
    assert f"owned by uid {local_user.uid}" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_a_world_writable_spool_is_refused_even_if_root_owns_it(
    tmp_path: Path, reachable_dir: Path, local_user: LocalUser  # noqa: F811
) -> None:
    """A root-owned spool at 0777, into which another user dropped a forged revert, is refused: exit 2, one line."""
    spool = reachable_dir / "spool"
    spool.mkdir()
    spool.chmod(0o777)
    forged = orjson.dumps(FORGED).decode()
    assert local_user.run("sh", "-c", f"printf '%s' '{forged}' > {spool}/evt-00000000000000000001-0123456789abcdef.json"
                          ).returncode == 0
    token = tmp_path / "token"
    token.write_text("hv-token\n")
    result = relay(spool, token)
    assert result.returncode == 2 and "writable by group or others (mode 0777)" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
