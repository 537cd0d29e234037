"""Exactly once: a credential is accepted at most once, however many present it at once.

In one process (the group-commit appender batches the racers) and across two real
``replayguard serve`` processes on one database (the ledger's row locks decide).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pyotp
import pytest

from replayguard.core import otp as core_otp
from replayguard.core.credentials import nonce_digest, otp_digest, secret_fingerprint
from tests.conftest import Api, ServiceProcess, cli_env, run_cli, uid

RACERS = 64


def _reasons(answers: list[tuple[int, Any]]) -> Counter[str]:
    assert all(status == 200 for status, _ in answers), answers
    return Counter(f"{body['decision']}:{body['reason']}" for _, body in answers)


async def test_concurrent_totp_in_process_accepted_once(api: Api) -> None:
    """Sixty-four concurrent presentations of one TOTP code give one accept and 63 reused."""
    principal = uid("race")
    token = await api.enroll(principal)
    code = pyotp.TOTP(token["secret"]).at(api.clock.now)
    bodies = [{"vm_id": uid("vm"), "principal": principal, "otp": code} for _ in range(RACERS)]
    answers = await asyncio.gather(*(api.post("/v1/otp/verify", body) for body in bodies))
    assert _reasons(answers) == {"accept:ok": 1, "reject:reused": RACERS - 1}
    seqs = [body["seq"] for _, body in answers]
    assert len(set(seqs)) == RACERS


async def test_concurrent_nonce_in_process_accepted_once(api: Api) -> None:
    """Sixty-four concurrent presentations of one nonce give one accept and 63 reused."""
    scope, nonce = uid("scope"), uid("nonce")
    bodies = [{"vm_id": uid("vm"), "scope": scope, "nonce": nonce, "ttl_s": 300} for _ in range(RACERS)]
    answers = await asyncio.gather(*(api.post("/v1/nonces/consume", body) for body in bodies))
    assert _reasons(answers) == {"accept:ok": 1, "reject:reused": RACERS - 1}
    pepper = api.runtime.keys.pepper
    async with api.runtime.pool.acquire() as conn:
        accepts = await conn.fetchval(
            "SELECT count(*) FROM ledger WHERE cred_digest = $1 AND decision = 'accept'",
            nonce_digest(pepper, scope, nonce.encode()),
        )
    assert accepts == 1


async def _post(session: aiohttp.ClientSession, url: str, token: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json()


async def _two_services(
    tmp_path: Path, database_url: str, service_factory: Callable[..., Any],
) -> tuple[list[ServiceProcess], dict[str, str], bytes]:
    """Two serve processes on one database, sharing keys (digests and tokens are keyed)."""
    first, second = tmp_path / "a", tmp_path / "b"
    env = cli_env()
    tokens = {}
    for role in ("callout", "admin"):
        done = run_cli("token", "create", "--role", role, "--name", uid(role),
                       "--database-url", database_url, "--data-dir", str(first), env=env)
        assert done.returncode == 0, done.stderr
        tokens[role] = done.stdout.strip()
    second.mkdir(mode=0o700)
    shutil.copytree(first / "keys", second / "keys")  # copies modes too (0700 dir, 0600 files)
    services = [await service_factory(data_dir=first, database_url=database_url),
                await service_factory(data_dir=second, database_url=database_url)]
    pepper = bytes.fromhex((first / "keys" / "pepper.key").read_text().strip())
    return services, tokens, pepper


@pytest.mark.slow
async def test_two_processes_totp_accepted_once(
    tmp_path: Path, database_url: str, service_factory: Callable[..., Any],
) -> None:
    """One TOTP code raced through two server processes on one database is accepted once."""
    services, tokens, pepper = await _two_services(tmp_path, database_url, service_factory)
    principal = uid("race2")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{services[0].url}/v1/principals/{principal}/tokens", json={},
                                headers={"Authorization": f"Bearer {tokens['admin']}"}) as resp:
            assert resp.status == 201
            enrolled = await resp.json()
        # Codes are matched against the service's (real) clock; one computed now stays
        # within the default ±1 step drift for the whole race.
        now = time.time()
        code = pyotp.TOTP(enrolled["secret"]).at(now)
        answers = await asyncio.gather(*(
            _post(session, f"{services[i % 2].url}/v1/otp/verify", tokens["callout"],
                  {"vm_id": uid("vm"), "principal": principal, "otp": code})
            for i in range(RACERS)
        ))
    assert _reasons(answers) == {"accept:ok": 1, "reject:reused": RACERS - 1}
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT cred_digest, (payload->>'counter')::bigint AS step FROM ledger"
            " WHERE kind = 'otp' AND subject = $1 AND decision = 'accept'", principal,
        )
    finally:
        await conn.close()
    assert len(rows) == 1
    step = rows[0]["step"]
    assert abs(step - core_otp.totp_step(now)) <= 1
    credential = secret_fingerprint(pepper, "totp", "SHA1", 30, enrolled["secret"]).hex()
    assert bytes(rows[0]["cred_digest"]) == otp_digest(pepper, credential, step)


@pytest.mark.slow
async def test_two_processes_nonce_accepted_once(
    tmp_path: Path, database_url: str, service_factory: Callable[..., Any],
) -> None:
    """One nonce raced through two server processes on one database is accepted once."""
    services, tokens, pepper = await _two_services(tmp_path, database_url, service_factory)
    scope, nonce = uid("scope"), uid("nonce")
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(
            _post(session, f"{services[i % 2].url}/v1/nonces/consume", tokens["callout"],
                  {"vm_id": uid("vm"), "scope": scope, "nonce": nonce})
            for i in range(RACERS)
        ))
    assert _reasons(answers) == {"accept:ok": 1, "reject:reused": RACERS - 1}
    conn = await asyncpg.connect(database_url)
    try:
        verdicts = await conn.fetch(
            "SELECT decision FROM ledger WHERE cred_digest = $1", nonce_digest(pepper, scope, nonce.encode()),
        )
    finally:
        await conn.close()
    assert Counter(r["decision"] for r in verdicts) == {"accept": 1, "reject": RACERS - 1}
