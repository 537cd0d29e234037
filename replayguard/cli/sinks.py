"""``replayguard sinks test``: sends one test alert to every configured sink, directly.

It reads the same settings as ``serve`` (``sinks``, ``webhook_secret``) and sends through
the same transports, bypassing the outbox, so an operator sees at once whether each sink
(file, syslog, webhook, Splunk HEC; JSON, ECS or OCSF) takes a record. Exit status 0 when
every sink took it, 1 when one did not, 2 when the settings are wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from datetime import UTC, datetime
from typing import Any

from .. import __version__
from ..core.timefmt import rfc3339_us
from ..services.alertfeed_sinks import sink_configs
from ..services.alerts import content_digest
from ..settings import Settings
from ..sinks import DeliveryError, SinkConfig, build_sink

SEND_TIMEOUT_S = 10.0


def probe_record(now: datetime) -> dict[str, Any]:
    """An info alert of kind ``sink_test`` shaped like every alert the sinks receive."""
    stamp = rfc3339_us(int(now.timestamp() * 1_000_000))
    ident = f"test-{int(now.timestamp())}"
    record: dict[str, Any] = {
        "type": "alert", "id": "", "alert_id": ident, "alert_uid": ident, "kind": "sink_test", "severity": "info",
        "status": "open", "vm_id": None, "principal": None, "count": 1, "first_seen": stamp, "last_seen": stamp,
        "updated_at": stamp, "summary": "replayguard sinks test: a delivery check, not an incident",
        "details": {"test": True}, "acknowledged": None, "change": 0,
    }
    return {**record, "id": f"alert-{ident}.0.{content_digest(record)}"}


async def _try(config: SinkConfig, record: dict[str, Any]) -> str | None:
    """None when the sink took the record, else why not."""
    sink = build_sink(config, version=__version__, clock=lambda: datetime.now(UTC),
                      hostname=socket.gethostname(), timeout=SEND_TIMEOUT_S)
    try:
        async with asyncio.timeout(SEND_TIMEOUT_S + 1):
            await sink.send([record])
    except DeliveryError as exc:
        return exc.message
    except TimeoutError:
        return "no answer in time"
    finally:
        await sink.close()
    return None


def cmd_test(_args: argparse.Namespace, settings: Settings) -> int:
    configs = sink_configs(settings)
    if not configs:
        print("no sinks configured (settings: sinks)")
        return 0
    record = probe_record(datetime.now(UTC))

    async def run() -> list[str | None]:
        return [await _try(config, record) for config in configs]

    failures = 0
    for config, error in zip(configs, asyncio.run(run()), strict=True):
        print(f"{config.name}  {config.describe()}  {'ok' if error is None else 'FAILED: ' + error}")
        failures += error is not None
    return 1 if failures else 0


def register(sub: Any) -> None:
    from .main import add_setting_flags

    sinks = sub.add_parser("sinks", help="external alert sinks")
    cmds = sinks.add_subparsers(dest="sinks_command", required=True)
    test = cmds.add_parser("test", help="send one test alert to every configured sink")
    add_setting_flags(test)
    test.set_defaults(handler=cmd_test)
