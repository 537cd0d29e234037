"""Shared fixtures: a fresh PostgreSQL database per test run, apps, clients, processes.

Storage is always real: the machine's PostgreSQL (``REPLAYGUARD_TEST_PG``, default
127.0.0.1:5432 as ``postgres``) and Redis (``REPLAYGUARD_TEST_REDIS``, default
127.0.0.1:6379/5). Each test gets its own database, a copy of the run's migrated template,
dropped after it; tests isolate themselves further with unique VM ids and principals
(``uid``). The tests that bound the rows a statement reads whatever plan a connection kept
run on a second server too, the embedded default's (``fresh_database_on_both`` in
``tests/integration/conftest.py``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import fnmatch
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from replayguard import logging as rglog
from replayguard.http.app import create_app
from replayguard.http.front import FrontRunner
from replayguard.http.server import runner_args
from replayguard.http.state import RUNTIME
from replayguard.keys import Keys
from replayguard.pg import schema
from replayguard.runtime import Runtime, open_runtime
from replayguard.services import key_binding
from replayguard.settings import Secret, Settings

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("REPLAYGUARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REPLAYGUARD_TEST_REDIS", "redis://127.0.0.1:6379/5")
ROLES = ("callout", "hypervisor", "analyst", "admin", "witness")


SKIP_ALLOWLIST = REPO / "tests" / "skip-allowlist.txt"
_SKIPPED: dict[str, str] = {}  # node id -> skip reason, for the allow-list check


def read_skip_allowlist(path: Path = SKIP_ALLOWLIST) -> dict[str, str]:
    """The allow-list's (node-id glob -> reason) entries; an entry without a reason is an error."""
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pattern, _, reason = line.partition("|")
        if not pattern.strip() or not reason.strip():
            raise pytest.UsageError(f"{path}:{number}: an entry is '<node id glob> | <reason>'")
        entries[pattern.strip()] = reason.strip()
    return entries


def unlisted_skips(skipped: dict[str, str], allowed: dict[str, str]) -> dict[str, str]:
    """The skips no allow-list entry matches."""
    return {node: reason for node, reason in skipped.items()
            if not any(fnmatch.fnmatchcase(node, pattern) for pattern in allowed)}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _SKIPPED[report.nodeid] = reason


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skip that tests/skip-allowlist.txt does not list fails the run."""
    if unlisted_skips(_SKIPPED, read_skip_allowlist()) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    unlisted = unlisted_skips(_SKIPPED, read_skip_allowlist())
    if unlisted:
        terminalreporter.section("skips not in tests/skip-allowlist.txt (the run fails)", red=True)
        for node, reason in sorted(unlisted.items()):
            terminalreporter.line(f"{node}: {reason}")


def uid(prefix: str = "t") -> str:
    """A unique identifier, so rows of one test never meet another's (module-scoped services share a database)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def metric_values(text: str, *prefixes: str) -> dict[str, float]:
    """The samples of a /metrics page (name with its labels: value) whose line starts with one of ``prefixes``."""
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(prefixes)}


async def scrape(url: str, *prefixes: str) -> dict[str, float]:
    """``metric_values`` of one /metrics scrape on a connection of its own (to the fast front,
    the scrape itself is one handover to aiohttp)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        return metric_values(await resp.text(), *prefixes)


async def front_counts(url: str) -> dict[str, float]:
    """The fast front's counters from /metrics (the scrape itself is one handover to aiohttp)."""
    return await scrape(url, "replayguard_http_fast_answers_total", "replayguard_http_front_handoffs_total")


def on_database(dsn: str, name: str) -> str:
    """``dsn`` naming database ``name`` instead (its host, user and options kept)."""
    return urllib.parse.urlsplit(dsn)._replace(path=f"/{name}").geturl()


def database_of(dsn: str) -> str:
    return urllib.parse.urlsplit(dsn).path.lstrip("/")


def admin_on(dsn: str) -> str:
    """The admin database (``PG_ADMIN``'s) on the server of ``dsn``."""
    return on_database(dsn, database_of(PG_ADMIN))


def dsn_for(name: str) -> str:
    return on_database(PG_ADMIN, name)


