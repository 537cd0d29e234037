"""The PAM helper against what else lives in the guest: other users, a hostile environment,
broken HTTP, a lost receipt, and the user who started it through su.

The helper runs as pam_exec runs it (no PATH, PAM_* variables, password then NUL) and,
where the service matters, under pamtester against a real `replayguard serve`. The other
user is a throwaway unprivileged account created by the test.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import uid
from tests.integration.local_users import LocalUser, local_user, reachable_dir  # noqa: F401 - fixtures
from tests.integration.pam_harness import (
    GOOD_ACCEPT,
    Guest,
    Host,
    forwarder,
    helper_pids,
    needs_pam,
    needs_python3,
    pamtester,
    run_helper,
    stub_config,
    wait_for_fresh_step,
)


def one_line(stderr: bytes) -> str:
    """The helper's stderr, which must be exactly one line."""
    lines = stderr.decode("utf-8", "replace").splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


# --- the receipt directory is the helper's own ------------------------------------------


@needs_python3
def test_receipt_dir_writable_by_others_is_refused(tmp_path: Path, helper: Path, stub: Any) -> None:
    """A receipt directory at 0777 is a configuration error (exit 2): nothing is asked, nothing stored."""
    receipts = tmp_path / "receipts"
    receipts.mkdir()
    receipts.chmod(0o777)
    result = run_helper(helper, stub_config(tmp_path, stub(200, GOOD_ACCEPT)), b"492039\x00")
    assert result.returncode == 2 and "writable by group or others (mode 0777)" in one_line(result.stderr)
    assert not list(receipts.iterdir())


@needs_python3
def test_receipt_dir_owned_by_another_user_is_refused(
    tmp_path: Path, helper: Path, stub: Any, local_user: LocalUser  # noqa: F811
) -> None:
    """A receipt directory another user owns (and could fill) is refused with exit 2."""
    receipts = tmp_path / "receipts"
    receipts.mkdir(mode=0o700)
    os.chown(receipts, local_user.uid, local_user.gid)
    result = run_helper(helper, stub_config(tmp_path, stub(200, GOOD_ACCEPT)), b"492039\x00")
    assert result.returncode == 2 and f"owned by uid {local_user.uid}" in one_line(result.stderr)


@needs_python3
def test_symlinked_lock_is_never_followed(tmp_path: Path, helper: Path, stub: Any) -> None:
    """A receipt.lock planted as a symlink is refused (exit 2); the file it names is neither created nor touched."""
    receipts = tmp_path / "receipts"
    receipts.mkdir(mode=0o700)
    target = tmp_path / "created-by-root"
    (receipts / "receipt.lock").symlink_to(target)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (receipts / "receipt").symlink_to(victim)
    result = run_helper(helper, stub_config(tmp_path, stub(200, GOOD_ACCEPT)), b"492039\x00")
    assert result.returncode == 2 and "symlink" in one_line(result.stderr)
    assert not target.exists() and victim.read_bytes() == b"keep"


@needs_python3
def test_symlinked_receipt_is_refused(tmp_path: Path, helper: Path, stub: Any) -> None:
    """A receipt planted as a symlink to an old receipt elsewhere is refused, never read or replaced."""
    receipts = tmp_path / "receipts"
    receipts.mkdir(mode=0o700)
    old = tmp_path / "old-receipt"
    old.write_text("rg1.old.mac\n")
    (receipts / "receipt").symlink_to(old)
    result = run_helper(helper, stub_config(tmp_path, stub(200, GOOD_ACCEPT)), b"492039\x00")
    assert result.returncode == 2 and "symlink" in one_line(result.stderr)
    assert old.read_text() == "rg1.old.mac\n"


