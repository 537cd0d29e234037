"""Schema-driven fuzzing: schemathesis over the served ``/v1/openapi.json``, every operation, every role.

A real ``replayguard serve`` on the run's shared database (``run_database_url``) is fuzzed with cases generated from
its own OpenAPI document, with a token of each role: no response is a 5xx, every status
is one the document declares, and every body conforms to the declared schema. Bounded for
CI: 25 examples per operation for the roles it allows, 5 for the roles it forbids.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.access_matrix import MATRIX, allowed
from tests.conftest import REPO, ROLES, cli_env, reported_port, run_cli, seed_keys, uid

pytestmark = pytest.mark.slow

# The alert stream never ends by design; test_access_control and test_resource_limits cover it.
NOT_FUZZED = {("GET", "/v1/alerts/stream")}
OPERATIONS = [(row.method, row.template) for row in MATRIX
              if row.in_openapi and (row.method, row.template) not in NOT_FUZZED]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@dataclass
class Live:
    url: str
    tokens: dict[str, str]
    schema: Any


def _wait_port(log_path: Path, proc: subprocess.Popen[bytes]) -> int:
    for _ in range(600):  # bounded: 60 s
        assert proc.poll() is None, "the service exited at start"
        port = reported_port(log_path)
        if port is not None:
            return port
        time.sleep(0.1)
    raise TimeoutError("the service reported no listening port")


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):  # bounded: 30 s
        assert proc.poll() is None, "the service exited at start"
        try:
            if requests.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError("the service did not become ready")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, run_database_url: str, run_keys: Path) -> Iterator[Live]:
    """A real service on the run's shared database, a token per role, and its served OpenAPI document."""
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    seed_keys(data_dir, run_keys)
    tokens = {}
    for role in ROLES:
        done = run_cli("token", "create", "--role", role, "--name", uid(f"fuzz-{role}"),
                       "--data-dir", str(data_dir), "--database-url", run_database_url)
        assert done.returncode == 0, done.stderr
        tokens[role] = done.stdout.strip()
    log = Path(data_dir.parent / "service.log").open("wb")  # noqa: SIM115 - open while the service runs; closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "replayguard", "serve", "--host", "127.0.0.1", "--port", "0",
         "--data-dir", str(data_dir), "--database-url", run_database_url],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        env=cli_env(REPLAYGUARD_DB_POOL_SIZE="4", REPLAYGUARD_LOG_LEVEL="info"))
    try:
        url = f"http://127.0.0.1:{_wait_port(Path(log.name), proc)}"
        _wait_ready(url, proc)
        yield Live(url, tokens, schemathesis.openapi.from_url(url + "/v1/openapi.json"))
    finally:
        proc.kill()
        proc.wait(timeout=15)
        log.close()
        if os.environ.get("REPLAYGUARD_KEEP_FUZZ_LOG"):
            print(Path(log.name).read_text(errors="replace"))


def test_served_document_lists_every_route(live: Live) -> None:
    """The served OpenAPI document has an operation for every API
    route of the access matrix, and none for the console's files."""
    doc = requests.get(live.url + "/v1/openapi.json", timeout=10).json()
    for row in MATRIX:
        listed = row.method.lower() in doc["paths"].get(row.template, {})
        assert listed == row.in_openapi, f"{row.method} {row.template}"


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_operation(live: Live, method: str, path: str, role: str) -> None:
    """Generated requests with this role's token never get a 5xx nor an undeclared answer; a role the
    access matrix keeps out gets 403 on every one."""
    operation = live.schema[path][method]
    let_in = allowed(method, path, role)
    session = requests.Session()

    @given(case=operation.as_strategy())
    @settings(max_examples=25 if let_in else 5, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    def run(case: Any) -> None:
        headers = {"Authorization": f"Bearer {live.tokens[role]}"}
        response = case.call(base_url=live.url, session=session, headers=headers, timeout=15)
        case.validate_response(response, checks=CHECKS, headers=headers)
        if not let_in:
            assert response.status_code == 403, response.text

    try:
        run()
    finally:
        session.close()