async def create_database(prefix: str = "rg_test", options: str = "", *, migrate: bool = True,
                          admin_dsn: str = PG_ADMIN) -> str:
    """Creates and migrates a new database (``options`` follow ``CREATE DATABASE name``, e.g.
    a template and locale) on the server of ``admin_dsn``; returns its DSN."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" {options}')
    finally:
        await admin.close()
    dsn = on_database(admin_dsn, name)
    if migrate:
        await schema.migrate_dsn(dsn)
    return dsn


async def drop_database(dsn: str) -> None:
    name = database_of(dsn)
    admin = await asyncpg.connect(admin_on(dsn))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


KEY_NAMES = ("pepper.key", "secret.key", "receipt.key", "signing.key")


@pytest_asyncio.fixture(scope="session")
async def template_database() -> AsyncIterator[str]:
    """This run's database migrated from zero, never opened again: each test's database is
    a copy of it (``CREATE DATABASE ... TEMPLATE``, much faster than migrating)."""
    dsn = await create_database("rg_tmpl")
    yield dsn
    await drop_database(dsn)


async def copy_of(template: str, prefix: str) -> str:
    """A new database, a copy of ``template``, on the template's server."""
    # FILE_COPY: a checkpoint and a file copy, faster here than WAL_LOG's 8 MB of WAL a test
    return await create_database(prefix, f'TEMPLATE "{database_of(template)}" STRATEGY FILE_COPY', migrate=False,
                                 admin_dsn=admin_on(template))


class DatabaseSupply:
    """Copies of the template made ahead and dropped behind, in a thread of their own with
    its own event loop, so a test waits for neither. One at a time, in order: each costs the
    server a checkpoint."""

    def __init__(self, template: str, ahead: int = 2) -> None:
        self._template = template
        self._ahead = ahead
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rg-db-supply", daemon=True)
        self._thread.start()
        self._lock = asyncio.Lock()
        self._ready: collections.deque[concurrent.futures.Future[str]] = collections.deque()
        self._dropping: list[concurrent.futures.Future[None]] = []

    def _submit(self, work: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        async def in_turn() -> Any:
            async with self._lock:
                return await work()

        return asyncio.run_coroutine_threadsafe(in_turn(), self._loop)

    async def take(self) -> str:
        while len(self._ready) <= self._ahead:
            self._ready.append(self._submit(lambda: copy_of(self._template, "rg_test")))
        made = self._ready.popleft()
        try:
            return await asyncio.wrap_future(made)
        except (OSError, asyncpg.PostgresError):  # the server was away when it was made: make it now
            return await copy_of(self._template, "rg_test")

    def give_back(self, dsn: str) -> None:
        self._dropping = [f for f in self._dropping if not f.done()]
        self._dropping.append(self._submit(lambda: drop_database(dsn)))

    def close(self) -> None:
        for made in self._ready:
            with contextlib.suppress(Exception):
                self.give_back(made.result())
        for dropping in self._dropping:
            with contextlib.suppress(Exception):
                dropping.result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


@pytest.fixture(scope="session")
def database_supply(template_database: str) -> Iterator[DatabaseSupply]:
    supply = DatabaseSupply(template_database)
    yield supply
    supply.close()


@pytest_asyncio.fixture
async def database_url(database_supply: DatabaseSupply) -> AsyncIterator[str]:
    """The test's own database, migrated. A database holds every process on it to the keys
    it was first opened with (migration 032), and one deployment's clock guard: tests must
    not share one."""
    dsn = await database_supply.take()
    yield dsn
    database_supply.give_back(dsn)


@pytest_asyncio.fixture(scope="session")
async def run_database_url(template_database: str, run_keys: Path) -> AsyncIterator[str]:
    """A database for the module-scoped services, bound to the run's keys, which every data
    dir on it gets (``seed_keys``)."""
    dsn = await copy_of(template_database, "rg_run")
    keys = {name.removesuffix(".key"): bytes.fromhex((run_keys / name).read_text()) for name in KEY_NAMES}
    bound = key_binding.checks(Keys(**keys))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO key_binding (pepper_check, secret_check, receipt_check, signing_public,"
                           " bound_us) VALUES ($1, $2, $3, $4, 0)", bound["pepper_check"], bound["secret_check"],
                           bound["receipt_check"], bound["signing_public"])
    finally:
        await conn.close()
    yield dsn
    await drop_database(dsn)


@pytest_asyncio.fixture
async def fresh_database(template_database: str) -> AsyncIterator[Callable[[], Any]]:
    """A factory of further empty databases (for tests that need a ledger of their own)."""
    async with databases_from(template_database) as make:
        yield make


@contextlib.asynccontextmanager
async def databases_from(template: str) -> AsyncIterator[Callable[[], Any]]:
    """A factory of copies of ``template``, each dropped at the end."""
    made: list[str] = []

    async def make() -> str:
        dsn = await copy_of(template, "rg_fresh")
        made.append(dsn)
        return dsn

    try:
        yield make
    finally:
        for dsn in made:
            await drop_database(dsn)


@dataclass
class FakeClock:
    """A settable clock: the service never reads the real time in these tests."""

    now: float = field(default_factory=lambda: 1_790_000_000.0)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True, scope="session")
