"""The PAM helper under the real PAM: pam_exec driven by `pamtester` and by `pamela`.

A real `replayguard serve` process decides; PAM runs the helper from deploy/pam exactly
as a guest would (password on stdin with a trailing NUL, no PATH). A snapshot revert is
simulated the way a guest lives it: the receipt file goes back to an older copy. The
helper is also run directly (as pam_exec does) against stand-in servers that answer
badly, to show it fails closed.
"""

from __future__ import annotations

import http.server
import json
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, dead_url, front_counts, uid
from tests.integration.pam_harness import (
    BAD_REPLIES,
    GOOD_ACCEPT,
    PERIOD,
    Guest,
    Host,
    StubHandler,
    needs_pam,
    needs_python3,
    pamtester,
    run_helper,
    stub_config,
    wait_for_fresh_step,
    wrong_code,
)


@needs_pam
@needs_python3
async def test_accept_then_reused(host: Host, make_guest: Callable[..., Guest]) -> None:
    """A valid code logs in once through PAM; the same code again is refused as reused.
    The helper's requests are answered by the fast front, not handed to aiohttp."""
    guest = make_guest(host.url, host.tokens["callout"])
    user = uid("alice")
    totp = await host.enroll(user)
    wait_for_fresh_step()
    code = totp.now()
    before = await front_counts(host.url)
    assert pamtester(guest, user, code)
    assert stat.S_IMODE(guest.receipt.stat().st_mode) == 0o600
    assert guest.receipt.read_text().startswith("rg2.")
    assert not pamtester(guest, user, code)
    after = await front_counts(host.url)
    # The helper's requests are the fast front's; only the second scrape went to aiohttp.
    assert {name: after[name] - before[name] for name in after} == {
        "replayguard_http_fast_answers_total": 2,
        'replayguard_http_front_handoffs_total{outcome="aiohttp"}': 1,
        'replayguard_http_front_handoffs_total{outcome="closed"}': 0}
    log = guest.log()
    assert "accept user=" + user in log and "reason=reused" in log
    assert code not in log


@needs_pam
@needs_python3
async def test_invalid_code_is_refused(host: Host, make_guest: Callable[..., Guest]) -> None:
    """A wrong code fails the PAM stack and the log says invalid, without the code."""
    guest = make_guest(host.url, host.tokens["callout"])
    user = uid("bob")
    totp = await host.enroll(user)
    code = wrong_code(totp)
    assert not pamtester(guest, user, code)
    assert "reject user=" + user in guest.log() and "reason=invalid" in guest.log()
    assert code not in guest.log()


async def _login_snapshot_login(host: Host, guest: Guest, user: str) -> tuple[str, str, float]:
    """Logs in, 'takes a snapshot' (copies the receipt), logs in again; returns the second code."""
    totp = await host.enroll(user)
    wait_for_fresh_step()
    now = time.time()
    assert pamtester(guest, user, totp.at(now))
    snapshot = guest.receipt.read_text()
    snapshot_at = time.time()
    code = totp.at(now + PERIOD)  # the next step: later than the first, still inside the drift window
    assert pamtester(guest, user, code)
    assert guest.receipt.read_text() != snapshot
    return code, snapshot, snapshot_at


@needs_pam
@needs_python3
async def test_replay_after_receipt_rollback(host: Host, make_guest: Callable[..., Guest]) -> None:
    """After the guest's disk goes back (older receipt), replaying a code is refused and flagged as a rollback."""
    guest = make_guest(host.url, host.tokens["callout"])
    user = uid("carol")
    code, snapshot, _ = await _login_snapshot_login(host, guest, user)
    guest.receipt.write_text(snapshot)  # the revert: the guest's receipt is the snapshot's again
    assert not pamtester(guest, user, code)
    last = guest.log().strip().splitlines()[-1]
    assert "reject user=" + user in last and "rollback_detected" in last
    assert code not in guest.log()


@needs_pam
@needs_python3
async def test_replay_after_hypervisor_revert(host: Host, make_guest: Callable[..., Guest]) -> None:
    """With the hypervisor's revert event posted, the replay is refused as replay_after_rollback."""
    guest = make_guest(host.url, host.tokens["callout"])
    user = uid("dave")
    vm_id = guest.config.read_text().split("vm_id = ", 1)[1].splitlines()[0]
    code, snapshot, snapshot_at = await _login_snapshot_login(host, guest, user)
    guest.receipt.write_text(snapshot)
    event = {"event_id": uid("evt"), "type": "snapshot.reverted", "vm_id": vm_id, "snapshot_id": "pre-login",
             "snapshot_created_at": datetime.fromtimestamp(snapshot_at - 1, UTC).isoformat(),
             "occurred_at": datetime.now(UTC).isoformat(), "host": "hv-test", "source_vm_id": None}
    status, body = await host.post("/v1/hypervisor/events", event, "hypervisor")
    assert status == 202, body
    assert not pamtester(guest, user, code)
    last = guest.log().strip().splitlines()[-1]
    assert "reason=replay_after_rollback" in last and "rollback_detected" in last


