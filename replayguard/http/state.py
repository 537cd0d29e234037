"""Typed keys for what the application and each request carry (``app.create_app`` sets
the application's, once the runtime is open)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from ..runtime import Runtime
from ..services.alertfeed import AlertFeed
from ..services.alerts import AlertService
from ..services.apitokens import Caller
from ..services.events import EventService
from ..services.ledger import LedgerService
from ..services.timeline import TimelineService
from ..services.witness_store import WitnessStore


@dataclass(frozen=True)
class Analysts:
    """The services behind the analysts' routes, and the alert feed their stream reads."""

    alerts: AlertService
    ledger: LedgerService
    timeline: TimelineService
    feed: AlertFeed


RUNTIME = web.AppKey("runtime", Runtime)
ANALYSTS = web.AppKey("analysts", Analysts)
EVENTS = web.AppKey("events", EventService)
WITNESS_STORE = web.AppKey("witness_store", WitnessStore)
CALLER = web.RequestKey("caller", Caller)
DECISION = web.RequestKey("decision", str)
REASON = web.RequestKey("reason", str)
ROUTE = web.RequestKey("route", object)  # the matched http.common.Route, or None
CLIENT_LEFT = web.RequestKey("client_left", bool)  # common.stops_with_client stopped it: its client left
