"""The running service's parts, opened and closed in one place.

``open_runtime`` is used by the HTTP app (through ``cleanup_ctx``, ``http/app.py``, which
also starts what only a serving process runs: the alert feed and its leader duties, the
continuity guard's loop) and by the CLI alike, so both call the same services over the
same pool.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import structlog

from .fanout import AlertFanout
from .keys import Keys, keys_location, keys_on_disk, load_keys, retired_keys
from .metrics import Metrics
from .pg import connections, schema
from .pg.appender import Appender, DecideParams
from .services import key_rotation, signing_rotation
from .services.apitokens import ApiTokens
from .services.continuity import ContinuityGuard
from .services.decide import DecisionConfig, DecisionService
from .services.key_binding import BindingGuard, hold_to_binding
from .services.tokens import TokenStore
from .settings import Settings

log = structlog.get_logger(__name__)

SHUTDOWN_STEP_S = 10.0


@dataclass
class Runtime:
    settings: Settings
    dsn: str
    pool: asyncpg.Pool
    keys: Keys
    clock: Callable[[], float]
    metrics: Metrics
    appender: Appender
    tokens: TokenStore
    api_tokens: ApiTokens
    decisions: DecisionService
    fanout: AlertFanout | None
    continuity: ContinuityGuard

    def now_us(self) -> int:
        return int(self.clock() * 1e6)


def resolve_dsn(settings: Settings) -> str:
    """The database URL, starting the embedded PostgreSQL when none is configured."""
    if settings.database_url is not None:
        return settings.database_url.reveal()
    return connections.embedded_url(settings.data_dir, settings.embedded_shared_buffers_mb)


async def prepare_database(settings: Settings) -> str:
    """Resolves the DSN, checks the server answers, applies pending migrations."""
    dsn = resolve_dsn(settings)
    await connections.check_reachable(dsn)
    await schema.migrate_dsn(dsn)
    return dsn


_LEDGER_UNREACHABLE: tuple[type[BaseException], ...] = (*connections.UNAVAILABLE_ERRORS, TimeoutError)


async def ledger_writable(pool: asyncpg.Pool) -> bool:
    """Whether the ledger's database is a primary this service may insert into (2 s at most):
    ``/readyz``'s check, and ``replayguard_ledger_up``'s value from the start."""
    try:
        async with asyncio.timeout(2):
            async with pool.acquire() as conn:
                return bool(await conn.fetchval(
                    "SELECT NOT pg_is_in_recovery() AND has_table_privilege('ledger', 'INSERT')"))
    except _LEDGER_UNREACHABLE:
        return False


@asynccontextmanager
async def open_runtime(
    settings: Settings, *, clock: Callable[[], float] = time.time, dsn: str | None = None,
    migrate: bool = True,
) -> AsyncIterator[Runtime]:
    keys = load_keys(settings)
    if dsn is None:
        dsn = await prepare_database(settings) if migrate else resolve_dsn(settings)
    binding_guard = BindingGuard()
    pool = await connections.create_pool(dsn, size=settings.db_pool_size, on_connect=binding_guard,
                                         statement_timeout_ms=settings.statement_timeout_ms)
    try:  # before anything reads or writes a digest: other keys would find no earlier use
        settled = await key_rotation.settle(pool, settings) + await signing_rotation.settle(pool, settings)
        if settled:  # a rotation killed after its commit
            keys = load_keys(settings)
        retired = {**retired_keys(settings, "secret"), **retired_keys(settings, "receipt"),
                   **retired_keys(settings, "signing")}
        await hold_to_binding(pool, keys, int(clock() * 1e6), keys_location(settings), retired,
                              functools.partial(keys_on_disk, settings))
        binding_guard.hold(keys)
        receipt_keys = await key_rotation.receipt_keys(pool, settings, keys)
        signers = await signing_rotation.load_signers(pool, keys)
    except BaseException:
        await pool.close()
        raise
    metrics = Metrics(redis=settings.redis_url is not None)
    metrics.ledger_up.set(1 if await ledger_writable(pool) else 0)  # then at each /readyz
    fanout = AlertFanout.from_url(settings.redis_url.reveal()) if settings.redis_url is not None else None
    if fanout is not None and metrics.redis_up is not None:
        metrics.redis_up.set(1 if await fanout.ping() else 0)  # then at each /readyz
    params = DecideParams(lock_threshold=settings.lockout_threshold,
                          lock_period_us=settings.lockout_period_s * 1_000_000,
                          refuse_on_rollback=settings.receipt_reaction == "refuse")
    appender = Appender(pool, params, on_batch=metrics.ledger_batch, connect=lambda: connections.connect(
        dsn, statement_timeout_ms=settings.statement_timeout_ms))
    tokens = TokenStore(pool, keys, on_read=metrics.token_read_size.observe, drift_steps=settings.totp_drift_steps)
    filled = await tokens.backfill_fingerprints()  # before any decision (migration 010)
    if filled:
        log.info("otp_credentials_backfilled", tokens=filled)
    moved = await tokens.canonicalize_credentials()  # before any decision (migration 030)
    if moved:
        log.info("otp_credentials_merged", tokens=moved)
    config = DecisionConfig(drift_steps=settings.totp_drift_steps, hotp_look_ahead=settings.hotp_look_ahead,
                            use_retention_s=settings.nonce_max_ttl_s, nonce_max_ttl_s=settings.nonce_max_ttl_s)
    decisions = DecisionService(appender=appender, tokens=tokens, keys=keys, config=config,
                                clock=clock, fanout=fanout, on_decision=metrics.decision, receipt_keys=receipt_keys,
                                retired_receipt_issued=functools.partial(key_rotation.retired_receipt_issued, pool))
    guard = ContinuityGuard(pool, keys, settings, clock, metrics.registry, signers)
    appender.on_committed = guard.committed
    tokens.on_recorded = guard.recorded
    guard.on_recovered = decisions.set_recovered_at
    guard.background = metrics.background
    metrics.background.watch_gc()
    runtime = Runtime(settings=settings, dsn=dsn, pool=pool, keys=keys, clock=clock, metrics=metrics,
                      appender=appender, tokens=tokens, api_tokens=ApiTokens(pool, keys.pepper),
                      decisions=decisions, fanout=fanout, continuity=guard)
    try:
        yield runtime
    finally:
        metrics.background.unwatch_gc()
        await guard.close()
        await _shutdown(appender, tokens, fanout, pool)


async def _shutdown(appender: Appender, tokens: TokenStore, fanout: AlertFanout | None, pool: asyncpg.Pool) -> None:
    """Closes in order, each step bounded: a stuck connection must not hang a shutdown."""
    try:
        await asyncio.wait_for(appender.close(), SHUTDOWN_STEP_S)
    except TimeoutError:
        log.warning("shutdown_appender_timeout")
    try:
        await asyncio.wait_for(tokens.close(), SHUTDOWN_STEP_S)
    except TimeoutError:
        log.warning("shutdown_token_reader_timeout")
    if fanout is not None:
        await fanout.close()
    try:
        await asyncio.wait_for(pool.close(), SHUTDOWN_STEP_S)
    except TimeoutError:
        log.warning("shutdown_pool_timeout")
        pool.terminate()
