"""Chaos: the service killed, its PostgreSQL and Redis taken away, its credentials raced.

Each test breaks something on purpose under concurrent load and then checks only
outcomes: what was answered ``accept`` is durable in the ledger and refused afterwards,
nothing is accepted while the ledger cannot be written, the chain still verifies, and one
credential raced across processes and instances is accepted exactly once.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pyotp
import pytest

from replayguard.core.credentials import nonce_digest, otp_digest, secret_fingerprint
from replayguard.settings import Secret
from tests.conftest import Api, ServiceProcess, cli_env, run_cli, uid
from tests.integration.ledger_check import accepts_by_seq, service_verifies, verify_chain
from tests.integration.owned_servers import OwnedPostgres, OwnedRedis

pytestmark = pytest.mark.slow

CRASH_ROUNDS = 5
NONCE_WORKERS = 12
TOTP_PER_ROUND = 6
SMALL_POOL = {"REPLAYGUARD_DB_POOL_SIZE": "3"}  # many processes share the machine's PostgreSQL (3: the least allowed)


# --- helpers -----------------------------------------------------------------------------

def _make_token(data_dir: Path, dsn: str, role: str) -> str:
    done = run_cli("token", "create", "--role", role, "--name", uid(role), "--data-dir", str(data_dir),
                   "--database-url", dsn)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def _tokens(data_dir: Path, dsn: str, roles: tuple[str, ...]) -> dict[str, str]:
    made = await asyncio.gather(*(asyncio.to_thread(_make_token, data_dir, dsn, role) for role in roles))
    return dict(zip(roles, made, strict=True))


def _pepper(data_dir: Path) -> bytes:
    return bytes.fromhex((data_dir / "keys" / "pepper.key").read_text().strip())


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _post(session: aiohttp.ClientSession, url: str, token: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url, json=body, headers=_auth(token)) as resp:
        data = await resp.json(content_type=None)
        return resp.status, data


@dataclass
class Totp:
    principal: str
    token_id: str
    secret: str


async def _enroll(session: aiohttp.ClientSession, url: str, admin: str, count: int) -> list[Totp]:
    async def one() -> Totp:
        principal = uid("alice")
        status, data = await _post(session, f"{url}/v1/principals/{principal}/tokens", admin, {"type": "totp"})
        assert status == 201, data
        return Totp(principal, data["token_id"], data["secret"])

    return list(await asyncio.gather(*(one() for _ in range(count))))


@dataclass
class Acked:
    """What the service answered ``accept`` to: credential → (seq, digest)."""

    nonces: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    otps: dict[tuple[str, str], tuple[int, bytes]] = field(default_factory=dict)  # (principal, code)

    def digests(self) -> dict[int, bytes]:
        return dict([*self.nonces.values(), *self.otps.values()])


# --- (a) SIGKILL at random moments -------------------------------------------------------

async def _load_until_killed(service: ServiceProcess, tokens: dict[str, str], pepper: bytes, scope: str,
                             totps: list[Totp], rng: random.Random, acked: Acked) -> None:
    """Distinct nonces from many workers plus one TOTP login per principal; SIGKILL at a random moment
    after the first nonce and the first TOTP login were acknowledged (so every round has
    acknowledged accepts of both kinds to lose). The schedule is drawn from ``rng`` up front."""
    stop = asyncio.Event()
    first_nonce, first_otp = asyncio.Event(), asyncio.Event()
    login_delays = [rng.uniform(0, 0.8) for _ in totps]
    kill_delay = rng.uniform(0, 1.1)
    verify_url, consume_url = f"{service.url}/v1/otp/verify", f"{service.url}/v1/nonces/consume"

    async def nonce_worker(session: aiohttp.ClientSession, w: int) -> None:
        for i in range(5000):
            if stop.is_set():
                return
            nonce = f"{scope}-{w}-{i}"
            try:
                status, data = await _post(session, consume_url, tokens["callout"],
                                           {"vm_id": f"vm-{w}", "scope": scope, "nonce": nonce})
            except (TimeoutError, aiohttp.ClientError):
                return  # the service died under this request: its outcome is in doubt
            assert status == 200 and data["decision"] == "accept", data
            acked.nonces[nonce] = (data["seq"], nonce_digest(pepper, scope, nonce.encode()))
            first_nonce.set()

    async def totp_login(session: aiohttp.ClientSession, totp: Totp, delay: float) -> None:
        await asyncio.sleep(delay)
        now = time.time()
        step = int(now // 30)
        code = pyotp.TOTP(totp.secret).at(now)
        try:
            status, data = await _post(session, verify_url, tokens["callout"],
                                       {"vm_id": "vm-totp", "principal": totp.principal, "otp": code})
        except (TimeoutError, aiohttp.ClientError):
            return
        assert status == 200 and data["decision"] == "accept", data
        acked.otps[(totp.principal, code)] = (data["seq"], otp_digest(
            pepper, secret_fingerprint(pepper, "totp", "SHA1", 30, totp.secret).hex(), step))
        first_otp.set()

    async def killer() -> None:
        try:
            async with asyncio.timeout(20):
                await asyncio.gather(first_nonce.wait(), first_otp.wait())
        finally:
            await asyncio.sleep(kill_delay)
        service.proc.send_signal(signal.SIGKILL)
        stop.set()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        await asyncio.gather(killer(), *(nonce_worker(session, w) for w in range(NONCE_WORKERS)),
                             *(totp_login(session, t, d) for t, d in zip(totps, login_delays, strict=True)))
    await asyncio.to_thread(service.proc.wait, 15)
    assert service.proc.returncode == -signal.SIGKILL


async def _all_refused(url: str, tokens: dict[str, str], scope: str, acked: Acked) -> None:
    """Every credential acknowledged before a crash is refused by the restarted service."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        nonces = [_post(session, f"{url}/v1/nonces/consume", tokens["callout"],
                        {"vm_id": uid("vm"), "scope": scope, "nonce": n}) for n in acked.nonces]
        otps = [_post(session, f"{url}/v1/otp/verify", tokens["callout"],
                      {"vm_id": uid("vm"), "principal": p, "otp": code}) for p, code in acked.otps]
        answers = await asyncio.gather(*nonces, *otps)
    for status, data in answers:
        assert status == 200 and data["decision"] == "reject", data
    assert {data["reason"] for _, data in answers[:len(nonces)]} <= {"reused"}
    # A TOTP code re-presented after its step left the drift window is also refused, as invalid.
    assert {data["reason"] for _, data in answers[len(nonces):]} <= {"reused", "invalid"}


