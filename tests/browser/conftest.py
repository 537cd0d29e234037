"""A real browser for the console's tests: Debian's Chromium driven by Playwright.

Playwright's own browser download is never used (``executable_path`` names the Debian
binary). Where Chromium or Playwright is missing, the browser tests skip saying which.
Screenshots go to ``test-artifacts/console/`` (ignored by git); with
``REPLAYGUARD_UPDATE_DOCS_IMG=1`` the README's two are also copied to ``docs/img/``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import REPO

CHROMIUM = Path(os.environ.get("REPLAYGUARD_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "test-artifacts" / "console"
DOCS_IMG = REPO / "docs" / "img"

try:
    from playwright.async_api import async_playwright
    HAVE_PLAYWRIGHT = True
except ImportError:  # pragma: no cover - the test extra installs it
    HAVE_PLAYWRIGHT = False


@dataclass
class Tab:
    """One browser page and everything it did that a test may assert on."""

    page: Any
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    async def screenshot(self, name: str, docs: bool = False, full_page: bool = False) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=full_page)
        if docs and os.environ.get("REPLAYGUARD_UPDATE_DOCS_IMG") == "1":
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS_IMG / f"{name}.png")
        return path


class HeldResponses:
    """Holds the answers to the first ``count`` requests a page makes to matching URLs: each is
    read from the service when the browser asks (the state of that moment) and reaches the page
    only on ``release()``, so a page load stays in flight while a test changes the service."""

    def __init__(self, count: int = 1) -> None:
        self.count = count
        self.urls: list[str] = []
        self._fetched = asyncio.Event()
        self._released = asyncio.Event()

    def fetched(self) -> bool:
        """Whether every held answer has been read from the service."""
        return self._fetched.is_set()

    def release(self) -> None:
        self._released.set()

    async def handle(self, route: Any) -> None:
        """The route handler (``page.route(pattern, held.handle)``)."""
        if len(self.urls) >= self.count:
            await route.continue_()
            return
        self.urls.append(route.request.url)
        response = await route.fetch()
        if len(self.urls) == self.count:
            self._fetched.set()
        await self._released.wait()
        await route.fulfill(response=response)


async def settle(page: Any) -> None:
    """Lets the page run the tasks already queued (a response that arrived, then what it
    resolves): two turns of its event loop."""
    for _ in range(2):
        await page.evaluate("() => new Promise((resolve) => setTimeout(resolve))")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium, headless, for the whole run."""
    if not HAVE_PLAYWRIGHT:
        pytest.skip("playwright is not installed (pip install '.[test]')")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; scripts/system-deps does)")
    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                                   args=["--no-sandbox", "--disable-gpu"])
        yield instance
        await instance.close()


@pytest_asyncio.fixture
async def tab(browser: Any) -> AsyncIterator[Tab]:
    """A fresh browser context (own sessionStorage) with one page, its requests, dialogs and errors recorded."""
    context = await browser.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
    page = await context.new_page()
    recorded = Tab(page)
    page.on("request", lambda request: recorded.requests.append(request.url))

    async def on_dialog(dialog: Any) -> None:
        recorded.dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)

    def on_console(message: Any) -> None:
        if "Content Security Policy" in message.text:
            recorded.csp_violations.append(message.text)
        elif message.type == "error":
            recorded.console_errors.append(message.text)

    page.on("console", on_console)
    yield recorded
    await context.close()