def uncached_loggers() -> Iterator[None]:
    """structlog never caches a logger during the tests. ``replayguard.logging.configure``
    (run in-process by the CLI's tests, the demo's) caches each module's logger on its
    first use, bound for good to the stream configured then: a later test's ``log_buffer``
    would never see that module's lines, depending on which tests ran before it."""
    configure = structlog.configure

    def uncached(*args: Any, **kwargs: Any) -> None:
        configure(*args, **{**kwargs, "cache_logger_on_first_use": False})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(structlog, "configure", uncached)
        yield


@pytest.fixture
def log_buffer() -> Iterator[io.StringIO]:
    """structlog configured with replayguard's processors, rendering its JSON lines into a buffer."""
    saved = structlog.get_config()
    buffer = io.StringIO()
    structlog.configure(
        processors=rglog.processors(), logger_factory=structlog.PrintLoggerFactory(buffer),
        wrapper_class=structlog.make_filtering_bound_logger(0), cache_logger_on_first_use=False,
    )
    yield buffer
    structlog.configure(**saved)


@pytest.fixture
def structlog_restored() -> Iterator[None]:
    """For a test that runs a script configuring structlog for itself (the bench scripts):
    the tests after it keep the configuration they had."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def run_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The keys of ``run_database_url``: it holds every process on it to the keys it was set
    up with (migration 032), so every data dir on it gets a copy (``seed_keys``)."""
    keys = tmp_path_factory.mktemp("run-keys") / "keys"
    keys.mkdir(mode=0o700)
    for name in KEY_NAMES:
        (keys / name).write_text(secrets.token_bytes(32).hex() + "\n")
        (keys / name).chmod(0o600)
    return keys


def seed_keys(data_dir: Path, keys: Path) -> None:
    """Gives ``data_dir`` a copy of ``keys`` (0700 dirs, 0600 files) unless it has keys."""
    if (data_dir / "keys").exists():
        return
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (data_dir / "keys").mkdir(mode=0o700)
    for name in KEY_NAMES:
        (data_dir / "keys" / name).write_bytes((keys / name).read_bytes())
        (data_dir / "keys" / name).chmod(0o600)


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str) -> Callable[..., Settings]:
    """Settings over the test's database, in a data dir of its own."""
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"database_url": Secret(database_url), "data_dir": tmp_path / "data",
                                  "db_pool_size": 4}
        values.update(overrides)
        return Settings(**values)

    return make


@dataclass
class Api:
    """A test client of a running app, with a token per role."""

    client: TestClient[web.Request, web.Application]
    runtime: Runtime
    tokens: dict[str, str]
    clock: FakeClock

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    async def post(self, path: str, body: Any, role: str = "callout") -> tuple[int, Any]:
        resp = await self.client.post(path, json=body, headers=self.auth(role))
        return resp.status, await resp.json()

    async def get(self, path: str, role: str = "analyst") -> tuple[int, Any]:
        resp = await self.client.get(path, headers=self.auth(role))
        return resp.status, await resp.json()

    async def enroll(self, principal: str, **body: Any) -> dict[str, Any]:
        status, data = await self.post(f"/v1/principals/{principal}/tokens", body, role="admin")
        assert status == 201, data
        return dict(data)


class ServiceTestServer(TestServer):
    """aiohttp's TestServer run as ``replayguard serve`` runs the app: the fast front for the
    decision routes (unless ``http_front = "aiohttp"``), aiohttp for everything else, with
    the runner's arguments ``serve`` passes (``server.runner_args``).

    aiohttp's TestServer cancels every handler whose client went away
    (``handler_cancellation=True``); ``serve`` does not, so neither does this server: a
    handler runs to its end after its client left (a decision is still committed), and only
    the work that asks for it stops with its client (``common.stops_with_client``)."""

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._runner_args = runner_args(settings)

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs.update(self._runner_args)  # over TestServer's own handler_cancellation=True
        return FrontRunner(self.app, **kwargs)