async def test_sigkill_at_random_moments_loses_no_acknowledged_accept(
    tmp_path: Path, fresh_database: Callable[[], Any], service_factory: Callable[..., Any],
) -> None:
    """Five SIGKILLs at random moments under nonce and TOTP load: every round acknowledges nonces and TOTP
    logins, and every accept stays durable, refused and chained. The seed is printed; set
    REPLAYGUARD_CHAOS_SEED to replay a schedule."""
    dsn = await fresh_database()
    data_dir = tmp_path / "data"
    tokens = await _tokens(data_dir, dsn, ("callout", "admin", "analyst"))
    pepper = _pepper(data_dir)
    seed = int(os.environ.get("REPLAYGUARD_CHAOS_SEED") or secrets.randbits(32))
    print(f"chaos seed: REPLAYGUARD_CHAOS_SEED={seed}")
    rng = random.Random(seed)
    acked = Acked()
    service = await service_factory(data_dir=data_dir, database_url=dsn, env=cli_env(**SMALL_POOL))
    for round_no in range(CRASH_ROUNDS):
        async with aiohttp.ClientSession() as session:
            totps = await _enroll(session, service.url, tokens["admin"], TOTP_PER_ROUND)
        scope = uid(f"crash{round_no}")
        round_acked = Acked()
        await _load_until_killed(service, tokens, pepper, scope, totps, rng, round_acked)
        assert round_acked.nonces and round_acked.otps, f"round {round_no} acknowledged nothing of a kind (seed {seed})"
        service = await service_factory(data_dir=data_dir, database_url=dsn, env=cli_env(**SMALL_POOL))
        await _all_refused(service.url, tokens, scope, round_acked)
        acked.nonces.update(round_acked.nonces)
        acked.otps.update(round_acked.otps)

    in_ledger = await accepts_by_seq(dsn)
    for seq, digest in acked.digests().items():
        assert in_ledger.get(seq) == digest, f"acknowledged accept at seq {seq} is not in the ledger (seed {seed})"
    assert await verify_chain(dsn) >= len(acked.digests())
    assert await service_verifies(service.url, tokens["analyst"]) is True


# --- (b) PostgreSQL faults ---------------------------------------------------------------

@dataclass
class Answer:
    nonce: str
    sent: float
    done: float
    status: int | None  # None: the connection failed
    decision: str | None = None
    seq: int | None = None


async def _steady_load(url: str, token: str, scope: str, stop: asyncio.Event, out: list[Answer],
                       workers: int = 8) -> None:
    async def worker(session: aiohttp.ClientSession, w: int) -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            nonce = f"{scope}-{w}-{i}"
            sent = time.monotonic()
            try:
                status, data = await _post(session, f"{url}/v1/nonces/consume", token,
                                           {"vm_id": f"vm-{w}", "scope": scope, "nonce": nonce})
            except (TimeoutError, aiohttp.ClientError):
                out.append(Answer(nonce, sent, time.monotonic(), None))
                await asyncio.sleep(0.05)
                continue
            answer = Answer(nonce, sent, time.monotonic(), status)
            if status == 200:
                answer.decision, answer.seq = data["decision"], data["seq"]
            else:
                assert status == 503 and data["error"]["code"] == "unavailable", data
                await asyncio.sleep(0.02)
            out.append(answer)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        await asyncio.gather(*(worker(session, w) for w in range(workers)))