@needs_python3
def test_symlinked_receipt_dir_is_refused(tmp_path: Path, helper: Path, stub: Any) -> None:
    """receipt_dir naming a symlink is refused: the helper does not follow it to someone else's directory."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "receipts").symlink_to(real)
    result = run_helper(helper, stub_config(tmp_path, stub(200, GOOD_ACCEPT)), b"492039\x00")
    assert result.returncode == 2 and "symlink" in one_line(result.stderr)
    assert not list(real.iterdir())


@needs_python3
def test_other_users_can_neither_hold_the_lock_nor_plant_a_receipt(
    reachable_dir: Path, helper: Path, stub: Any, local_user: LocalUser  # noqa: F811
) -> None:
    """After a login the receipt dir is 0700 and its files 0600:
    another user cannot open the lock or write a receipt."""
    result = run_helper(helper, stub_config(reachable_dir, stub(200, GOOD_ACCEPT)), b"492039\x00")
    assert result.returncode == 0, result.stderr
    receipts = reachable_dir / "receipts"
    hold = local_user.run("sh", "-c", f"exec 3<>{receipts}/receipt.lock")
    plant = local_user.run("sh", "-c", f"echo rg1.old.mac > {receipts}/receipt")
    assert hold.returncode != 0 and plant.returncode != 0
    assert (receipts / "receipt").read_text() == "rg1.a.b\n"


@needs_python3
def test_receipt_dir_none_keeps_no_receipt(tmp_path: Path, helper: Path) -> None:
    """receipt_dir = none (a helper run as an ordinary user)
    sends neither receipt nor receipt_kept and stores nothing."""
    seen: list[bytes] = []

    def accept(request: bytes) -> bytes:
        seen.append(request)
        return http_reply(200, GOOD_ACCEPT)

    url = serve_raw(accept)
    config = stub_config(tmp_path, url, receipt_dir="none")
    result = run_helper(helper, config, b"492039\x00")
    assert result.returncode == 0, result.stderr
    assert b'"receipt_kept"' not in seen[0] and b'"receipt"' not in seen[0]
    assert not (tmp_path / "receipts").exists()


# --- broken HTTP and hostile error bodies -------------------------------------------------


def http_reply(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
            % (status, len(body), extra)) + body


def serve_raw(answer: Callable[[bytes], bytes]) -> str:
    """A one-connection-at-a-time TCP server writing ``answer(request)`` raw, then closing; its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(answer(body))

    threading.Thread(target=loop, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


BROKEN = {
    "cut-off chunked body": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"40\r\n{\"decision\": \"acc",
    "bad status line": b"HTTP/1.1 two hundred OK\r\n\r\n{}",
    "not HTTP at all": b"SSH-2.0-OpenSSH_9.2\r\n",
    "cut-off content-length body": b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"decision\"",
}


@needs_python3
@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_http_is_a_documented_exit_with_one_line(tmp_path: Path, helper: Path, name: str) -> None:
    """A cut-off body or a bad status line ends in exit 4 with one log line, never a traceback or exit 1."""
    url = serve_raw(lambda _request: BROKEN[name])
    result = run_helper(helper, stub_config(tmp_path, url), b"492039\x00")
    line = one_line(result.stderr)
    assert result.returncode in (3, 4) and result.returncode != 1, line
    assert not (tmp_path / "receipts" / "receipt").exists()


@needs_python3
def test_a_newline_in_the_services_error_code_cannot_forge_a_log_line(tmp_path: Path, helper: Path) -> None:
    """An error code holding a newline and a fake accept is logged escaped, on the helper's one line."""
    body = b'{"error": {"code": "x\\naccept user=root service=sshd reason=ok", "message": "m"}}'
    url = serve_raw(lambda _request: http_reply(503, body))
    result = run_helper(helper, stub_config(tmp_path, url), b"492039\x00")
    line = one_line(result.stderr)
    assert result.returncode == 3 and "\\n" in line and line.startswith("replayguard-pam: refused user=alice")


# --- the environment cannot choose the CA -------------------------------------------------


@pytest.fixture
def attacker_tls(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS stand-in (TLS 1.2 at most) whose certificate an attacker's CA signed; (its URL, that CA's file)."""
    d = tmp_path / "tls"
    d.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
            "-days", "2", "-subj", "/CN=attacker CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "srv.key"), "-out", str(d / "srv.csr"),
            "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(d / "srv.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-out", str(d / "srv.pem"), "-days", "2", "-extfile", str(d / "ext"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(d / "srv.pem", d / "srv.key")
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def loop() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(raw, server_side=True) as conn:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    conn.sendall(http_reply(200, GOOD_ACCEPT))
            except (OSError, ssl.SSLError):
                continue

    threading.Thread(target=loop, daemon=True).start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}", d / "ca.pem"
    listener.close()


@needs_python3
def test_the_tls_stand_in_is_trusted_with_its_ca_as_ca_file(tmp_path: Path, helper: Path,
                                                            attacker_tls: tuple[str, Path]) -> None:
    """Control: naming the stand-in's CA as ca_file makes the helper accept its reply."""
    url, ca = attacker_tls
    result = run_helper(helper, stub_config(tmp_path, url, ca_file=ca), b"492039\x00")
    assert result.returncode == 0, result.stderr


@needs_python3
@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
def test_ca_from_the_environment_is_not_trusted(tmp_path: Path, helper: Path, attacker_tls: tuple[str, Path],
                                                variable: str) -> None:
    """SSL_CERT_FILE or SSL_CERT_DIR naming the attacker's CA in the PAM environment is ignored: the login fails."""
    url, ca = attacker_tls
    if variable == "SSL_CERT_DIR":
        subprocess.run(["openssl", "rehash", str(ca.parent)], check=True, capture_output=True, timeout=60)
    value = str(ca) if variable == "SSL_CERT_FILE" else str(ca.parent)
    result = run_helper(helper, stub_config(tmp_path, url, ca_file="system"), b"492039\x00", **{variable: value})
    assert result.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in one_line(result.stderr)


@needs_python3
def test_openssl_conf_from_the_environment_is_not_loaded(tmp_path: Path, helper: Path,
                                                         attacker_tls: tuple[str, Path]) -> None:
    """An OPENSSL_CONF in the PAM environment is not loaded: one demanding TLS 1.3 would fail the
    TLS 1.2 stand-in, and the login still succeeds with the configured ca_file."""
    url, ca = attacker_tls
    conf = tmp_path / "openssl.cnf"
    conf.write_text("openssl_conf = init\n[init]\nssl_conf = ssl\n[ssl]\nsystem_default = sys\n"
                    "[sys]\nMinProtocol = TLSv1.3\n")
    result = run_helper(helper, stub_config(tmp_path, url, ca_file=ca), b"492039\x00", OPENSSL_CONF=str(conf))
    assert result.returncode == 0, result.stderr


@needs_python3
def test_https_without_ca_file_is_a_config_error(tmp_path: Path, helper: Path) -> None:
    """An https:// service_url without ca_file is exit 2: the trust anchor is always named."""
    result = run_helper(helper, stub_config(tmp_path, "https://127.0.0.1:9"), b"492039\x00")
    assert result.returncode == 2 and "ca_file" in one_line(result.stderr)


@needs_python3
def test_proxy_variables_are_ignored(tmp_path: Path, helper: Path) -> None:
    """http_proxy pointing at an accepting stand-in is never used; the real URL (nothing listening) fails."""
    calls: list[bytes] = []

    def accept(request: bytes) -> bytes:
        calls.append(request)
        return http_reply(200, GOOD_ACCEPT)

    proxy = serve_raw(accept)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = run_helper(helper, stub_config(tmp_path, f"http://127.0.0.1:{port}"), b"492039\x00",
                        http_proxy=proxy, HTTP_PROXY=proxy, all_proxy=proxy)
    assert result.returncode == 3 and calls == []


# --- a lost receipt is reported ----------------------------------------------------------


@needs_pam
@needs_python3
async def test_a_deleted_receipt_is_flagged_receipt_missing(host: Host, make_guest: Callable[..., Guest]) -> None:
    """Two logins, then the receipt file is deleted: the next
    login is flagged receipt_missing (host alert, helper log)."""
    guest = make_guest(host.url, host.tokens["callout"])
    user = uid("hana")
    totp = await host.enroll(user)
    wait_for_fresh_step()
    now = time.time()
    assert pamtester(guest, user, totp.at(now - 30))
    assert pamtester(guest, user, totp.at(now))
    guest.receipt.unlink()
    assert pamtester(guest, user, totp.at(now + 30))
    log = guest.log()
    assert "receipt_missing: the host issued this VM a receipt" in log
    assert "flags=receipt_missing" in log.strip().splitlines()[-1]


# --- the user who started the helper (su) -------------------------------------------------

needs_su = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("setpriv") is None or shutil.which("su") is None,
    reason="needs unshare, setpriv and su (util-linux)")