class RunAppTestServer(TestServer):
    """aiohttp's TestServer as ``web.run_app`` runs an app (the vSphere forwarder's
    ``main``): a handler whose client went away runs to its end, where TestServer would
    cancel it (``handler_cancellation=True``)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs["handler_cancellation"] = False  # web.run_app's default
        return web.AppRunner(self.app, **kwargs)


async def start_api(settings: Settings, clock: FakeClock) -> Api:
    """The app on a test server run as ``serve`` runs it (``ServiceTestServer``)."""
    app = create_app(settings, clock=clock)
    client = TestClient(ServiceTestServer(app, settings))
    try:
        await client.start_server()
    except BaseException:  # a start the service refuses (bad settings, other keys) leaves nothing open
        await client.close()
        raise
    runtime = app[RUNTIME]
    tokens = {}
    for role in ROLES:
        _, tokens[role] = await runtime.api_tokens.create(role, uid(role))
    return Api(client, runtime, tokens, clock)


@pytest_asyncio.fixture
async def api(make_settings: Callable[..., Settings], clock: FakeClock) -> AsyncIterator[Api]:
    """The service in-process over the test's database, no Redis."""
    instance = await start_api(make_settings(), clock)
    yield instance
    await instance.client.close()


@pytest_asyncio.fixture
async def api_factory(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    """Starts apps with custom settings (Redis, reactions, limits); closes them after."""
    started: list[Api] = []

    async def start(clock: FakeClock | None = None, **overrides: Any) -> Api:
        instance = await start_api(make_settings(**overrides), clock or FakeClock())
        started.append(instance)
        return instance

    yield start
    for instance in started:
        await instance.client.close()


def free_port() -> int:
    """A port free now, for the few servers that must be told a port and cannot report the
    one they bound (several ``--workers`` sharing one port, radiusd, stand-ins restarted on
    the same address). Everything else binds port 0 and reports it, or uses ``dead_url``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def dead_url() -> Iterator[str]:
    """A loopback URL that refuses connections while the block runs.

    Its port is bound for the whole block, so nothing else can take it, and never listened
    on, so a connection attempt is refused at once (no port picked, released and hoped for).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@dataclass
class ServiceProcess:
    """A real ``replayguard serve`` process."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def reported_port(log_path: Path) -> int | None:
    """The port in a ``serve --port 0`` process's ``listening`` log line, once it is written."""
    for line in log_path.read_bytes().splitlines():
        if b'"listening"' in line:
            try:
                return int(json.loads(line)["port"])
            except (ValueError, KeyError):
                pass
    return None


async def listening_port(log_path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """Waits (bounded) for the port a ``serve --port 0`` process reports."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        port = reported_port(log_path)
        if port is not None:
            return port
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}: {log_path.read_text(errors='replace')[-2000:]}")
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no 'listening' line in {log_path} after {timeout}s")


async def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"service exited with {proc.returncode}")
            try:
                async with session.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


async def service_with_tokens(settings: Settings, service_factory: Callable[..., Any],
                              roles: tuple[str, ...], env: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """A real ``replayguard serve`` over ``settings`` (and ``env``), and a token per role made
    over its own data dir's keys: the service's URL and the tokens by role."""
    tokens = {}
    async with open_runtime(settings, migrate=False) as runtime:
        for role in roles:
            _, tokens[role] = await runtime.api_tokens.create(role, uid(role))
    assert settings.database_url is not None
    service = await service_factory(data_dir=settings.data_dir, database_url=settings.database_url.reveal(),
                                    env=env)
    return service.url, tokens


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLAYGUARD_")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "replayguard", *args], capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout, cwd=REPO)


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Starts ``replayguard serve`` processes; every one is killed at teardown."""
    procs: list[ServiceProcess] = []

    async def start(*, data_dir: Path, database_url: str | None, port: int | None = None,
                    extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> ServiceProcess:
        """``port`` None: the service binds port 0 and its ``listening`` log line names the port (with
        ``--workers`` a free port is picked here: workers cannot share port 0)."""
        if port is None and "--workers" in extra_args:
            port = free_port()
        args = ["serve", "--host", "127.0.0.1", "--port", str(port or 0), "--data-dir", str(data_dir), *extra_args]
        if database_url is not None:
            args += ["--database-url", database_url]
        log_path = tmp_path / f"service-{len(procs)}.log"
        with log_path.open("wb") as handle:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([sys.executable, "-m", "replayguard", *args], stdout=handle,
                                    stderr=subprocess.STDOUT, env=env or cli_env(), cwd=REPO)
        service = ServiceProcess(proc, "", log_path)
        procs.append(service)
        bound = port or await listening_port(log_path, proc)
        service.url = f"http://127.0.0.1:{bound}"
        await wait_ready(service.url, proc)
        return service

    yield start
    for service in procs:
        service.kill()
