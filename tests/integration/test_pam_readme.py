"""deploy/pam/README.md, followed literally: its install block under sh (dash) and its
pamtester check, against a real `replayguard serve`; the stack it tells a service to use,
under pamtester; and its exit-code table against what the helper really prints.

The install writes the README's real paths; the test skips when any of them already
exists (they are not this test's to overwrite) and removes them afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, uid
from tests.integration.local_users import LocalUser, local_user  # noqa: F401 - fixture
from tests.integration.pam_harness import (
    PAM_DIR,
    Guest,
    Host,
    forwarder,
    needs_pam,
    needs_python3,
    run_helper,
    stub_config,
    wait_for_fresh_step,
)

PAM_DEPLOY = REPO / "deploy" / "pam"
README = PAM_DEPLOY / "README.md"
SMOKE = PAM_DEPLOY / "smoke.sh"
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


def install_block(root: Path) -> str:
    """The README's smoke:install block with its absolute paths moved under ``root``."""
    found = re.search(r"<!-- smoke:install -->\n```sh\n(.*?)```", README.read_text(), re.S)
    assert found, "deploy/pam/README.md has no smoke:install block"
    block = found.group(1)
    for path in INSTALLED:
        block = block.replace(str(path), f"{root}{path}")
    return block


@pytest.mark.parametrize("vm_id", ["R&D-web-01", "web|01", "lab\\01", "a/b", "$HOME"])
def test_install_block_writes_the_vm_id_it_is_given(tmp_path: Path, vm_id: str) -> None:
    """The install block writes VM_ID (and the URL) into pam.conf unchanged, whatever sed or the
    shell would make of its characters, so the guest's logins are recorded against its own VM."""
    root = tmp_path / "root"
    (root / "etc/pam.d").mkdir(parents=True)  # present on every guest
    script = tmp_path / "install.sh"
    script.write_text(install_block(root))
    url = "http://192.0.2.1:8080/a&b|c"
    result = subprocess.run(["sh", "-eu", str(script)], cwd=PAM_DEPLOY, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "REPLAYGUARD_URL": url,
                                 "VM_ID": vm_id, "CALLOUT_TOKEN": "rgt_review"})
    assert result.returncode == 0, result.stderr
    config = (root / "etc/replayguard/pam.conf").read_text()
    assert re.findall(r"^vm_id = (.*)$", config, re.M) == [vm_id], config
    assert re.findall(r"^service_url = (.*)$", config, re.M) == [url], config
    assert (root / "etc/replayguard/pam.conf").stat().st_mode & 0o777 == 0o600


def readme_stack() -> str:
    """The auth lines the README tells a service's stack to use (its pam:stack block)."""
    found = re.search(r"<!-- pam:stack -->\n```\n(.*?)```", README.read_text(), re.S)
    assert found, "deploy/pam/README.md shows no pam:stack block"
    return found.group(1)


@needs_pam
@needs_python3
async def test_readme_stack_asks_for_the_code_and_never_sends_the_unix_password(
    host: Host, make_guest: Callable[..., Guest], local_user: LocalUser,  # noqa: F811
) -> None:
    """A user with a Unix password who answers the README's service stack with a fresh code logs
    in under the real pam_exec, and that code is all the service receives."""
    unix_password = "Unix-Pass-for-review-42"
    subprocess.run(["chpasswd"], input=f"{local_user.name}:{unix_password}\n", text=True, check=True, timeout=60)
    with forwarder(host.url) as recorder:
        guest = make_guest(recorder.url, host.tokens["callout"])
        # The README's stack, with /etc/pam.d/replayguard standing for the guest's helper stack.
        service = PAM_DIR / f"replayguard-test-{uuid.uuid4().hex[:12]}"
        service.write_text(re.sub(r"^@include replayguard$", f"@include {guest.pam_service}", readme_stack(),
                                  flags=re.M))
        try:
            totp = await host.enroll(local_user.name)
            wait_for_fresh_step()
            code = totp.now()
            result = subprocess.run(["pamtester", "-v", service.name, local_user.name, "authenticate"],
                                    input=f"{code}\n", capture_output=True, text=True, timeout=60)
        finally:
            service.unlink(missing_ok=True)
        sent = [json.loads(body).get("otp") for body in recorder.bodies]
    assert result.returncode == 0, result.stdout + result.stderr + guest.log()
    assert sent == [code]


def test_stack_docs_never_advise_the_helper_after_a_password_module() -> None:
    """The README and the example stack's comment place the helper in place of common-auth, never
    after it (pam_exec would then send the Unix password as the OTP)."""
    for path in (README, PAM_DEPLOY / "replayguard"):
        text = " ".join(path.read_text().split())
        for advice in ("(password, then OTP)", "after the password check"):
            assert advice not in text, (path.name, advice)


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
