#!/usr/bin/env python3
"""The HTTP floor: the cheapest aiohttp handler for a decision-shaped POST.

``bench/run.py`` starts it beside the service and drives it with the same wrk, Python and
uvloop, so every run also measures what one request costs this machine before any of
replayguard's own code runs: the framework and the system calls. The service's CPU per
decision divided by this floor's CPU per request is comparable across machines and runs,
where decisions per second are not (bench/README.md, "the HTTP floor").

Usage: floor_app.py PORT
"""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web

BODY = (b'{"decision":"accept","reason":"ok","flags":[],"seq":1,'
        b'"receipt":"rg1.eyJ2bSI6InZtLTEiLCJzZXEiOjEsImVwIjowfQ.c2lnbmF0dXJl"}')


async def decide(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/nonces/consume", decide)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
