"""The PAM test harness: the shipped helper, guests' PAM stacks, a real host, stand-in servers.

The fixtures built on it (`helper`, `host`, `make_guest`, `stub`) live in tests/integration/conftest.py.
"""

from __future__ import annotations

import glob
import http.server
import os
import shutil
import subprocess
import time
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


class StubHandler(http.server.BaseHTTPRequestHandler):
    """Answers every POST with the server's canned status, headers and body."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, headers, body = self.server.canned  # type: ignore[attr-defined]
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
