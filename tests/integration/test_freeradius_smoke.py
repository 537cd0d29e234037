"""deploy/freeradius/smoke.sh: the FreeRADIUS README followed literally on Debian's stock tree.

The script copies /etc/freeradius/3.0, applies exactly the README's install and smoke
client blocks to the copy, starts `freeradius -f -d COPY` (stock listeners on 1812/1813
and inner-tunnel's 18120, so the test skips when they are taken) and runs the README's
radclient smoke test against a real `replayguard serve`. The copy lives in a directory
Debian's `freerad` user can traverse, as radiusd checks module files as that user.

The smoke:test block also runs against stand-ins for curl, oathtool and radclient that record
their arguments, to check that no secret is ever on a command line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from replayguard.settings import Settings
from tests.conftest import REPO, service_with_tokens, uid
from tests.integration.local_users import reachable_dir  # noqa: F401 - fixture

SMOKE = REPO / "deploy" / "freeradius" / "smoke.sh"
README = REPO / "deploy" / "freeradius" / "README.md"
STOCK = Path("/etc/freeradius/3.0")

needs_stock_freeradius = pytest.mark.skipif(
    shutil.which("freeradius") is None or shutil.which("radclient") is None or shutil.which("oathtool") is None
    or shutil.which("curl") is None or not (STOCK / "radiusd.conf").exists()
    or not Path("/usr/lib/freeradius/rlm_rest.so").exists() or os.geteuid() != 0,
    reason="needs root, Debian's freeradius, freeradius-utils, freeradius-rest, oathtool and curl (apt)",
)


def stock_ports_free() -> bool:
    """Whether the stock listeners' UDP ports are free on this machine."""
    for port in (1812, 1813, 18120):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@needs_stock_freeradius
async def test_readme_steps_on_the_stock_tree_pass_the_radclient_smoke_test(
    make_settings: Callable[..., Settings], service_factory: Callable[..., Any], reachable_dir: Path  # noqa: F811
) -> None:
    """The README's install, client and radclient steps on a copy of Debian's tree accept once, then
    reject, and leave the smoke user with no token."""
    if not stock_ports_free():
        pytest.skip("UDP 1812/1813/18120 are in use on this machine")
    url, tokens = await service_with_tokens(make_settings(), service_factory, ("admin", "callout"))
    smoke_user = uid("smoke")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "REPLAYGUARD_URL": url,
           "REPLAYGUARD_TOKEN": tokens["callout"], "ADMIN_TOKEN": tokens["admin"], "SMOKE_USER": smoke_user}
    result = subprocess.run(["sh", str(SMOKE), str(reachable_dir / "work")], env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Received Access-Accept" in result.stdout and "Received Access-Reject" in result.stdout
    assert "One-time password already used" in result.stdout
    async with aiohttp.ClientSession() as session, session.get(
            f"{url}/v1/principals/{smoke_user}/tokens",
            headers={"Authorization": f"Bearer {tokens['admin']}"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["items"] == []


TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"

# Each stand-in appends its argv (one line per argument) to ARGV_LOG, reads its stdin, and
# answers what the real tool would for the smoke test to go on.
SHIM = """#!/bin/sh
for arg in "$@"; do printf '%s\\n' "$arg" >> "$ARGV_LOG"; done
cat > /dev/null
case "$(basename "$0")" in
  curl) printf '%s' "$ENROLLED" ;;
  oathtool) echo 123456 ;;
  radclient) echo "Received Access-Accept" ;;
esac
exit 0
"""


def smoke_block(name: str) -> str:
    """The sh block after the README's ``<!-- smoke:NAME -->`` line."""
    found = re.search(rf"<!-- smoke:{name} -->\n```sh\n(.*?)```", README.read_text(), re.S)
    assert found, f"deploy/freeradius/README.md has no smoke:{name} block"
    return found.group(1)


def test_smoke_test_block_keeps_the_admin_token_and_totp_secret_off_command_lines(tmp_path: Path) -> None:
    """The README's smoke:test block never puts the admin token or the enrolled TOTP secret in a
    program's argv (world-readable in /proc/PID/cmdline, so visible to every local user in ps)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("curl", "oathtool", "radclient"):
        shim = bin_dir / tool
        shim.write_text(SHIM)
        shim.chmod(0o755)
    argv_log = tmp_path / "argv.log"
    argv_log.touch()
    admin_token = "rgt_ADMINTOKENforREVIEW0123456789"
    script = tmp_path / "test.sh"
    script.write_text(smoke_block("test"))
    enrolled = json.dumps({"token_id": "tok-review", "secret": TOTP_SECRET, "type": "totp"})
    subprocess.run(["sh", "-eu", str(script)], capture_output=True, text=True, timeout=60, env={
        "PATH": f"{bin_dir}:/usr/bin:/bin", "ARGV_LOG": str(argv_log), "ADMIN_TOKEN": admin_token,
        "REPLAYGUARD_URL": "http://127.0.0.1:9", "SMOKE_USER": "smoke-review", "ENROLLED": enrolled})
    argv = argv_log.read_text()
    assert "curl" in smoke_block("test") and argv, "the block ran none of its tools"
    assert admin_token not in argv, "the admin token is on curl's command line"
    assert TOTP_SECRET not in argv, "the TOTP secret is on oathtool's command line"
