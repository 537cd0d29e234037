"""The sinks' copy of every alert change and checkpoint, fed by the alert feed's leader.

The leader (``alertfeed_leader.py``) hands every alert change and every checkpoint to the
sinks' outbox, fsyncs it, and then records in ``sink_feed`` how far it got, so a new leader
carries on where the last one stopped (at-least-once; records carry ids for dedup). Every
instance, leader or not, delivers what its own outbox holds, so records spooled by an
instance that stopped or lost the lead leave on its next start.
"""

from __future__ import annotations

import asyncpg
import structlog

from ..core import checkpoints as cps
from ..errors import ConfigError
from ..pg.connections import acquire
from ..runtime import Runtime
from ..settings import Settings
from ..sinks import SinkConfig, SinkDispatcher, parse_sink_spec
from .alertfeed_streams import PAGE
from .alerts import AlertService, sink_checkpoint, sink_record
from .ledger import LedgerService

log = structlog.get_logger(__name__)

_SINK_FEED_INIT = ("INSERT INTO sink_feed VALUES (true, (SELECT coalesce(max(change_seq), 0) FROM alerts),"
                   " (SELECT coalesce(max(seq), 0) FROM checkpoints WHERE seq <= (SELECT seq FROM ledger_head)))"
                   " ON CONFLICT DO NOTHING")


_SINK_CHECKPOINTS = ("SELECT * FROM checkpoints WHERE seq > $1 AND key_id = ANY($2::text[])"
                     " AND seq <= (SELECT seq FROM ledger_head) ORDER BY seq LIMIT $3")


WEBHOOK_PREFIXES = ("webhook:", "ecs+webhook:", "ocsf+webhook:")


def sink_configs(settings: Settings) -> list[SinkConfig]:
    """The sinks of ``settings.sinks``, parsed; a bad spec is a ConfigError with one line."""
    try:
        return [parse_sink_spec(spec, secret=settings.webhook_secret
                                if spec.strip().startswith(WEBHOOK_PREFIXES) else None)
                for spec in settings.sinks]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_dispatcher(runtime: Runtime) -> SinkDispatcher | None:
    """The sinks of ``settings.sinks``; a bad spec stops start-up with one line."""
    settings = runtime.settings
    if not settings.sinks:
        return None
    configs = sink_configs(settings)
    try:
        return SinkDispatcher(configs, spool_dir=settings.data_dir / "outbox")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class SinkFeed:
    """One instance's sinks: their delivery (``dispatcher``, None without sinks), and, while
    it leads, the records it hands them."""

    def __init__(self, runtime: Runtime, alerts: AlertService, ledger: LedgerService,
                 dispatcher: SinkDispatcher | None) -> None:
        self._rt, self._alerts, self._ledger, self.dispatcher = runtime, alerts, ledger, dispatcher
        self.started = False
        self._error: str | None = None  # why the sinks did not start, as last logged

    async def hold_position(self, conn: asyncpg.Connection) -> None:
        """Fixes the sinks' position (the newest alert change and checkpoint), unless a
        position is stored already; a feed does so before it serves."""
        if self.dispatcher is not None:
            await conn.execute(_SINK_FEED_INIT)

    async def start(self) -> None:
        """Starts the sinks' delivery, on every instance, leader or not: each delivers what its
        own outbox holds (records spooled while it led, before it stopped or lost the lead);
        only the leader hands it new records (``feed``). A failure is logged once per
        distinct error and retried."""
        if self.dispatcher is None or self.started:
            return
        try:
            await self.dispatcher.start()
        except (OSError, ConfigError) as exc:
            if str(exc) != self._error:
                self._error = str(exc)
                log.error("sinks_not_started", error=str(exc))
            return
        self.started, self._error = True, None

    async def stop(self) -> None:
        if self.dispatcher is not None and self.started:
            self.started = False
            await self.dispatcher.stop()

    async def feed(self) -> bool:
        """Hands alert changes and checkpoints after the stored position to the sinks; True
        when it left a backlog (a full page of either), to feed at once."""
        assert self.dispatcher is not None  # noqa: S101 - narrows the type for mypy: the leader feeds started sinks only
        async with acquire(self._rt.pool) as conn:
            await conn.execute(_SINK_FEED_INIT)
            pos = await conn.fetchrow("SELECT alert_change_seq, checkpoint_seq FROM sink_feed")
            alerts = await self._alerts.changes(pos["alert_change_seq"], PAGE)
            # Only this deployment's signed checkpoints (a retired signing key's within its
            # span, ``LedgerService.trusted``), up to the head: a row of another key,
            # or one that does not verify, is not evidence (the position moves past it), and
            # none past the head, where no checkpoint of ours can be, may move the position
            # beyond every checkpoint still to come.
            rows = await conn.fetch(_SINK_CHECKPOINTS, pos["checkpoint_seq"], self._ledger.key_ids, PAGE)
            checkpoints = [row for row in rows if self._ledger.trusted(cps.from_row(row))]
            for record in alerts:
                self.dispatcher.submit(sink_record(record))
            for record in checkpoints:
                self.dispatcher.submit(sink_checkpoint(cps.to_json(cps.from_row(record))))
            if alerts or checkpoints:
                # The position moves past these records only once the outbox holds them
                # durably: a power loss must not leave the database saying "handed over".
                try:
                    await self.dispatcher.sync()
                except OSError as exc:
                    log.error("sink_outbox_sync_failed", error=str(exc))  # handed over again next time
                    return False
            await conn.execute(
                "UPDATE sink_feed SET alert_change_seq = greatest(alert_change_seq, $1),"
                " checkpoint_seq = greatest(checkpoint_seq, $2)",
                alerts[-1]["change_seq"] if alerts else 0, rows[-1]["seq"] if rows else 0)
        return len(alerts) == PAGE or len(rows) == PAGE
