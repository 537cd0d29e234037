"""Typed keys for what the application and each request carry."""

from __future__ import annotations

from aiohttp import web

from ..runtime import Runtime
from ..services.apitokens import Caller

RUNTIME = web.AppKey("runtime", Runtime)
CALLER = web.RequestKey("caller", Caller)
DECISION = web.RequestKey("decision", str)
REASON = web.RequestKey("reason", str)
ROUTE = web.RequestKey("route", object)  # the matched http.common.Route, or None
