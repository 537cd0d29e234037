"""The PAM helper when the host's answer never reaches it (a timeout after the host decided)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.conftest import uid
from tests.integration.pam_harness import Guest, Host, forwarder, needs_python3, run_helper, wait_for_fresh_step


@needs_python3
async def test_an_answer_lost_after_the_host_decided_is_not_a_rollback(
    refusing_host: Host, make_guest: Callable[..., Guest], helper: Path,
) -> None:
    """When one login's answer is lost (the helper timed out after the host committed it), the VM's
    next login with a valid code is accepted and not flagged rollback_detected (no critical alert, no refusal)."""
    host = refusing_host
    first, slow, second = uid("alice"), uid("slow"), uid("bob")
    totp_first, totp_second = await host.enroll(first), await host.enroll(second)
    with forwarder(host.url, hold=lambda body: body.get("principal") == slow) as relay:
        guest = make_guest(relay.url, host.tokens["callout"], timeout=2)
        wait_for_fresh_step()
        assert run_helper(helper, guest.config, totp_first.now().encode() + b"\x00", PAM_USER=first).returncode == 0
        lost = run_helper(helper, guest.config, b"000000\x00", PAM_USER=slow)  # decided, answer held past the timeout
        assert lost.returncode == 3 and relay.held.is_set(), lost.stderr
        relay.release.set()
        wait_for_fresh_step()
        result = run_helper(helper, guest.config, totp_second.now().encode() + b"\x00", PAM_USER=second)
    line = result.stderr.decode(errors="replace").strip()
    assert result.returncode == 0 and "rollback_detected" not in line, line