@needs_pam
@needs_python3
async def test_service_down_fails_closed(make_guest: Callable[..., Guest]) -> None:
    """With nothing listening at the service URL, PAM refuses and the log says unreachable."""
    with dead_url() as url:
        guest = make_guest(url, "rgt_unused")
        assert not pamtester(guest, uid("erin"), "123456")
    assert "service unreachable" in guest.log()
    assert not guest.receipt.exists()


@needs_pam
@needs_python3
async def test_silent_service_times_out_closed(make_guest: Callable[..., Guest]) -> None:
    """A service that accepts the connection but never answers fails the login after the timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        guest = make_guest(f"http://127.0.0.1:{listener.getsockname()[1]}", "rgt_unused", timeout=1)
        assert not pamtester(guest, uid("frank"), "123456")
    assert "did not answer in time" in guest.log() or "timed out" in guest.log()


@needs_pam
@needs_python3
async def test_pamela_accepts_once(host: Host, make_guest: Callable[..., Guest]) -> None:
    """From Python, pamela authenticates a valid code once and raises for its replay (auth stack only)."""
    import pamela  # pip: pamela (deploy/CI-PACKAGES.txt)
    guest = make_guest(host.url, host.tokens["callout"])
    user = uid("gina")
    totp = await host.enroll(user)
    wait_for_fresh_step()
    code = totp.now()
    # check=False: the stack has only the auth line; pamela would also run the (empty) account stack.
    pamela.authenticate(user, code, service=guest.pam_service, check=False)
    with pytest.raises(pamela.PAMError):
        pamela.authenticate(user, code, service=guest.pam_service, check=False)
    assert "reason=reused" in guest.log()


# --- the helper run directly, against stand-ins that answer badly ---------------------

@needs_python3
@pytest.mark.parametrize(("status", "body"), BAD_REPLIES)
def test_unparseable_or_failed_replies_fail_closed(tmp_path: Path, helper: Path, stub: Any,
                                                   status: int, body: bytes) -> None:
    """Any reply that is not a well-formed 200 decision fails closed and stores no receipt."""
    config = stub_config(tmp_path, stub(status, body))
    result = run_helper(helper, config, b"492039\x00")
    assert result.returncode != 0
    assert not (tmp_path / "receipts" / "receipt").exists()
    assert b"492039" not in result.stderr


class _Recording(http.server.ThreadingHTTPServer):
    """Serves _AcceptAnything: ``seen`` holds the method of each request it got."""

    seen: list[str]


class _AcceptAnything(http.server.BaseHTTPRequestHandler):
    """A listening server that would answer any request with an accept, and records what it got."""

    def _accept(self) -> None:
        assert isinstance(self.server, _Recording)
        self.server.seen.append(self.command)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(GOOD_ACCEPT)))
        self.end_headers()
        self.wfile.write(GOOD_ACCEPT)

    do_GET = do_POST = _accept

    def log_message(self, format: str, *args: Any) -> None:
        return


@needs_python3
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_not_followed(tmp_path: Path, helper: Path, stub: Any, status: int) -> None:
    """A redirect to a server that would accept is refused: exit non-zero, no receipt stored, and the
    redirect target never hears from the helper."""
    target = _Recording(("127.0.0.1", 0), _AcceptAnything)
    target.seen = []
    thread = threading.Thread(target=target.serve_forever, daemon=True)
    thread.start()
    try:
        location = f"http://127.0.0.1:{target.server_address[1]}/v1/otp/verify"
        url = stub(status, b"", {"Location": location})
        result = run_helper(helper, stub_config(tmp_path, url), b"492039\x00")
    finally:
        target.shutdown()
        target.server_close()
    assert result.returncode != 0
    assert target.seen == []
    assert not (tmp_path / "receipts" / "receipt").exists()


@needs_python3
def test_stub_accept_stores_receipt_atomically(tmp_path: Path, helper: Path, stub: Any) -> None:
    """An accept exits 0 and leaves exactly one 0600 receipt file and no temporary file."""
    result = run_helper(helper, stub_config(tmp_path, stub(200, GOOD_ACCEPT)), b"492039\x00")
    assert result.returncode == 0, result.stderr
    receipts = tmp_path / "receipts"
    assert sorted(p.name for p in receipts.iterdir()) == ["receipt", "receipt.lock"]
    assert (receipts / "receipt").read_text() == "rg1.a.b\n"
    assert stat.S_IMODE((receipts / "receipt").stat().st_mode) == 0o600


@needs_python3
def test_request_carries_user_service_rhost_and_receipt(tmp_path: Path, helper: Path) -> None:
    """The helper posts principal=PAM_USER, context {service, remote_addr}, the stored receipt
    and a fresh request id, and once the new receipt is stored no request is pending."""
    seen: list[dict[str, Any]] = []

    class Recorder(StubHandler):
        def do_POST(self) -> None:
            seen.append({"body": json.loads(self.rfile.read(int(self.headers["Content-Length"]))),
                         "auth": self.headers["Authorization"], "path": self.path})
            body = GOOD_ACCEPT.replace(b"rg1.a.b", b"rg1.next.mac")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = stub_config(tmp_path, f"http://127.0.0.1:{server.server_address[1]}/")
        (tmp_path / "receipts").mkdir(mode=0o700)
        (tmp_path / "receipts" / "receipt").write_text("rg1.prev.mac\n")
        assert run_helper(helper, config, b"492039\x00").returncode == 0
    finally:
        server.shutdown()
        server.server_close()
    request = seen[0]["body"].pop("receipt_request")
    assert seen == [{"path": "/v1/otp/verify", "auth": "Bearer rgt_stub", "body": {
        "vm_id": "vm-stub", "principal": "alice", "otp": "492039", "receipt": "rg1.prev.mac", "receipt_kept": True,
        "context": {"service": "sshd", "remote_addr": "192.0.2.7"}}}]
    assert len(request) == 32 and request.isascii() and request.isprintable()
    assert (tmp_path / "receipts" / "receipt").read_text() == "rg1.next.mac\n"
    assert not (tmp_path / "receipts" / "receipt.pending").exists()


@needs_python3
@pytest.mark.parametrize(("stdin", "env"), [
    (b"", {}),
    (b"\x00", {}),
    (b"\xff\xfe\x00", {}),
    (b"1" * 2000 + b"\x00", {}),
    (b"12\x0734\x00", {}),
    (b"492039\x00", {"PAM_USER": ""}),
    (b"492039\x00", {"PAM_TYPE": "account"}),
])
def test_unusable_input_fails_before_asking(tmp_path: Path, helper: Path, stub: Any,
                                            stdin: bytes, env: dict[str, str]) -> None:
    """No password, a non-OTP password, no user or a non-auth stack all fail without a receipt."""
    result = run_helper(helper, stub_config(tmp_path, stub(200, GOOD_ACCEPT)), stdin, **env)
    assert result.returncode != 0
    assert not (tmp_path / "receipts" / "receipt").exists()


@needs_python3
def test_stdin_held_open_fails_closed(tmp_path: Path, helper: Path, stub: Any) -> None:
    """A password writer that never sends the NUL nor closes the pipe cannot hold the login: it fails."""
    config = stub_config(tmp_path, stub(200, GOOD_ACCEPT), timeout=1)
    proc = subprocess.Popen([str(helper), "--config", str(config)], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PAM_USER": "alice", "PAM_TYPE": "auth"})
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(b"4920")
    proc.stdin.flush()
    try:
        assert proc.wait(timeout=60) == 3
        assert b"did not answer in time" in proc.stderr.read()
    finally:
        proc.stdin.close()
        proc.stderr.close()


@needs_python3
@pytest.mark.parametrize("lines", [
    "vm_id = x\ntoken = t\n",
    "service_url = http://127.0.0.1:9\ntoken = t\n",
    "service_url = ftp://x\nvm_id = x\ntoken = t\n",
    "service_url = http://127.0.0.1:9\nvm_id = x\n",
    "service_url = http://127.0.0.1:9\nvm_id = x\ntoken_file = /nonexistent/token\n",
    "service_url = http://127.0.0.1:9\nvm_id = x\ntoken = t\ntimeout = soon\n",
    "service_url = http://127.0.0.1:9\nvm_id = x\ntoken = t\nreceipt_dir = relative/dir\n",
    "this line has no equals sign\n",
])
def test_bad_config_fails_closed(tmp_path: Path, helper: Path, lines: str) -> None:
    """Every configuration fault ends in exit status 2 (configuration), never an accept."""
    config = tmp_path / "pam.conf"
    config.write_text(lines)
    result = run_helper(helper, config, b"492039\x00")
    assert result.returncode == 2, result.stderr


@needs_python3
def test_missing_config_fails_closed(tmp_path: Path, helper: Path) -> None:
    """A config file that does not exist refuses the login."""
    assert run_helper(helper, tmp_path / "absent.conf", b"492039\x00").returncode == 2


def test_example_stack_and_config_name_the_helper() -> None:
    """The shipped /etc/pam.d example runs the helper with expose_authtok at the documented path."""
    stack = (REPO / "deploy" / "pam" / "replayguard").read_text()
    rule = [line for line in stack.splitlines() if line and not line.startswith("#")]
    assert rule == ["auth required pam_exec.so expose_authtok quiet /usr/local/lib/replayguard/replayguard-pam-helper"]
    example = (REPO / "deploy" / "pam" / "pam.conf.example").read_text()
    for key in ("service_url", "vm_id", "token_file", "receipt_dir", "timeout"):
        assert f"\n{key} = " in example
