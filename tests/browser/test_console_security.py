"""The console attacked as a pentester would, in a real browser: links crafted to reach
what every object inherits, markup put where the page would parse it, and a console left
open on a token that was revoked.

The identifiers an attacker chooses rendering as text is in ``test_console.py``
(``test_hostile_identifiers_render_as_inert_text``); the headers every answer carries are
in ``tests/api/test_access_control.py`` and ``tests/api/test_console_static.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.browser.conftest import Tab
from tests.browser.test_console import WAIT_MS, sign_in
from tests.conftest import Api, uid


@pytest.mark.parametrize("name", ["constructor", "__proto__", "toString", "hasOwnProperty"])
async def test_a_link_named_after_what_every_object_inherits_opens_the_alerts_page(
        api: Api, tab: Tab, name: str) -> None:
    """``#/constructor`` (or another name every object inherits) is no page of the console:
    it opens the alerts list, as any unknown name does, not an error."""
    page = tab.page
    await sign_in(tab, api)
    await page.evaluate("() => { location.hash = '#/vms'; }")
    await page.locator("#vm-rows").wait_for(state="attached", timeout=WAIT_MS)
    await page.evaluate("(h) => { location.hash = h; }", f"#/{name}")
    await page.locator("#alert-rows, main .error").first.wait_for(state="attached", timeout=WAIT_MS)
    assert await page.locator("main .error").all_inner_texts() == []
    assert await page.locator("#alert-rows").count() == 1
    assert await page.locator("#nav a.active").get_attribute("data-page") == "alerts"
    assert tab.console_errors == [] and tab.csp_violations == []


async def test_the_page_refuses_to_parse_strings_as_html(api: Api, tab: Tab) -> None:
    """Trusted Types are required: a string given to ``innerHTML`` or ``document.write`` (as a
    module that forgot the rule, or a library, would) is refused by the browser, not parsed."""
    page = tab.page
    await sign_in(tab, api)
    outcome = await page.evaluate("""() => {
        const tried = {};
        const attempts = {
            innerHTML: () => { document.createElement("div").innerHTML = "<img src=x>"; },
            insertAdjacentHTML: () => { document.body.insertAdjacentHTML("beforeend", "<img src=x>"); },
            outerHTML: () => { document.querySelector("#main").firstChild.outerHTML = "<img src=x>"; },
            scriptText: () => { document.createElement("script").textContent = "window.__pwned = 1"; },
        };
        for (const [name, attempt] of Object.entries(attempts)) {
            try { attempt(); tried[name] = "parsed"; } catch (error) { tried[name] = error.name; }
        }
        return tried;
    }""")
    assert outcome == {"innerHTML": "TypeError", "insertAdjacentHTML": "TypeError", "outerHTML": "TypeError",
                       "scriptText": "TypeError"}
    assert await page.locator("main img").count() == 0


async def test_a_console_whose_token_is_revoked_forgets_it_and_what_it_showed(
        api_factory: Callable[..., Awaitable[Api]], tab: Tab) -> None:
    """Revoking the analyst's token (a stolen laptop, a leaver) ends the console left open on
    it: the stream is refused, and the console forgets the token and clears the alerts it
    showed, saying why, without the analyst clicking anything."""
    api = await api_factory(sse_heartbeat_s=1)
    token_id, token = await api.runtime.api_tokens.create("analyst", uid("soc-leaver"))
    api.tokens["analyst"] = token
    await sign_in(tab, api)
    page = tab.page
    assert await page.evaluate("() => sessionStorage.length") == 2
    await api.runtime.api_tokens.revoke(token_id)
    await page.locator("#login-message", has_text="no longer accepts").wait_for(timeout=WAIT_MS)
    assert await page.locator("#alert-rows").count() == 0
    assert await page.locator("#logout").is_hidden()
    assert await page.evaluate("() => sessionStorage.length") == 0
