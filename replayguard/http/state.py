"""Typed keys for what the application and each request carry."""

from __future__ import annotations

from aiohttp import web

from ..runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
CALLER = "caller"  # request key: the authenticated apitokens.Caller