async def test_postgres_stopped_and_restarted_under_load(
    tmp_path: Path, owned_pg: OwnedPostgres, service_factory: Callable[..., Any],
) -> None:
    """PostgreSQL killed mid-load: 503 while down, nothing accepted
    without a durable write, back within seconds alone."""
    data_dir = tmp_path / "data"
    tokens = await _tokens(data_dir, owned_pg.url, ("callout", "analyst"))
    service = await service_factory(data_dir=data_dir, database_url=owned_pg.url)
    scope, stop = uid("pgdown"), asyncio.Event()
    answers: list[Answer] = []
    load = asyncio.create_task(_steady_load(service.url, tokens["callout"], scope, stop, answers))
    await asyncio.sleep(1.0)
    await asyncio.to_thread(owned_pg.stop)
    down_from = time.monotonic()
    await asyncio.sleep(2.0)
    up_from = time.monotonic()
    await asyncio.to_thread(owned_pg.start)
    up_at = time.monotonic()
    recovered: float | None = None
    for _ in range(200):  # bounded: 20 s at most
        if any(a.decision == "accept" and a.sent >= up_at for a in answers):
            recovered = time.monotonic()
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(load, 30)

    assert recovered is not None, "decisions did not accept again after PostgreSQL returned"
    assert service.proc.poll() is None, "the service process had to die to recover"
    while_down = [a for a in answers if a.sent >= down_from and a.done <= up_from]
    assert while_down, "no request was made while PostgreSQL was down"
    assert all(a.status == 503 for a in while_down), {a.status for a in while_down}
    accepted = [a for a in answers if a.decision == "accept"]
    assert any(a.done < down_from for a in accepted) and any(a.sent >= up_at for a in accepted)
    pepper = _pepper(data_dir)
    in_ledger = await accepts_by_seq(owned_pg.url)
    for a in accepted:
        assert a.seq is not None and in_ledger.get(a.seq) == nonce_digest(pepper, scope, a.nonce.encode()), a
    await verify_chain(owned_pg.url)
    async with aiohttp.ClientSession() as session:  # and they stay spent
        again = await asyncio.gather(*(_post(session, f"{service.url}/v1/nonces/consume", tokens["callout"],
                                             {"vm_id": "vm-x", "scope": scope, "nonce": a.nonce})
                                       for a in accepted[:200]))
    assert {(s, d["decision"]) for s, d in again} == {(200, "reject")}


async def test_slow_ledger_times_out_to_503_and_accepts_after(
    api_factory: Callable[..., Any], fresh_database: Callable[[], Any],
) -> None:
    """With the ledger head locked elsewhere, decisions answer 503 within the statement timeout, then accept."""
    dsn = await fresh_database()
    api: Api = await api_factory(database_url=Secret(dsn), statement_timeout_ms=300)
    scope = uid("slow")
    blocker = await asyncpg.connect(dsn)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.fetch("SELECT seq FROM ledger_head FOR UPDATE")
        blocked = await asyncio.gather(*(
            api.post("/v1/nonces/consume", {"vm_id": "vm-slow", "scope": scope, "nonce": f"n-{i}"})
            for i in range(8)))
        assert all(status == 503 and body["error"]["code"] == "unavailable" for status, body in blocked), blocked
        await tx.rollback()
    finally:
        await blocker.close()
    after = await asyncio.gather(*(
        api.post("/v1/nonces/consume", {"vm_id": "vm-slow", "scope": scope, "nonce": f"n-{i}"}) for i in range(8)))
    # Nothing was accepted while blocked: the same nonces are new to the ledger now.
    assert [(status, body["decision"]) for status, body in after] == [(200, "accept")] * 8


# --- (c) Redis faults --------------------------------------------------------------------

