"""deploy/pam/README.md, followed literally: its install block under sh (dash) and its
pamtester check, against a real `replayguard serve`; and its exit-code table against what
the helper really prints.

The install writes the README's real paths; the test skips when any of them already
exists (they are not this test's to overwrite) and removes them afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, uid
from tests.integration.pam_harness import (
    Host,
    needs_pam,
    needs_python3,
    run_helper,
    stub_config,
    wait_for_fresh_step,
)

README = REPO / "deploy" / "pam" / "README.md"
SMOKE = REPO / "deploy" / "pam" / "smoke.sh"
INSTALLED = [Path("/usr/local/lib/replayguard"), Path("/etc/replayguard"), Path("/var/lib/replayguard"),
             Path("/etc/pam.d/replayguard")]


@pytest.fixture
def clean_install_paths() -> Iterator[None]:
    """The README's install paths, free before the test and removed after it."""
    taken = [str(path) for path in INSTALLED if path.exists()]
    if taken:
        pytest.skip(f"already present, not this test's to overwrite: {', '.join(taken)}")
    try:
        yield
    finally:
        for path in INSTALLED:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@needs_pam
@needs_python3
@pytest.mark.skipif(shutil.which("dash") is None, reason="needs dash, Debian's sh")
async def test_readme_install_and_pamtester_check_run_as_written(host: Host, clean_install_paths: None) -> None:
    """The README's install block under dash installs a working
    stack: its pamtester check accepts once, then refuses."""
    user = uid("ivy")
    totp = await host.enroll(user)
    wait_for_fresh_step()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "REPLAYGUARD_URL": host.url, "VM_ID": uid("vm"),
           "CALLOUT_TOKEN": host.tokens["callout"], "OTP_USER": user, "CODE": totp.now()}
    result = subprocess.run(["dash", str(SMOKE)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "successfully authenticated" in result.stdout
    assert Path("/etc/replayguard/callout.token").stat().st_mode & 0o777 == 0o600
    assert Path("/var/lib/replayguard/receipt").exists()


def table_line(exit_status: int) -> str:
    """The example log line of one row of the README's exit-code table."""
    row = next(line for line in README.read_text().splitlines() if line.startswith(f"| {exit_status} |"))
    return re.findall(r"`([^`]*)`", row)[-1]


@needs_python3
def test_readme_exit_lines_are_what_the_helper_prints(tmp_path: Path, helper: Path) -> None:
    """The exit-2 and exit-3 example lines of the README are the helper's own words."""
    config = tmp_path / "pam.conf"
    config.write_text("service_url = http://127.0.0.1:9\ntoken = t\n")
    result = run_helper(helper, config, b"492039\x00")
    assert result.returncode == 2
    expected = table_line(2).replace("/etc/replayguard/pam.conf", str(config))
    assert result.stderr.decode().strip() == "replayguard-pam: " + expected
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        result = run_helper(helper, stub_config(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1),
                            b"492039\x00")
    assert result.returncode == 3
    assert result.stderr.decode().strip() == "replayguard-pam: " + table_line(3)


def test_readme_install_block_has_no_bashisms() -> None:
    """The install and check blocks use nothing dash lacks (no here-strings, no [[ ]])."""
    text = README.read_text()
    blocks = re.findall(r"<!-- smoke:\w+ -->\n```sh\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    for block in blocks:
        assert "<<<" not in block and "[[" not in block
    assert os.access(SMOKE, os.X_OK)
