"""A private libvirtd with only the test driver, shared by the libvirt integration tests.

libvirt's ``test`` driver keeps its state inside one process, so a test that wants a relay
process and itself to see the same domains starts a private ``libvirtd`` (own config and
socket directory, no TCP/TLS, no auth, and ``LIBVIRT_DRIVER_DIR`` pointing at an empty
folder so that only the built-in test driver loads); every process then talks to it over
``test+unix:///default?socket=DIR/libvirt-sock``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import libvirt as libvirt  # re-exported: the libvirt tests import it from here
except ImportError:  # pragma: no cover - the CI script installs it
    libvirt = None

LIBVIRTD = shutil.which("libvirtd") or shutil.which("libvirtd", path="/usr/sbin:/usr/local/sbin")
SKIP_REASON = "libvirt not installed (apt: libvirt-daemon libvirt-dev; pip: libvirt-python)"
requires_libvirt = pytest.mark.skipif(libvirt is None or LIBVIRTD is None, reason=SKIP_REASON)

DOMAIN_XML = """<domain type='test'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
</domain>"""


def _write_config(root: Path) -> Path:
    conf = root / "libvirtd.conf"
    conf.write_text(
        "listen_tls = 0\nlisten_tcp = 0\n"
        f'unix_sock_dir = "{root / "sock"}"\n'
        'unix_sock_rw_perms = "0700"\nunix_sock_admin_perms = "0700"\n'
        'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
        'log_outputs = "3:stderr"\n'
    )
    return conf


def _wait_for_daemon(uri: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until the daemon answers; fail with its log if it exits or takes too long."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"libvirtd exited with {proc.returncode}: {log.read_text()}")
        try:
            libvirt.open(uri).close()
            return
        except libvirt.libvirtError:
            time.sleep(0.1)
    pytest.fail(f"libvirtd did not answer on {uri} within 15 s: {log.read_text()}")


class Libvirtd:
    """A private libvirtd with only the test driver, startable again on the same socket."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rglv-"))  # short: socket paths max 108 bytes
        (self.root / "sock").mkdir()
        (self.root / "drivers").mkdir()  # empty: keeps libvirtd from loading (and needing) QEMU
        self.config = _write_config(self.root)
        self.uri = f"test+unix:///default?socket={self.root / 'sock' / 'libvirt-sock'}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.root / "libvirtd.log"
        env = {**os.environ, "LIBVIRT_DRIVER_DIR": str(self.root / "drivers")}
        cmd = [str(LIBVIRTD), "--config", str(self.config), "--pid-file", str(self.root / "pid")]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _wait_for_daemon(self.uri, self.proc, log)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def private_libvirtd() -> Iterator[Libvirtd]:
    """A started private libvirtd, stopped and its directory removed on exit."""
    daemon = Libvirtd()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(daemon.root, ignore_errors=True)
