"""``replayguard demo``: the snapshot-replay attack of the seed article, played end to end.

It runs the real service in-process on the embedded PostgreSQL (a throw-away data dir
unless ``--data-dir`` is given) and talks to it over HTTP exactly as a PAM callout, a
hypervisor relay and an analyst would, narrating each step. Then the same attack one level
down: the service's database is restored from a backup, the replay is refused
(``ledger_rollback``, thanks to a file witness), and the recovery is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pyotp
from aiohttp import web

from ..http.app import create_app
from ..http.front import FrontRunner
from ..http.server import runner_args
from ..http.state import RUNTIME
from ..pg.connections import stop_embedded
from ..settings import Secret, Settings


def register(sub: Any) -> None:
    parser = sub.add_parser("demo", help="play the snapshot-replay attack end to end and narrate it")
    parser.add_argument("--data-dir", help="keep the demo's state here (default: a temporary folder)")
    parser.add_argument("--database-url", help="use this PostgreSQL instead of the embedded one")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="error")
    from .main import add_setting_flags

    add_setting_flags(parser)
    parser.set_defaults(handler=cmd_demo)


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Narrator:
    out: Any = sys.stdout
    step: int = 0

    def say(self, text: str) -> None:
        self.step += 1
        print(f"[{self.step}] {text}", file=self.out, flush=True)

    def detail(self, text: str) -> None:
        print(f"      {text}", file=self.out, flush=True)


class DemoClient:
    def __init__(self, session: aiohttp.ClientSession, base: str, tokens: dict[str, str]) -> None:
        self._session = session
        self._base = base
        self._tokens = tokens

    async def call(self, method: str, path: str, role: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self._tokens[role]}"}
        async with self._session.request(method, self._base + path, json=body, headers=headers) as resp:
            data = await resp.json() if resp.content_type == "application/json" else None
            return resp.status, data


async def _play(client: DemoClient, say: Narrator) -> bool:
    vm, user = "web-01", "alice"
    _, enrolled = await client.call("POST", f"/v1/principals/{user}/tokens", "admin", {"type": "totp"})
    say.say(f"An administrator enrolls a TOTP token for {user}; the secret is stored AES-GCM encrypted.")
    snapshot_at = time.time()
    await client.call("POST", "/v1/hypervisor/events", "hypervisor", {
        "event_id": "demo-snap-1", "type": "snapshot.created", "vm_id": vm, "snapshot_id": "nightly",
        "snapshot_created_at": _rfc3339(snapshot_at), "occurred_at": _rfc3339(snapshot_at), "host": "hv-01"})
    say.say(f"The hypervisor takes snapshot 'nightly' of VM {vm} and tells replayguard.")
    code = pyotp.TOTP(enrolled["secret"]).now()
    _, login = await client.call("POST", "/v1/otp/verify", "callout",
                                 {"vm_id": vm, "principal": user, "otp": code, "context": {"service": "sshd"}})
    say.say(f"{user} logs in over SSH with a fresh code: {login['decision']} (ledger seq {login['seq']}).")
    say.detail("An attacker watching the VM notes the code.")
    _, _revert = await client.call("POST", "/v1/hypervisor/events", "hypervisor", {
        "event_id": "demo-revert-1", "type": "snapshot.reverted", "vm_id": vm, "snapshot_id": "nightly",
        "snapshot_created_at": _rfc3339(snapshot_at), "occurred_at": _rfc3339(time.time()), "host": "hv-01"})
    say.say("The attacker reverts the VM to 'nightly': inside the guest, the login never happened.")
    _, replay = await client.call("POST", "/v1/otp/verify", "callout",
                                  {"vm_id": vm, "principal": user, "otp": code, "context": {"service": "sshd"}})
    say.say(f"The attacker replays the same code: {replay['decision']} as {replay['reason']}.")
    return await _report(client, say, replay, login)


async def _report(client: DemoClient, say: Narrator, replay: dict[str, Any], login: dict[str, Any]) -> bool:
    ok = bool(replay["decision"] == "reject" and replay["reason"] == "replay_after_rollback")
    alert_id = replay.get("alert_id")
    if alert_id:
        status, alert = await client.call("GET", f"/v1/alerts/{alert_id}", "analyst")
        if status == 200:
            say.say(f"Alert {alert_id}: {alert.get('severity')} {alert.get('kind')} — {alert.get('summary')}")
            seqs = [e.get("seq") for e in alert.get("entries", alert.get("ledger_entries", []))]
            say.detail(f"Ledger entries behind it: {seqs}; the undone login was seq {login['seq']}.")
    status, verify = await client.call("GET", "/v1/ledger/verify", "analyst")
    if status == 200:
        say.say(f"The ledger verifies: ok={verify.get('ok')}, {verify.get('checked')} entries checked.")
        ok = ok and bool(verify.get("ok"))
    say.say("Refused and reported." if ok else "UNEXPECTED: the replay was not refused as a rollback replay.")
    return ok


ROLES = ("admin", "callout", "hypervisor", "analyst")


@asynccontextmanager
async def _serving(settings: Settings, database_url: str | None = None) -> AsyncIterator[tuple[DemoClient, Any]]:
    """The service in-process on a free port, with a token per role, served as ``serve``
    serves it: the same front (``FrontRunner``) and runner arguments (``runner_args``)."""
    if database_url is not None:
        settings = settings.replace(database_url=Secret(database_url))
    app = create_app(settings)
    runner = FrontRunner(app, **runner_args(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        runtime = app[RUNTIME]
        # Token names are unique among active tokens: each run's own (a data dir may see many).
        run = secrets.token_hex(3)
        tokens = {role: (await runtime.api_tokens.create(role, f"demo-{role}-{run}"))[1] for role in ROLES}
        async with aiohttp.ClientSession() as session:
            yield DemoClient(session, f"http://127.0.0.1:{port}", tokens), runtime
    finally:
        await runner.cleanup()


async def _run(settings: Settings) -> int:
    # The witness lives apart from the data dir (the database's storage), as it should.
    with tempfile.TemporaryDirectory(prefix="replayguard-demo-witness-") as place:
        witness = Path(place) / "checkpoints.json"
        return await _acts(settings.replace(witnesses=(f"file:{witness}",), checkpoint_every=1))


async def _acts(settings: Settings) -> int:
    say = Narrator()
    async with _serving(settings) as (client, runtime):
        ok = await _play(client, say)
        dsn = runtime.dsn
    print("\nThe same attack, one level down: the host's own database goes back in time.", flush=True)
    backup = await _copy_database(dsn)
    try:
        say.say("The operator backs up replayguard's database (CREATE DATABASE ... TEMPLATE ...).")
        async with _serving(settings, dsn) as (client, runtime):
            used = await _use_after_backup(client, runtime, say)
        say.say("The database's disk fails; the operator restores last night's backup and starts the service on it.")
        async with _serving(settings, backup) as (client, runtime):
            ok = await _host_rollback(client, runtime, settings.replace(database_url=Secret(backup)), used, say) and ok
    finally:  # the demo's copy leaves nothing on the server (a given --database-url's above all)
        await _drop_database(dsn, backup)
    return 0 if ok else 1


async def _copy_database(dsn: str) -> str:
    name = f"replayguard_backup_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(dsn, database="postgres")
    try:
        source = await asyncpg.connect(dsn)
        current = await source.fetchval("SELECT current_database()")
        await source.close()
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{current}"')
    finally:
        await conn.close()
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


async def _drop_database(dsn: str, copy: str) -> None:
    """Drops the database ``_copy_database`` made; a failure is one line on stderr, not the demo's."""
    name = urlsplit(copy).path.lstrip("/")
    try:
        conn = await asyncpg.connect(dsn, database="postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"replayguard demo: could not drop its copy {name}: {exc}", file=sys.stderr, flush=True)


async def _use_after_backup(client: DemoClient, runtime: Any, say: Narrator) -> dict[str, Any]:
    body = {"vm_id": "api-01", "scope": "api-login", "nonce": secrets.token_hex(16)}
    _, used = await client.call("POST", "/v1/nonces/consume", "callout", body)
    say.say(f"After the backup, a guest consumes a nonce: {used['decision']} (ledger seq {used['seq']}).")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await runtime.continuity.check()
        if all(s.held is not None and s.held.seq >= used["seq"] for s in runtime.continuity.states.values()):
            break
        await asyncio.sleep(0.1)
    say.detail("A signed checkpoint of that entry is now held by a witness file the database does not share.")
    return body


async def _host_rollback(client: DemoClient, runtime: Any, settings: Settings, used: dict[str, Any],
                         say: Narrator) -> bool:
    status, refused = await client.call("POST", "/v1/nonces/consume", "callout", used)
    code = (refused or {}).get("error", {}).get("code")
    say.say(f"The attacker replays the nonce against the restored ledger: HTTP {status} {code}.")
    say.detail("The restored database forgot the use, but the witness holds a later checkpoint: "
               "no decision is served, /readyz is 503 and a critical ledger_rollback alert is raised.")
    from ..services import recovery

    done = await recovery.record(runtime.pool, runtime.keys.signing_key(), runtime.continuity.held_checkpoints(),
                                 "demo: restored last night's backup", recovery.operator(), runtime.now_us(),
                                 settings.totp_drift_steps)
    await runtime.continuity.check()
    await runtime.continuity.exchange.push(done.checkpoint)
    await runtime.continuity.check()
    say.say(f"The operator records the recovery (replayguard ledger accept-rollback): ledger seq {done.seq}, "
            f"abandoned checkpoint {done.payload['abandoned']['seq']}, by {done.payload['who']}.")
    _, again = await client.call("POST", "/v1/nonces/consume", "callout", used)
    say.say(f"The attacker replays the nonce again: {again['decision']} as {again['reason']} "
            "(nonces issued before the recovery are refused).")
    ok = status == 503 and code == "ledger_rollback" and again["reason"] == "reused"
    say.say("Refused, reported and recovered." if ok else "UNEXPECTED: the host-side rollback was not refused.")
    return ok


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .main import run_async

    if args.data_dir:
        return run_async(_run(settings))
    with tempfile.TemporaryDirectory(prefix="replayguard-demo-") as tmp:
        Path(tmp).chmod(0o711)  # made just now; as root the embedded server's user must pass it
        data_dir = Path(tmp) / "data"
        try:
            return run_async(_run(settings.replace(data_dir=data_dir)))
        finally:
            if settings.embedded:
                stop_embedded(data_dir)
