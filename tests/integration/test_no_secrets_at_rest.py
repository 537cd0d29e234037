"""No secret at rest: after real traffic, no table and no log line holds a credential in clear.

A real ``replayguard serve`` (debug logging, output captured) on a database of its own is
driven through enrolment, accepts, rejects, replays, nonces, hypervisor events and API
token creation. Then every column of every table is dumped as text, and that dump and
every log line are searched for each TOTP/HOTP secret (as base32 and as raw key hex),
each OTP, each nonce and each API token. Key files are 0600, and the service refuses to
start when one is readable by group or others.
"""

from __future__ import annotations

import base64
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pyotp
import pytest

from tests.conftest import cli_env, run_cli, uid

pytestmark = pytest.mark.slow

KEY_FILES = ("pepper.key", "secret.key", "receipt.key", "signing.key")


async def _dump_database(dsn: str) -> str:
    """Every row of every table in the public schema, every column rendered as text."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            " AND table_type = 'BASE TABLE'")]
        assert "ledger" in tables and "otp_tokens" in tables and "api_tokens" in tables
        parts = []
        for table in tables:
            rows = await conn.fetch(f'SELECT t::text AS row FROM "{table}" t')
            parts += [f"{table}: {r['row']}" for r in rows]
    finally:
        await conn.close()
    return "\n".join(parts)


def _forms(secret: str) -> list[str]:
    """The ways a secret could show up in a dump: as sent, either case, or as hex of its bytes."""
    forms = {secret, secret.lower(), secret.upper(), secret.encode().hex()}
    return [f for f in forms if f]


def _base32_key_hex(secret_b32: str) -> str:
    return base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8)).hex()


def _contains_otp(text: str, otp: str) -> bool:
    # Codes are short digit strings: look for them standing alone, not inside a timestamp.
    return re.search(rf"(?<![0-9]){re.escape(otp)}(?![0-9])", text) is not None


async def test_no_credential_in_clear_in_any_table_or_log_line(
    tmp_path: Path, fresh_database: Callable[[], Any], service_factory: Callable[..., Any],
) -> None:
    """Secrets, OTPs, nonces and API tokens used in real traffic appear in no table and no log line."""
    dsn = await fresh_database()
    data_dir = tmp_path / "data"
    cli_logs, api_tokens = [], {}
    for role in ("callout", "admin", "hypervisor", "analyst"):
        done = run_cli("token", "create", "--role", role, "--name", uid(role), "--data-dir", str(data_dir),
                       "--database-url", dsn, "--log-level", "debug")
        assert done.returncode == 0, done.stderr
        api_tokens[role] = done.stdout.strip()
        cli_logs.append(done.stderr)
    service = await service_factory(data_dir=data_dir, database_url=dsn,
                                    env=cli_env(REPLAYGUARD_LOG_LEVEL="debug"))
    url = service.url
    chosen_secret = base64.b32encode(secrets.token_bytes(20)).decode()
    totp_secrets: list[str] = []
    otps: list[str] = []
    nonces: list[str] = []

    async with aiohttp.ClientSession() as session:
        async def call(method: str, path: str, role: str, body: Any = None) -> tuple[int, Any]:
            async with session.request(method, url + path, json=body,
                                       headers={"Authorization": f"Bearer {api_tokens[role]}"}) as resp:
                return resp.status, await resp.json(content_type=None) if resp.status != 204 else None

        # Enrolment: one secret chosen by the admin, one generated, one HOTP.
        enrolled = []
        for body in ({"type": "totp", "secret": chosen_secret}, {"type": "totp"}, {"type": "hotp"}):
            principal = uid("alice")
            status, data = await call("POST", f"/v1/principals/{principal}/tokens", "admin", body)
            assert status == 201, data
            totp_secrets.append(data["secret"])
            enrolled.append((principal, body["type"], data["secret"]))
            status, listed = await call("GET", f"/v1/principals/{principal}/tokens", "admin")
            assert status == 200 and data["secret"] not in str(listed)
        # Accepts, replays, wrong codes.
        for principal, kind, secret in enrolled:
            code = pyotp.HOTP(secret).at(0) if kind == "hotp" else pyotp.TOTP(secret).now()
            wrong = f"{(int(code) + 1) % 1_000_000:06d}"
            otps += [code, wrong]
            for sent, expected in ((code, "accept"), (code, "reject"), (wrong, "reject")):
                status, data = await call("POST", "/v1/otp/verify", "callout",
                                          {"vm_id": "vm-secrets", "principal": principal, "otp": sent,
                                           "context": {"service": "sshd"}})
                assert (status, data["decision"]) == (200, expected), data
        # Nonces: consumed, replayed, expired, and one in a malformed request.
        for _ in range(3):
            nonce = "nonce-" + secrets.token_urlsafe(24)
            nonces.append(nonce)
            for expected in ("accept", "reject"):
                status, data = await call("POST", "/v1/nonces/consume", "callout",
                                          {"vm_id": "vm-secrets", "scope": "login", "nonce": nonce})
                assert (status, data["decision"]) == (200, expected), data
        expired = "nonce-" + secrets.token_urlsafe(24)
        nonces.append(expired)
        status, data = await call("POST", "/v1/nonces/consume", "callout",
                                  {"vm_id": "vm-secrets", "scope": "login", "nonce": expired, "ttl_s": 5,
                                   "issued_at": 1_000_000_000})
        assert data["decision"] == "reject"
        bad = "nonce-" + secrets.token_urlsafe(24)
        nonces.append(bad)
        status, _ = await call("POST", "/v1/nonces/consume", "callout", {"vm_id": "", "scope": "s", "nonce": bad})
        assert status == 400
        # A hypervisor event and a wrong-role call with a real token, for the logs.
        status, _ = await call("POST", "/v1/hypervisor/events", "hypervisor", {
            "event_id": uid("evt"), "type": "snapshot.reverted", "vm_id": "vm-secrets",
            "snapshot_id": "s1", "snapshot_created_at": 1_000_000_000, "occurred_at": 1_000_000_100})
        assert status == 202
        status, _ = await call("POST", "/v1/nonces/consume", "analyst", {"vm_id": "v", "scope": "s", "nonce": "x"})
        assert status == 403

    service.kill()
    dump = await _dump_database(dsn)
    logs = service.log() + "\n".join(cli_logs)
    assert logs.count("\n") > 10, "the service logged too little for this test to mean anything"
    needles = {f"TOTP/HOTP secret {s[:4]}…": [*_forms(s), _base32_key_hex(s)] for s in totp_secrets}
    needles.update({f"nonce {n[:10]}…": _forms(n) for n in nonces})
    needles.update({f"{role} API token": _forms(t) for role, t in api_tokens.items()})
    for where, text in (("database", dump), ("logs", logs)):
        for name, forms in needles.items():
            for form in forms:
                assert form not in text, f"{name} found in the {where}"
        for otp in otps:
            assert not _contains_otp(text, otp), f"OTP {otp} found in the {where}"


def test_key_files_are_created_private(tmp_path: Path, database_url: str) -> None:
    """Keys generated on first start are files of mode 0600 in a directory of mode 0700."""
    data_dir = tmp_path / "data"
    done = run_cli("token", "create", "--role", "analyst", "--name", uid("k"), "--data-dir", str(data_dir),
                   "--database-url", database_url)
    assert done.returncode == 0, done.stderr
    keys = data_dir / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for name in KEY_FILES:
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600, name


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_service_refuses_to_start_with_a_readable_key_file(tmp_path: Path, database_url: str, mode: int) -> None:
    """A key file group- or other-readable stops `serve` with exit status 2 and one clear line."""
    data_dir = tmp_path / "data"
    assert run_cli("token", "create", "--role", "analyst", "--name", uid("k"), "--data-dir", str(data_dir),
                   "--database-url", database_url).returncode == 0
    pepper = data_dir / "keys" / "pepper.key"
    pepper.chmod(mode)
    done = run_cli("serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir),
                   "--database-url", database_url, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(pepper) in lines[0] and "chmod 600" in lines[0], done.stderr
    assert pepper.read_text().strip() not in done.stderr + done.stdout
