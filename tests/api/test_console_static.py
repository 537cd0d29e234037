"""The console's files as the service serves them: from the package, under a strict
Content-Security-Policy, with no inline script, no external origin and no HTML built from
strings in the scripts; and everything the console needs is shipped as package data."""

from __future__ import annotations

import re
import tomllib
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest

from replayguard.http import console
from tests.conftest import REPO, Api

CONSOLE_DIR = Path(str(resources.files("replayguard.console")))
SCRIPTS = sorted(p.name for p in CONSOLE_DIR.glob("*.js"))


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if any(name.startswith("on") or name == "style" for name, _ in attrs):
            self.inline.append(f"{tag} {attrs}")

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(data)

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


async def test_the_console_page_is_served_with_a_strict_policy(api: Api) -> None:
    """/console/ is HTML with a CSP that allows only this origin and no inline script or style,
    and that requires Trusted Types, so no string is ever parsed as HTML."""
    resp = await api.client.get("/console/")
    assert resp.status == 200 and resp.content_type == "text/html"
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
    assert "require-trusted-types-for 'script'" in csp and "trusted-types 'none'" in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "no-referrer"


async def test_the_page_has_no_inline_script_and_no_external_origin(api: Api) -> None:
    """Every script of the page is a file of this origin; no tag carries an event handler or a style."""
    parser = _Tags()
    parser.feed(await (await api.client.get("/console/")).text())
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert scripts and all(attrs.get("src") and "//" not in str(attrs["src"]) for attrs in scripts)
    assert parser.inline == []
    for tag, attrs in parser.tags:
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not re.match(r"^[a-z]+:", value) or value == "data:,", (tag, attrs)


@pytest.mark.parametrize("name", SCRIPTS)
async def test_every_script_is_served_as_javascript(api: Api, name: str) -> None:
    """Each module is served with a JavaScript type (browsers refuse modules of any other type)."""
    resp = await api.client.get(f"/console/{name}")
    assert resp.status == 200 and resp.content_type == "text/javascript"


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_script_builds_html_from_strings(name: str) -> None:
    """No module uses innerHTML, outerHTML, insertAdjacentHTML, document.write, eval or EventSource."""
    text = (CONSOLE_DIR / name).read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in text, f"{name} uses {sink}"
    assert "new EventSource" not in text, "EventSource cannot send the Authorization header"


@pytest.mark.parametrize("path", ["/console/nope.js", "/console/..%2fapp.py", "/console/__init__.py",
                                  "/console/%2e%2e/settings.py", "/console/INDEX.HTML"])
async def test_anything_else_under_console_is_404(api: Api, path: str) -> None:
    """Only the packaged console files are served; other names are the contract's 404."""
    resp = await api.client.get(path)
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_console_without_slash_redirects(api: Api) -> None:
    """/console redirects to /console/, so the page's relative paths resolve."""
    resp = await api.client.get("/console", allow_redirects=False)
    assert resp.status == 308 and resp.headers["Location"] == "/console/"


def test_every_console_file_is_package_data() -> None:
    """The wheel carries every console file: pyproject's package-data globs cover them all."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = data["replayguard.console"]
    files = [p for p in CONSOLE_DIR.iterdir() if p.is_file() and p.suffix != ".py"]
    assert files
    for path in files:
        assert any(Path(path.name).match(pattern) for pattern in patterns), path.name
    assert set(console.load_files()) == {p.name for p in files}


def test_the_openapi_document_leaves_the_console_out() -> None:
    """The console's files are not API routes."""
    from replayguard.http.app import all_routes
    assert not [r for r in all_routes() if r.path.startswith("/console")]
