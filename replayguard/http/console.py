"""The analysts' web console at ``/console/``: static files shipped inside the package.

The console is plain ES modules, a stylesheet and one HTML page (``replayguard/console/``),
read once at start-up through ``importlib.resources`` and served with a strict
Content-Security-Policy (scripts, styles and connections from this origin only; no inline
script or style; no framing; no form submission; Trusted Types required, so the browser
refuses a string given to ``innerHTML`` and its kin instead of parsing it). The pages call the same API every
other client calls, with the analyst's token in the ``Authorization`` header; the token
never reaches a URL, so it is never in this service's request log. Serving needs no
token: the files hold no data.
"""

from __future__ import annotations

import re
from importlib import resources

from aiohttp import web

from ..errors import NotFound
from .common import Route

ROUTES: list[Route] = []  # not API routes: the console is wired by ``setup`` and left out of OpenAPI
PREFIX = "/console/"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
       " font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none';"
       " require-trusted-types-for 'script'; trusted-types 'none'")
HEADERS = {
    "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY", "Cache-Control": "no-cache", "Cross-Origin-Opener-Policy": "same-origin",
}
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
         ".txt": "text/plain"}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\.(html|js|css|svg|txt)$")
FILES = web.AppKey("console_files", dict)


def load_files() -> dict[str, tuple[bytes, str]]:
    """Every file of the console (name: bytes, content type), read once from the package."""
    found: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("replayguard.console").iterdir():
        name = entry.name
        if entry.is_file() and _NAME.match(name):
            found[name] = (entry.read_bytes(), TYPES["." + name.rpartition(".")[2]])
    return found


def _answer(request: web.Request, name: str) -> web.Response:
    files: dict[str, tuple[bytes, str]] = request.app[FILES]
    hit = files.get(name)
    if hit is None:
        raise NotFound("no such console file")
    body, content_type = hit
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=HEADERS)


async def index(request: web.Request) -> web.Response:
    return _answer(request, "index.html")


async def asset(request: web.Request) -> web.Response:
    return _answer(request, request.match_info["name"])


async def redirect(_request: web.Request) -> web.Response:
    return web.Response(status=308, headers={"Location": PREFIX, **HEADERS})


def setup(app: web.Application) -> None:
    app[FILES] = load_files()
    app.router.add_get("/console", redirect)
    app.router.add_get(PREFIX, index)
    app.router.add_get(PREFIX + "{name}", asset)
