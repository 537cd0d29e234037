"""The console attacked as a pentester would, in a real browser: links crafted to reach
what every object inherits, markup put where the page would parse it, a console left
open on a token that was revoked, a menu shown to whoever opens the login page, and a
flood of alerts from a guest.

The identifiers an attacker chooses rendering as text is in ``test_console.py``
(``test_hostile_identifiers_render_as_inert_text``); the headers every answer carries are
in ``tests/api/test_access_control.py`` and ``tests/api/test_console_static.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.api.test_analysts import reuse_alert
from tests.browser.conftest import HeldResponses, Tab, settle
from tests.browser.test_console import WAIT_MS, alerts_list_reads, sign_in
from tests.conftest import Api, uid
from tests.waiting import until

LIST_CAP = 400  # the most alerts the list holds (replayguard/console/alerts.js)


async def raise_alerts(api: Api, count: int) -> list[int]:
    """Raises ``count`` reuse alerts, each on a VM of its own, a few at a time; returns their ids."""
    ids: list[int] = []
    while len(ids) < count:
        batch = min(10, count - len(ids))
        raised = await asyncio.gather(*(reuse_alert(api, uid("guest-vm"), uid("scope")) for _ in range(batch)))
        ids += [int(alert_id) for alert_id, _ in raised]
    return ids


async def listed_ids(page: Any) -> list[int]:
    """The ids of the alert list's rows, top to bottom."""
    ids = await page.locator("#alert-rows tr[data-alert-id]").evaluate_all(
        "(rows) => rows.map((tr) => tr.dataset.alertId)")
    return [int(alert_id) for alert_id in ids]


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


async def test_each_live_alert_adds_its_row_and_leaves_the_listed_rows_alone(api: Api, tab: Tab) -> None:
    """A guest raising alert after alert (its callout token can make reuse after reuse) costs
    the analyst's console one new row per alert: the rows already listed stay as they are,
    not redrawn for every alert, so a flood cannot freeze the list the analyst is reading."""
    page = tab.page
    listed = [(await reuse_alert(api, uid("vm"), uid("scope")))[0] for _ in range(5)]
    await sign_in(tab, api)
    for alert_id in listed:
        await page.locator(f'tr[data-alert-id="{alert_id}"]').wait_for(timeout=WAIT_MS)
    await page.evaluate("""() => {
        const body = document.querySelector("#alert-rows");
        window.__listed = [...body.querySelectorAll("tr[data-alert-id]")];
        window.__added = 0;
        new MutationObserver((records) => {
            for (const record of records) {
                for (const node of record.addedNodes) if (node.dataset?.alertId) window.__added++;
            }
        }).observe(body, { childList: true });
    }""")
    flood = [(await reuse_alert(api, uid("guest-vm"), uid("scope")))[0] for _ in range(5)]
    for alert_id in flood:
        await page.locator(f'tr[data-alert-id="{alert_id}"]').wait_for(timeout=WAIT_MS)
    assert await page.evaluate("() => window.__listed.length") >= len(listed)
    assert await page.evaluate("() => window.__listed.every((tr) => tr.isConnected)"), "listed rows were redrawn"
    assert await page.evaluate("() => window.__added") == len(flood)
    ids = await page.locator("#alert-rows tr").evaluate_all("(rows) => rows.map((tr) => tr.dataset.alertId)")
    assert ids == sorted(ids, key=int, reverse=True) and len(ids) == len(set(ids))
    assert await page.locator("#alert-rows tr.fresh").count() == len(flood)


async def test_an_open_alert_replayed_in_a_loop_is_read_again_one_read_at_a_time(api: Api, tab: Tab) -> None:
    """The alert the analyst has open is replayed again and again (each replay a live change):
    its detail is read again one read at a time, the changes that came meanwhile by one more
    read after it, not one read per change, and the detail ends on the latest state."""
    vm_id, scope = uid("vm"), uid("scope")
    alert_id, nonce = await reuse_alert(api, vm_id, scope)
    page = tab.page
    await sign_in(tab, api)
    await page.evaluate("(id) => { location.hash = '#/alerts/' + encodeURIComponent(id); }", alert_id)
    detail = page.locator("#alert-detail")
    await detail.locator("dt:text-is('count') + dd:text-is('1')").wait_for(timeout=WAIT_MS)

    def detail_reads() -> int:
        return sum(1 for url in tab.requests if url.endswith(f"/v1/alerts/{alert_id}"))

    before = detail_reads()
    held = HeldResponses()
    await page.route(lambda url: url.endswith(f"/v1/alerts/{alert_id}"), held.handle)
    replays = 5
    count = page.locator(f'tr[data-alert-id="{alert_id}"] td.num')
    for seen in range(2, replays + 2):  # each change reaches the console before the next replay
        status, again = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": scope, "nonce": nonce})
        assert status == 200 and str(again["alert_id"]) == str(alert_id)
        await count.filter(has_text=str(seen)).wait_for(timeout=WAIT_MS)
    await until(held.fetched, "the first read again to be made (and held)")
    assert detail_reads() - before == 1, "a read per change"
    async with page.expect_event("requestfinished", lambda r: r.url == held.urls[0]):
        held.release()
    await until(lambda: detail_reads() - before >= 2, "one read after it, for the changes meanwhile")
    await detail.locator(f"dt:text-is('count') + dd:text-is('{replays + 1}')").wait_for(timeout=WAIT_MS)
    await settle(page)
    assert detail_reads() - before == 2


