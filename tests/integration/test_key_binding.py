"""A database holds every process on it to the keys it was set up with (migration 032).

Every digest of a credential or nonce is keyed by the pepper: a service started on a used
database with other keys (a lost or mistyped data dir, a container without its keys
volume) would find no earlier use and accept every code and nonce again. Such a start is
refused with one line; the same keys, from the data dir or named files, start as before.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from replayguard.errors import ConfigError
from replayguard.settings import Secret
from tests.conftest import cli_env, run_cli, uid


async def test_a_used_nonce_is_not_accepted_by_a_service_with_other_keys(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """A nonce consumed by a service with the keys of one data dir: a service on the same
    database with another data dir does not start (ConfigError naming its keys dir), so the
    nonce is never accepted again; one with a copy of the first keys answers reused."""
    dsn = Secret(await fresh_database())
    first = await api_factory(database_url=dsn, data_dir=tmp_path / "one")
    body = {"vm_id": uid("vm"), "scope": "s", "nonce": uid("n")}
    assert (await first.post("/v1/nonces/consume", body))[1]["decision"] == "accept"
    with pytest.raises(ConfigError, match=r"the keys in .*/two/keys are not the ones this database was set up with"):
        await api_factory(database_url=dsn, data_dir=tmp_path / "two")
    (tmp_path / "three").mkdir(mode=0o700)
    shutil.copytree(tmp_path / "one" / "keys", tmp_path / "three" / "keys")
    same = await api_factory(database_url=dsn, data_dir=tmp_path / "three")
    status, again = await same.post("/v1/nonces/consume", body)
    assert (status, again["decision"], again["reason"]) == (200, "reject", "reused"), again


async def test_serve_and_token_create_with_other_keys_exit_2_in_one_line(
        fresh_database: Callable[[], Any], tmp_path: Path) -> None:
    """`token create` sets the database up with the keys of its data dir; `token create` and
    `serve` with another data dir, or a pepper file of other bytes, exit 2 with one error
    line (serve may have logged its warnings about the server before) and print no token."""
    dsn = await fresh_database()
    made = run_cli("token", "create", "--role", "analyst", "--name", uid("a"), "--database-url", dsn,
                   "--data-dir", str(tmp_path / "one"))
    assert made.returncode == 0, made.stderr
    other_pepper = tmp_path / "pepper.key"
    other_pepper.write_text("11" * 32 + "\n")
    other_pepper.chmod(0o600)
    runs = {
        "token create": run_cli("token", "create", "--role", "analyst", "--name", uid("b"), "--database-url", dsn,
                                "--data-dir", str(tmp_path / "two")),
        "serve": run_cli("serve", "--port", "0", "--database-url", dsn, "--data-dir", str(tmp_path / "two")),
        "pepper file": run_cli("token", "create", "--role", "analyst", "--name", uid("c"), "--database-url", dsn,
                               "--data-dir", str(tmp_path / "one"),
                               env=cli_env(REPLAYGUARD_PEPPER_FILE=str(other_pepper))),
    }
    for what, done in runs.items():
        assert done.returncode == 2 and done.stdout == "", (what, done.returncode, done.stdout, done.stderr)
        last = done.stderr.splitlines()[-1]
        assert last.startswith("replayguard: error: the keys in ") and "Traceback" not in done.stderr, (what, last)
        assert "not the ones this database was set up with" in last, (what, last)
    assert "the pepper differs" in runs["pepper file"].stderr and str(other_pepper) in runs["pepper file"].stderr