async def test_redis_stopped_restarted_and_flushed_mid_load_never_changes_a_decision(
    tmp_path: Path, api_factory: Callable[..., Any],
) -> None:
    """Redis down, back empty and flushed while nonces are consumed
    and replayed: each accepted once, fresh ones accepted."""
    redis = OwnedRedis(tmp_path / "redis")
    await asyncio.to_thread(redis.start)
    try:
        api: Api = await api_factory(redis_url=Secret(redis.url))
        scope, stop = uid("redis"), asyncio.Event()
        outcomes: dict[str, list[str]] = {}

        async def worker(w: int) -> None:
            for i in range(100_000):
                if stop.is_set():
                    return
                nonce, vm = f"{scope}-{w}-{i}", f"vm-{w}"
                body = {"vm_id": vm, "scope": scope, "nonce": nonce}
                status, first = await api.post("/v1/nonces/consume", body)
                assert status == 200 and first["decision"] == "accept", first  # a fresh nonce
                replays = await asyncio.gather(
                    api.post("/v1/nonces/consume", body),  # same VM
                    api.post("/v1/nonces/consume", {**body, "vm_id": f"{vm}-clone"}),
                )
                outcomes[nonce] = [first["decision"]] + [r["decision"] for s, r in replays if s == 200]
                assert all(s == 200 for s, _ in replays), replays

        async def chaos() -> None:
            await asyncio.sleep(0.7)
            await asyncio.to_thread(redis.stop)
            await asyncio.sleep(0.7)
            await asyncio.to_thread(redis.start)  # comes back empty
            await asyncio.sleep(0.7)
            reader, writer = await asyncio.open_unix_connection(str(redis.socket_path))
            writer.write(b"FLUSHALL\r\n")
            await writer.drain()
            assert (await reader.readline()).startswith(b"+OK")
            writer.close()
            await asyncio.sleep(0.7)
            stop.set()

        await asyncio.wait_for(asyncio.gather(chaos(), *(worker(w) for w in range(6))), 60)
    finally:
        await asyncio.to_thread(redis.close)
    assert len(outcomes) > 50
    for nonce, decisions in outcomes.items():
        assert decisions == ["accept", "reject", "reject"], (nonce, decisions)
    status, fresh = await api.post("/v1/nonces/consume", {"vm_id": "vm-z", "scope": scope, "nonce": uid("fresh")})
    assert (status, fresh["decision"]) == (200, "accept")


# --- (d) races across worker processes and instances -------------------------------------

RACE_ROUNDS = 920  # nonce rounds; with RACE_TOTPS TOTP rounds, a thousand in all
RACE_TOTPS = 80
RACERS = 8  # presentations of one credential per round: 4 to each instance
RACE_PARALLEL = 8  # rounds in flight at once


async def _two_instances(tmp_path: Path, dsn: str, service_factory: Callable[..., Any]) -> tuple[
        list[ServiceProcess], dict[str, str]]:
    first_dir, second_dir = tmp_path / "inst-a", tmp_path / "inst-b"
    tokens = await _tokens(first_dir, dsn, ("callout", "admin"))
    second_dir.mkdir()
    shutil.copytree(first_dir / "keys", second_dir / "keys")  # one pepper: one digest per credential
    env = cli_env(**SMALL_POOL)
    services = list(await asyncio.gather(*(
        service_factory(data_dir=d, database_url=dsn, extra_args=("--workers", "4"), env=env)
        for d in (first_dir, second_dir))))
    return services, tokens


@pytest.mark.timeout(300)
async def test_one_credential_raced_across_workers_and_instances_is_accepted_once(
    tmp_path: Path, fresh_database: Callable[[], Any], service_factory: Callable[..., Any],
) -> None:
    """A thousand credentials (920 nonces, 80 TOTP codes), each presented 8 times at once across
    2 instances of 4 workers: exactly one accept each time."""
    dsn = await fresh_database()
    services, tokens = await _two_instances(tmp_path, dsn, service_factory)
    urls = [s.url for s in services]
    scope = uid("race")
    # A fresh connection per request, so SO_REUSEPORT spreads them over every worker.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def race(path: str, body: dict[str, Any]) -> list[str]:
            answers = await asyncio.gather(*(
                _post(session, f"{urls[i % 2]}{path}", tokens["callout"], {**body, "vm_id": f"vm-{i}"})
                for i in range(RACERS)))
            assert all(status == 200 for status, _ in answers), answers
            return [data["decision"] for _, data in answers]

        async def nonce_rounds(lane: int) -> list[list[str]]:
            return [await race("/v1/nonces/consume", {"scope": scope, "nonce": f"n-{lane}-{r}"})
                    for r in range(RACE_ROUNDS // RACE_PARALLEL)]

        lanes = await asyncio.gather(*(nonce_rounds(lane) for lane in range(RACE_PARALLEL)))
        totps = await _enroll(session, urls[0], tokens["admin"], RACE_TOTPS)
        now = time.time()
        otp_rounds = await asyncio.gather(*(
            race("/v1/otp/verify", {"principal": t.principal, "otp": pyotp.TOTP(t.secret).at(now)}) for t in totps))
    rounds = [r for lane in lanes for r in lane] + list(otp_rounds)
    assert len(rounds) == RACE_ROUNDS + RACE_TOTPS == 1000
    for decisions in rounds:
        assert decisions.count("accept") == 1, decisions
    await verify_chain(dsn)