async def test_the_menu_shows_only_while_logged_in(api: Api, tab: Tab) -> None:
    """The menu (Alerts, VMs, Ledger) is not shown on the login page, neither before logging in
    nor after logging out: the stylesheet's layout of the menu does not undo its ``hidden``."""
    page = tab.page
    links = page.locator("#nav, #nav a, #logout")
    await page.goto(str(api.client.make_url("/console/")))
    await page.locator("#token").wait_for(timeout=WAIT_MS)
    assert [await link.is_visible() for link in await links.all()] == [False] * 6
    await sign_in(tab, api)
    assert [await link.is_visible() for link in await links.all()] == [True, True, True, True, False, True]
    await page.locator("#logout").click()
    await page.locator("#token").wait_for(timeout=WAIT_MS)
    assert [await link.is_visible() for link in await links.all()] == [False] * 6


async def test_a_flood_of_live_alerts_keeps_the_list_within_its_cap_and_older_pages_reachable(
        api: Api, tab: Tab) -> None:
    """A guest raising more live alerts than the list holds leaves the analyst's list at its cap,
    showing the newest; "Older alerts" still reaches every alert (those pushed out included),
    the list never beyond its cap, and "Newer alerts" goes back to the newest."""
    page = tab.page
    earlier = await raise_alerts(api, 150)  # a first page (100) and one more below it
    await sign_in(tab, api)
    await page.locator("#more:not([hidden])").wait_for(timeout=WAIT_MS)
    await page.evaluate("""() => {
        const body = document.querySelector("#alert-rows");
        window.__most = 0;
        new MutationObserver(() => {
            window.__most = Math.max(window.__most, body.querySelectorAll("tr[data-alert-id]").length);
        }).observe(body, { childList: true });
    }""")
    flood = await raise_alerts(api, LIST_CAP + 1)
    newest = max(flood)
    everything = sorted(earlier + flood, reverse=True)

    async def lists_the_newest() -> bool:
        return set(everything[:LIST_CAP]) <= set(await listed_ids(page))

    await until(lists_the_newest, "the newest alerts to be listed live", timeout=WAIT_MS / 1000)
    ids = await listed_ids(page)
    assert ids == everything[:LIST_CAP], "the list does not hold the newest alerts, at most its cap"
    assert await page.evaluate("() => window.__most") == LIST_CAP
    assert await page.locator("#newer").is_hidden() and await page.locator("#more").is_visible()

    seen = set(ids)
    for _ in range(len(everything) // 100 + 2):  # every page, and a click to spare
        if await page.locator("#more").is_hidden():
            break
        await page.locator("#more").click()  # the list is busy (aria-busy) from the click until it is drawn
        await page.locator('#alert-rows[aria-busy="false"]').wait_for(state="attached", timeout=WAIT_MS)
        ids = await listed_ids(page)
        assert len(ids) <= LIST_CAP and ids == sorted(set(ids), reverse=True)
        seen |= set(ids)
    assert await page.locator("#more").is_hidden(), "older alerts are still not listed"
    assert seen == set(everything), f"alerts never listed: {sorted(set(everything) - seen)}"
    assert ids[-1] == min(everything) and await page.locator("#newer").is_visible()

    await page.locator("#newer").click()
    await page.locator("#newer[hidden]").wait_for(state="attached", timeout=WAIT_MS)
    assert (await listed_ids(page))[0] == newest


async def test_a_flood_while_the_list_loads_is_not_kept_for_it_beyond_the_cap(api: Api, tab: Tab) -> None:
    """More live alerts than the list holds, arriving while a page of the list is loading, are not
    all kept to go on top of that page: when it lands the page is read again, and the list holds
    the newest page."""
    page = tab.page
    await sign_in(tab, api)
    held = HeldResponses()
    await page.route(lambda url: "/v1/alerts?" in url, held.handle)
    reads_before = alerts_list_reads(tab)
    await page.locator("#apply").click()
    await until(held.fetched, "the list's page to be read (and held)")
    flood = sorted(await raise_alerts(api, LIST_CAP + 1), reverse=True)

    async def lists_the_newest() -> bool:
        return set(flood[:LIST_CAP]) <= set(await listed_ids(page))

    await until(lists_the_newest, "the flood to be listed live", timeout=WAIT_MS / 1000)
    held.release()
    await until(lambda: alerts_list_reads(tab) >= reads_before + 2, "the page to be read again")
    await page.locator('#alert-rows[aria-busy="false"]').wait_for(state="attached", timeout=WAIT_MS)
    assert await listed_ids(page) == flood[:100]
    assert alerts_list_reads(tab) == reads_before + 2
