"""deploy/freeradius/smoke.sh: the FreeRADIUS README followed literally on Debian's stock tree.

The script copies /etc/freeradius/3.0, applies exactly the README's install and smoke
client blocks to the copy, starts `freeradius -f -d COPY` (stock listeners on 1812/1813
and inner-tunnel's 18120, so the test skips when they are taken) and runs the README's
radclient smoke test against a real `replayguard serve`. The copy lives in a directory
Debian's `freerad` user can traverse, as radiusd checks module files as that user.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from replayguard.runtime import open_runtime
from replayguard.settings import Settings
from tests.conftest import REPO, uid
from tests.integration.local_users import reachable_dir  # noqa: F401 - fixture

SMOKE = REPO / "deploy" / "freeradius" / "smoke.sh"
STOCK = Path("/etc/freeradius/3.0")

pytestmark = pytest.mark.skipif(
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


async def test_readme_steps_on_the_stock_tree_pass_the_radclient_smoke_test(
    make_settings: Callable[..., Settings], service_factory: Callable[..., Any], reachable_dir: Path  # noqa: F811
) -> None:
    """The README's install, client and radclient steps on a copy of Debian's tree: accept once, then reject."""
    if not stock_ports_free():
        pytest.skip("UDP 1812/1813/18120 are in use on this machine")
    settings = make_settings()
    tokens = {}
    async with open_runtime(settings, migrate=False) as runtime:
        for role in ("admin", "callout"):
            _, tokens[role] = await runtime.api_tokens.create(role, uid(role))
    assert settings.database_url is not None
    service = await service_factory(data_dir=settings.data_dir, database_url=settings.database_url.reveal())
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "REPLAYGUARD_URL": service.url,
           "REPLAYGUARD_TOKEN": tokens["callout"], "ADMIN_TOKEN": tokens["admin"], "SMOKE_USER": uid("smoke")}
    result = subprocess.run(["sh", str(SMOKE), str(reachable_dir / "work")], env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Received Access-Accept" in result.stdout and "Received Access-Reject" in result.stdout
    assert "One-time password already used" in result.stdout
