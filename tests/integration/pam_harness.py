"""The PAM test harness: the shipped helper, guests' PAM stacks, a real host, stand-in servers.

The fixtures built on it (`helper`, `host`, `refusing_host`, `make_guest`, `stub`) live in
tests/integration/conftest.py.
"""

from __future__ import annotations

import glob
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pyotp
import pytest

from tests.conftest import REPO

PAM_DIR = Path("/etc/pam.d")
PERIOD = 30

HELPER = REPO / "deploy" / "pam" / "replayguard-pam-helper"


def _pam_exec_present() -> bool:
    return any(glob.glob(pattern) for pattern in (
        "/lib/*/security/pam_exec.so", "/usr/lib/*/security/pam_exec.so", "/lib*/security/pam_exec.so"))


needs_pam = pytest.mark.skipif(
    shutil.which("pamtester") is None or not _pam_exec_present() or os.geteuid() != 0
    or not os.access(PAM_DIR, os.W_OK),
    reason="needs pamtester (apt: pamtester), pam_exec.so and root to write /etc/pam.d",
)
needs_python3 = pytest.mark.skipif(not Path("/usr/bin/python3").exists(),
                                   reason="the helper's interpreter /usr/bin/python3 is absent")


@dataclass
class Guest:
    """One guest's PAM setup: a stack under /etc/pam.d, the helper's config, its receipt dir."""

    pam_service: str
    config: Path
    receipt_dir: Path
    exec_log: Path

    @property
    def receipt(self) -> Path:
        return self.receipt_dir / "receipt"

    def log(self) -> str:
        return self.exec_log.read_text(errors="replace") if self.exec_log.exists() else ""


@dataclass
class Host:
    url: str
    tokens: dict[str, str]

    async def post(self, path: str, body: Any, role: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.post(self.url + path, json=body,
                                headers={"Authorization": f"Bearer {self.tokens[role]}"}) as resp:
            return resp.status, await resp.json(content_type=None)

    async def enroll(self, principal: str) -> pyotp.TOTP:
        status, data = await self.post(f"/v1/principals/{principal}/tokens", {"type": "totp"}, "admin")
        assert status == 201, data
        return pyotp.TOTP(data["secret"])


def write_config(path: Path, **values: object) -> Path:
    path.write_text("".join(f"{key} = {value}\n" for key, value in values.items()))
    path.chmod(0o600)
    return path


def pamtester(guest: Guest, user: str, password: str) -> bool:
    """True when `pamtester` authenticates: the helper exited 0 under the real pam_exec."""
    result = subprocess.run(["pamtester", "-v", guest.pam_service, user, "authenticate"],
                            input=password + "\n", capture_output=True, text=True, timeout=60)
    return result.returncode == 0


def wait_for_fresh_step() -> None:
    """Waits, when a TOTP step is about to end, so a test's codes stay inside the drift window."""
    left = PERIOD - time.time() % PERIOD
    if left < 5:
        time.sleep(left + 0.2)


def wrong_code(totp: pyotp.TOTP) -> str:
    """A six-digit code valid at no step near now."""
    near = {totp.at(time.time() + k * PERIOD) for k in range(-3, 4)}
    return next(code for code in (f"{n:06d}" for n in range(1_000_000)) if code not in near)


class StubServer(http.server.ThreadingHTTPServer):
    """Serves StubHandler: ``canned`` is the (status, headers, body) it answers every POST with."""

    canned: tuple[int, dict[str, str], bytes]


class StubHandler(http.server.BaseHTTPRequestHandler):
    """Answers every POST with the server's canned status, headers and body."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        assert isinstance(self.server, StubServer)
        status, headers, body = self.server.canned
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


def run_helper(helper: Path, config: Path, stdin: bytes, **env: str) -> subprocess.CompletedProcess[bytes]:
    """Runs the helper as pam_exec does: no PATH, only PAM_* variables, password then NUL."""
    environment = {"PAM_USER": "alice", "PAM_SERVICE": "sshd", "PAM_TYPE": "auth", "PAM_RHOST": "192.0.2.7"}
    environment.update(env)
    return subprocess.run([str(helper), "--config", str(config)], input=stdin, env=environment,
                          capture_output=True, timeout=60)


def stub_config(tmp_path: Path, url: str, **extra: object) -> Path:
    values: dict[str, object] = {"service_url": url, "vm_id": "vm-stub", "token": "rgt_stub",
                                 "receipt_dir": tmp_path / "receipts", "timeout": 5}
    values.update(extra)
    return write_config(tmp_path / "pam.conf", **values)


GOOD_ACCEPT = b'{"decision":"accept","reason":"ok","flags":[],"seq":1,"receipt":"rg1.a.b"}'


BAD_REPLIES = [
    (200, b"not json"),
    (200, b'{"decision":"maybe","reason":"ok"}'),
    (200, b'{"decision":"accept"}'),
    (200, b'["accept"]'),
    (200, b'{"decision":"accept","reason":"ok","flags":[],"receipt":"rg1.\\n"}'),
    (202, GOOD_ACCEPT),
    (503, b'{"error":{"code":"unavailable","message":"x"}}'),
    (500, b"oops"),
]


def helper_pids(helper: Path) -> list[int]:
    """The ids of the running processes whose command line names this copy of the helper."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if str(helper).encode() in cmdline:
                pids.append(int(entry))
    return pids


class Forwarder(http.server.ThreadingHTTPServer):
    """A loopback HTTP forwarder to the real service that records request bodies and can hold
    back the answer to chosen requests (after the service has decided them)."""

    target: str
    bodies: list[bytes]
    hold: Callable[[dict[str, Any]], bool]  # the answer to a request for which this is true waits for ``release``
    held: threading.Event
    release: threading.Event

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ForwardingHandler(http.server.BaseHTTPRequestHandler):
    server: Forwarder

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.bodies.append(body)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {}
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        request = urllib.request.Request(  # noqa: S310 - the test service's URL
            self.server.target + self.path, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - the test service's URL
                status, data = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, data = exc.code, exc.read()
        if isinstance(parsed, dict) and self.server.hold(parsed):
            # The service has decided (and committed) this one; its answer waits for ``release``.
            self.server.held.set()
            self.server.release.wait(60)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:
        return


@contextmanager
def forwarder(target: str, hold: Callable[[dict[str, Any]], bool] = lambda body: False) -> Iterator[Forwarder]:
    """A running Forwarder to ``target``; every held answer is released when it closes."""
    server = Forwarder(("127.0.0.1", 0), _ForwardingHandler)
    server.daemon_threads = True
    server.target, server.bodies, server.hold = target, [], hold
    server.held, server.release = threading.Event(), threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