def su_login(helper: Path, config: Path, user: LocalUser, tmp_path: Path) -> subprocess.Popen[bytes]:
    """``su -c true USER`` run by USER (real uid theirs, su setuid root) with a wrong code, its
    /etc/pam.d/su being the helper's auth line in a private mount namespace only."""
    su_stack = tmp_path / "su.pam"
    su_stack.write_text(f"auth required pam_exec.so expose_authtok quiet {helper} --config {config}\n"
                        "auth optional pam_permit.so\naccount required pam_permit.so\n"
                        "session required pam_permit.so\n")
    su = subprocess.Popen(
        ["unshare", "-m", "sh", "-c",
         f"mount --bind {su_stack} /etc/pam.d/su && exec setpriv --reuid={user.uid} "
         f"--regid={user.gid} --clear-groups su -c true {user.name}"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert su.stdin is not None
    su.stdin.write(b"000000\n")
    su.stdin.close()
    return su


def end_su(su: subprocess.Popen[bytes], helper: Path) -> None:
    """Waits for su; kills a copy of the helper still running after 10 s (a stopped one, say)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        su.wait(timeout=10)
    for pid in helper_pids(helper):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    su.wait(timeout=30)


@needs_pam
@needs_python3
@needs_su
async def test_a_user_running_su_cannot_stop_the_helper_while_it_holds_the_receipt_lock(
    host: Host, make_guest: Callable[..., Guest], local_user: LocalUser, helper: Path, tmp_path: Path,  # noqa: F811
) -> None:
    """A user who starts the helper through su cannot SIGSTOP it while it holds the VM's receipt
    lock, so another user's valid code still logs in."""
    victim = uid("victim")
    totp = await host.enroll(victim)
    with forwarder(host.url, hold=lambda body: body.get("principal") == local_user.name) as relay:
        guest = make_guest(relay.url, host.tokens["callout"])
        su = su_login(helper, guest.config, local_user, tmp_path)
        try:
            assert relay.held.wait(30), "the su login's helper never asked the service"
            pids = helper_pids(helper)
            assert len(pids) == 1, pids
            stop = local_user.run("kill", "-STOP", str(pids[0]))
            relay.release.set()
            wait_for_fresh_step()
            result = run_helper(helper, guest.config, totp.now().encode() + b"\x00", PAM_USER=victim)
            assert result.returncode == 0, (
                f"kill -STOP by {local_user.name}: rc={stop.returncode}; victim's helper: rc={result.returncode} "
                f"{result.stderr.decode(errors='replace').strip()}")
        finally:
            end_su(su, helper)


@needs_pam
@needs_python3
@needs_su
async def test_a_user_running_su_cannot_make_the_vm_look_rolled_back(
    refusing_host: Host, make_guest: Callable[..., Guest], local_user: LocalUser, helper: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A user who SIGKILLs the helper su started for them, after the host decided, leaves no stale
    receipt behind: the next user's valid code is accepted, with no rollback_detected."""
    host = refusing_host
    first, second = uid("alice"), uid("bob")
    totp_first, totp_second = await host.enroll(first), await host.enroll(second)
    with forwarder(host.url, hold=lambda body: body.get("principal") == local_user.name) as relay:
        guest = make_guest(relay.url, host.tokens["callout"])
        wait_for_fresh_step()
        assert run_helper(helper, guest.config, totp_first.now().encode() + b"\x00", PAM_USER=first).returncode == 0
        assert guest.receipt.exists()
        su = su_login(helper, guest.config, local_user, tmp_path)
        try:
            # The host has decided the su login (and issued the VM a new receipt); the user who
            # ran su kills the helper before it stores that receipt.
            assert relay.held.wait(30), "the su login's helper never asked the service"
            pids = helper_pids(helper)
            assert len(pids) == 1, pids
            kill = local_user.run("kill", "-KILL", str(pids[0]))
            relay.release.set()
        finally:
            end_su(su, helper)
        wait_for_fresh_step()
        result = run_helper(helper, guest.config, totp_second.now().encode() + b"\x00", PAM_USER=second)
        line = result.stderr.decode(errors="replace").strip()
        assert result.returncode == 0 and "rollback_detected" not in line, (
            f"kill -KILL by {local_user.name}: rc={kill.returncode}; next login: rc={result.returncode} {line}")


@needs_python3
def test_terminal_signals_do_not_interrupt_the_exchange(tmp_path: Path, helper: Path, stub: Any) -> None:
    """SIGINT, SIGQUIT, SIGTSTP and SIGHUP (what a terminal sends its foreground group, with no
    uid check) while the helper waits for the service neither stop nor end it: it stores the receipt."""
    with forwarder(stub(200, GOOD_ACCEPT), hold=lambda body: True) as relay:
        process = subprocess.Popen(
            [str(helper), "--config", str(stub_config(tmp_path, relay.url))], stdin=subprocess.PIPE,
            stderr=subprocess.PIPE, env={"PAM_USER": "alice", "PAM_SERVICE": "su", "PAM_TYPE": "auth"})
        try:
            assert process.stdin is not None
            process.stdin.write(b"492039\x00")
            process.stdin.close()
            assert relay.held.wait(30), "the helper never asked"
            for number in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGHUP):
                process.send_signal(number)
            time.sleep(0.2)
            relay.release.set()
            assert process.wait(timeout=30) == 0, process.stderr.read() if process.stderr else b""
        finally:
            process.kill()
            if process.stderr:
                process.stderr.close()
    assert (tmp_path / "receipts" / "receipt").read_text() == "rg1.a.b\n"


@needs_python3
def test_a_lock_held_too_long_is_logged_as_the_lock(tmp_path: Path, helper: Path, stub: Any) -> None:
    """When another process holds receipt.lock past the timeout, the helper gives up before its
    alarm and its line names the lock (exit 3), not a silent service."""
    receipts = tmp_path / "receipts"
    receipts.mkdir(mode=0o700)
    lock = os.open(receipts / "receipt.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = run_helper(helper, stub_config(tmp_path, stub(200, GOOD_ACCEPT), timeout=1), b"492039\x00")
    finally:
        os.close(lock)
    assert result.returncode == 3
    assert one_line(result.stderr) == "replayguard-pam: refused user=alice: receipt lock not obtained in time"
