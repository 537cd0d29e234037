"""The analysts' console in a real browser (Debian's Chromium through Playwright).

The demo's snapshot-replay story is played through the API while an analyst watches the
console: the alert arrives live over the stream, the analyst opens it, follows it to the
VM's timeline where the rollback window is shaded, and acknowledges it. Hostile
identifiers render as inert text, and the token never appears in a URL or in the
service's log.
"""

from __future__ import annotations

import asyncio
import io
import secrets
from typing import Any

import asyncpg
import pytest

from replayguard.core import stream_ids
from replayguard.http.state import ANALYSTS
from replayguard.settings import Secret
from tests.api.test_analysts import reuse_alert
from tests.api.test_rollback_attack import alice, event, login
from tests.browser.conftest import HeldResponses, Tab, settle
from tests.conftest import Api, uid
from tests.integration.db_restore import restore, scratch_dbs, settled, snapshot
from tests.integration.test_alert_stream import drop_streams_and_refuse_new, ledger_rollback_noticed
from tests.waiting import until

__all__ = ["scratch_dbs"]  # a fixture

WAIT_MS = 20_000


async def sign_in(tab: Tab, api: Api, role: str = "analyst") -> None:
    """Opens the console and logs in by pasting the role's token."""
    page = tab.page
    await page.goto(str(api.client.make_url("/console/")))
    await page.locator("#token").fill(api.tokens[role])
    await page.locator("#login").click()
    await page.locator("#alert-rows").wait_for(timeout=WAIT_MS)
    await page.locator('#live[data-state="live"]').wait_for(timeout=WAIT_MS)


def alerts_list_reads(tab: Tab) -> int:
    return sum(1 for url in tab.requests if "/v1/alerts?" in url)


async def play_the_story(api: Api) -> tuple[str, str, str]:
    """The demo's attack on a fake clock: snapshot, login, revert, replay. Returns (vm, principal, alert id)."""
    vm_id = uid("web-01")
    principal, totp = await alice(api)
    await event(api, vm_id, "vm.started")
    api.clock.advance(90)
    await event(api, vm_id, "snapshot.created", snapshot_id="nightly", snapshot_created_at=api.clock.now)
    for _ in range(3):  # ordinary traffic on the VM before the attack
        api.clock.advance(60)
        _status, body = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "api-login",
                                                              "nonce": secrets.token_hex(8)})
        assert body["decision"] == "accept"
    api.clock.advance(40)
    code = totp.at(api.clock.now)
    assert (await login(api, vm_id, principal, code))["decision"] == "accept"
    api.clock.advance(12)
    await event(api, vm_id, "snapshot.reverted", snapshot_id="nightly")
    api.clock.advance(12)
    replay = await login(api, vm_id, principal, code)
    assert replay["reason"] == "replay_after_rollback"
    return vm_id, principal, str(replay["alert_id"])


async def test_the_snapshot_replay_story_live_in_the_console(api: Api, tab: Tab, log_buffer: io.StringIO) -> None:
    """The replay alert appears live, its detail and the VM's
    timeline show the window, and the analyst acknowledges it."""
    page = tab.page
    for vm_id in (uid("db-02"), uid("build-07")):  # earlier, unrelated alerts already in the list
        body = {"vm_id": vm_id, "scope": "api-login", "nonce": secrets.token_hex(8)}
        await api.post("/v1/nonces/consume", body)
        await api.post("/v1/nonces/consume", body)
        api.clock.advance(300)
    await sign_in(tab, api)
    reads_before = alerts_list_reads(tab)
    vm_id, principal, alert_id = await play_the_story(api)

    row = page.locator(f'tr[data-alert-id="{alert_id}"]')
    await row.wait_for(timeout=WAIT_MS)  # through the stream: the list was not read again
    assert alerts_list_reads(tab) == reads_before
    assert "replay_after_rollback" in await row.inner_text()

    await row.click()
    detail = page.locator("#alert-detail")
    await detail.locator("h2", has_text=f"Alert {alert_id}").wait_for(timeout=WAIT_MS)
    await detail.locator(".window-row").first.wait_for(timeout=WAIT_MS)
    assert "snapshot.reverted" in await detail.inner_text()
    assert principal in await detail.inner_text()
    await tab.screenshot("console-alerts", docs=True, full_page=True)

    await detail.locator("dd a", has_text=vm_id).click()
    timeline = page.locator("#timeline svg.timeline")
    await timeline.locator("rect.window").first.wait_for(timeout=WAIT_MS)
    assert await timeline.locator("path.ev-rollback").count() == 1
    assert await timeline.locator("circle.dec-accept").count() == 4
    assert await timeline.locator("circle.dec-reject").count() == 1
    assert await timeline.locator("path.al-critical").count() == 1
    assert await page.locator("#vm-name").inner_text() == vm_id
    await tab.screenshot("console-timeline", docs=True)

    await page.go_back()
    await detail.locator("#ack-note").fill("Confirmed snapshot replay; web-01 isolated (ticket 4411)")
    await detail.locator("#ack").click()
    await detail.locator("#acked").wait_for(timeout=WAIT_MS)
    _status, alert = await api.get(f"/v1/alerts/{alert_id}")
    assert alert["status"] == "acknowledged" and "ticket 4411" in alert["acknowledged"]["note"]
    await tab.screenshot("console-acknowledged")

    for token in api.tokens.values():
        assert not [url for url in tab.requests if token in url], "a token went into a URL"
        assert token not in log_buffer.getvalue(), "a token reached the service's log"
    assert '"route": "/console/{name}"' in log_buffer.getvalue() or '"route":"/console/{name}"' in log_buffer.getvalue()
    assert tab.dialogs == [] and tab.csp_violations == [] and tab.console_errors == []


async def test_an_alert_raised_while_the_stream_was_down_shows_after_it_reconnects(
        api: Api, tab: Tab, monkeypatch: pytest.MonkeyPatch) -> None:
    """An alert raised while the console's stream is reconnecting appears in the list once the
    stream is back, even when the stream had not delivered any event before it dropped."""
    page = tab.page
    await sign_in(tab, api)
    feed = api.client.app[ANALYSTS].feed
    drop_streams_and_refuse_new(feed, monkeypatch)
    await page.locator('#live[data-state="reconnecting"]').wait_for(timeout=WAIT_MS)

    alert_id, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    _, alert = await api.get(f"/v1/alerts/{alert_id}")
    await until(lambda: (feed._pos or 0) >= alert["change"], "the feed to pass the new alert")

    monkeypatch.undo()
    await page.locator('#live[data-state="live"]').wait_for(timeout=WAIT_MS)
    await page.locator(f'tr[data-alert-id="{alert_id}"]').wait_for(timeout=WAIT_MS)


async def test_a_resume_refused_for_its_last_event_id_opens_the_stream_afresh(
        api: Api, tab: Tab, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the service refuses the console's resume with 400 for its Last-Event-ID (an id it
    cannot parse: here every id, as a service of another version might), the console does
    not retry that id: it opens the stream without one, reads its list again and shows the
    alerts raised after, live."""
    page = tab.page
    await sign_in(tab, api)
    resumes: list[str | None] = []
    page.on("request", lambda request: resumes.append(request.headers.get("last-event-id"))
            if "/v1/alerts/stream" in request.url else None)

    def unparsable(raw: str) -> Any:
        raise ValueError(raw)

    monkeypatch.setattr(stream_ids, "parse", unparsable)
    reads_before = alerts_list_reads(tab)
    api.client.app[ANALYSTS].feed.streams.close()
    await page.locator('#live[data-state="reconnecting"]').wait_for(timeout=WAIT_MS)
    await page.locator('#live[data-state="live"]').wait_for(timeout=WAIT_MS)
    await until(lambda: alerts_list_reads(tab) > reads_before, "the list to be read again")
    assert resumes[0] is not None and resumes[-1] is None, resumes
    assert resumes.count(resumes[0]) == 1, resumes  # the refused id was sent once
    alert_id, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    await page.locator(f'tr[data-alert-id="{alert_id}"]').wait_for(timeout=WAIT_MS)
    # the browser reports the refused request itself; nothing else went wrong on the page
    assert all("400" in error for error in tab.console_errors), tab.console_errors


async def listed_past_a_copy(api: Api, tab: Tab, database_url: str,
                             scratch_dbs: list[str]) -> tuple[str, str, list[str]]:
    """Signed in, one alert raised (``kept``), a copy of the database made, then three more
    raised and listed live (``lost`` to a restore of the copy): kept, the copy, lost."""
    await sign_in(tab, api)
    kept, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    scratch_dbs.append(copy := await snapshot(database_url))
    lost = [(await reuse_alert(api, uid("vm"), uid("scope")))[0] for _ in range(3)]
    for alert_id in lost:
        await tab.page.locator(f'tr[data-alert-id="{alert_id}"]').wait_for(timeout=WAIT_MS)
    return kept, copy, lost


async def lists_what_the_database_holds(api: Api, page: Any) -> bool:
    """Whether the alert list shows, row for row, the alerts (id and kind) the service lists:
    after a restore the continuity guard's alerts may take any of the lost alerts' ids."""
    shown = await page.locator("#alert-rows tr").evaluate_all(
        "rows => rows.map((r) => [r.dataset.alertId, r.querySelector('td.kind')?.textContent])")
    listed = (await api.get("/v1/alerts?limit=100"))[1]["items"]
    return bool(shown == [[a["id"], a["kind"]] for a in listed])


async def test_the_list_follows_the_database_back_and_shows_an_alert_raised_under_an_id_given_out_again(
        api_factory: Any, database_url: str, scratch_dbs: list[str], tab: Tab) -> None:
    """The database goes back to a copy without the last three alerts the console listed live;
    the ``ledger_rollback`` alert raised on it takes one of their ids again, at a change
    number the console already saw for that id. The stream goes back (an ``id:`` lower than
    it sent) and the console goes back with it: the list shows what the restored database
    holds, the ``ledger_rollback`` alert in the place of the lost one, not the lost alerts."""
    api: Api = await api_factory(database_url=Secret(database_url))
    page = tab.page
    kept, copy, lost = await listed_past_a_copy(api, tab, database_url, scratch_dbs)
    await restore(database_url, copy, scratch_dbs)
    listed = await ledger_rollback_noticed(api)
    assert listed["id"] in lost  # an id the console listed for a lost alert
    await page.locator(f'tr[data-alert-id="{listed["id"]}"]:has-text("ledger_rollback")').wait_for(timeout=WAIT_MS)
    await page.locator(f'tr[data-alert-id="{kept}"]').wait_for(timeout=WAIT_MS)
    await until(lambda: lists_what_the_database_holds(api, page), "the list to show what the restored database holds")


async def test_a_stream_resumed_past_a_database_that_went_back_reads_the_list_again(
        api_factory: Any, database_url: str, scratch_dbs: list[str], tab: Tab, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream is down while the database goes back to a copy without the last three alerts
    the console listed, and the restored database numbers its changes past the position the
    console resumes from. The restored database does not hold the change that id names as
    the console got it, so the resumed stream goes back to the start (an ``id: 0`` frame) and
    the console reads its list again: it shows what the restored database holds, not the lost
    alerts."""
    api: Api = await api_factory(database_url=Secret(database_url))
    page = tab.page
    kept, copy, lost = await listed_past_a_copy(api, tab, database_url, scratch_dbs)
    high = max([(await api.get(f"/v1/alerts/{alert_id}"))[1]["change"] for alert_id in lost])
    drop_streams_and_refuse_new(api.client.app[ANALYSTS].feed, monkeypatch)
    await page.locator('#live[data-state="reconnecting"]').wait_for(timeout=WAIT_MS)
    await restore(database_url, copy, scratch_dbs)
    conn = await asyncpg.connect(database_url)
    try:  # each update of an alert takes the next change number (rg_alert_changed)
        while await conn.fetchval("SELECT max(change_seq) FROM alerts") <= high:
            await conn.execute("UPDATE alerts SET updated_us = updated_us WHERE id = $1", int(kept))
    finally:
        await conn.close()
    await settled(lambda: api.get("/v1/alerts?limit=1"))  # the service's connections to the old database are gone
    monkeypatch.undo()
    await page.locator('#live[data-state="live"]').wait_for(timeout=WAIT_MS)
    await page.locator(f'tr[data-alert-id="{kept}"]').wait_for(timeout=WAIT_MS)
    await until(lambda: lists_what_the_database_holds(api, page), "the list to show what the restored database holds")


async def test_a_stream_resumed_after_a_restore_that_looks_like_an_alert_changed_again_reads_the_list_again(
        api_factory: Any, database_url: str, scratch_dbs: list[str], tab: Tab, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a resume cannot tell (docs/api.md): the console's last id names an alert held in
    a copy of the database (acknowledged after the copy, past three alerts the copy lacks);
    while the stream is down the database goes back to that copy and changes that alert
    again past the id, leaving no alert at the id's change number. The service takes it for
    an alert that changed again and goes on after the id, with no ``0`` frame; the console
    reads its list again as the stream opens again: it shows what the restored database
    holds, not the lost alerts."""
    api: Api = await api_factory(database_url=Secret(database_url))
    page = tab.page
    kept, copy, _ = await listed_past_a_copy(api, tab, database_url, scratch_dbs)
    assert (await api.post(f"/v1/alerts/{kept}/acknowledge", {"note": "seen"}, role="analyst"))[0] == 200
    await page.locator(f'tr[data-alert-id="{kept}"]:has-text("acknowledged")').wait_for(timeout=WAIT_MS)
    high = (await api.get(f"/v1/alerts/{kept}"))[1]["change"]  # the console's last id names it
    drop_streams_and_refuse_new(api.client.app[ANALYSTS].feed, monkeypatch)
    await page.locator('#live[data-state="reconnecting"]').wait_for(timeout=WAIT_MS)
    await restore(database_url, copy, scratch_dbs)
    conn = await asyncpg.connect(database_url)
    try:  # each update of an alert takes the next change number (rg_alert_changed)
        while True:
            at = await conn.fetchval("SELECT id FROM alerts WHERE change_seq = $1", high)
            if at is None and await conn.fetchval("SELECT change_seq FROM alerts WHERE id = $1", int(kept)) > high:
                break
            await conn.execute("UPDATE alerts SET updated_us = updated_us WHERE id = $1",
                               int(kept) if at is None else at)
    finally:
        await conn.close()
    await settled(lambda: api.get("/v1/alerts?limit=1"))  # the service's connections to the old database are gone
    listed = {a["id"]: a for a in (await api.get("/v1/alerts?limit=100"))[1]["items"]}
    assert listed[kept]["status"] == "open"  # the copy's state, changed past the console's id
    monkeypatch.undo()
    await page.locator('#live[data-state="live"]').wait_for(timeout=WAIT_MS)
    await until(lambda: lists_what_the_database_holds(api, page), "the list to show what the restored database holds")


async def test_an_older_alert_updated_live_is_listed_once_after_older_alerts(api: Api, tab: Tab) -> None:
    """An alert beyond the loaded pages that changes (here: acknowledged) while the list is open is
    listed once, in its place and current, when the analyst loads the older alerts."""
    oldest, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    for _ in range(100):  # a full first page (100) of newer alerts
        await reuse_alert(api, uid("vm"), uid("scope"))
    page = tab.page
    await sign_in(tab, api)
    rows = page.locator("#alert-rows")
    assert await rows.locator(f'tr[data-alert-id="{oldest}"]').count() == 0  # not on the first page

    status, _ = await api.post(f"/v1/alerts/{oldest}/acknowledge", {"note": "seen"}, role="analyst")
    assert status == 200
    newest, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    await rows.locator(f'tr[data-alert-id="{newest}"]').wait_for(timeout=WAIT_MS)  # the stream is past the ack
    assert await rows.locator(f'tr[data-alert-id="{oldest}"]').count() == 0  # its page is not loaded yet

    await page.locator("#more").click()
    await page.locator("#more[hidden]").wait_for(state="attached", timeout=WAIT_MS)  # every page loaded
    oldest_rows = rows.locator(f'tr[data-alert-id="{oldest}"]')
    assert await oldest_rows.count() == 1
    assert "acknowledged" in await oldest_rows.inner_text()
    ids = [await r.get_attribute("data-alert-id") for r in await rows.locator("tr").all()]
    assert ids == sorted(ids, key=int, reverse=True) and len(ids) == 102


async def test_an_alert_acknowledged_live_leaves_the_list_filtered_to_open_alerts(api: Api, tab: Tab) -> None:
    """With the list filtered to ``status=open``, an alert acknowledged elsewhere (by a
    colleague, or from the CLI) leaves the list when its change arrives on the stream: a live
    change is checked against the filter again, so the list shows only what its filter says."""
    alert_id, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    seen, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    status, _ = await api.post(f"/v1/alerts/{seen}/acknowledge", {"note": "before"}, role="analyst")
    assert status == 200
    page = tab.page
    await sign_in(tab, api)
    await page.locator(f'tr[data-alert-id="{seen}"]').wait_for(timeout=WAIT_MS)
    await page.locator("#f-status").select_option("open")
    await page.locator("#apply").click()
    # the filtered page is in once the acknowledged alert has left the list
    await page.locator(f'tr[data-alert-id="{seen}"]').wait_for(state="detached", timeout=WAIT_MS)
    row = page.locator(f'tr[data-alert-id="{alert_id}"]')
    await row.wait_for(timeout=WAIT_MS)

    status, _ = await api.post(f"/v1/alerts/{alert_id}/acknowledge", {"note": "seen"}, role="analyst")
    assert status == 200
    newest, _ = await reuse_alert(api, uid("vm"), uid("scope"))  # an open alert, after the ack on the stream
    await page.locator(f'tr[data-alert-id="{newest}"]').wait_for(timeout=WAIT_MS)
    shown = await row.inner_text() if await row.count() else None
    assert shown is None, f"the list filtered to open alerts shows an acknowledged one: {shown!r}"


async def test_live_changes_during_a_page_load_survive_the_page(api: Api, tab: Tab) -> None:
    """A new alert and an acknowledgement that arrive on the stream while a page of the list is
    loading stay in the list once that page, read before them, lands: they are applied on top."""
    before, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    status, _ = await api.post(f"/v1/alerts/{before}/acknowledge", {"note": "before"}, role="analyst")
    assert status == 200
    acked_live, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    page = tab.page
    await sign_in(tab, api)
    rows = page.locator("#alert-rows")
    await rows.locator(f'tr[data-alert-id="{acked_live}"]').wait_for(timeout=WAIT_MS)
    await rows.locator(f'tr[data-alert-id="{before}"]').wait_for(timeout=WAIT_MS)

    held = HeldResponses()
    await page.route(lambda url: "/v1/alerts?" in url, held.handle)
    await page.locator("#f-status").select_option("open")
    await page.locator("#apply").click()
    await until(held.fetched, "the filtered page to be read (and held)")

    status, _ = await api.post(f"/v1/alerts/{acked_live}/acknowledge", {"note": "colleague"}, role="analyst")
    assert status == 200
    newest, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    await rows.locator(f'tr[data-alert-id="{newest}"]').wait_for(timeout=WAIT_MS)  # on the stream, mid-load
    await rows.locator(f'tr[data-alert-id="{acked_live}"]').wait_for(state="detached", timeout=WAIT_MS)

    held.release()
    # the filtered page has landed once the alert acknowledged before it left the list
    await rows.locator(f'tr[data-alert-id="{before}"]').wait_for(state="detached", timeout=WAIT_MS)
    ids = [await r.get_attribute("data-alert-id") for r in await rows.locator("tr").all()]
    assert newest in ids, f"the alert raised during the load is gone from the list: {ids}"
    assert acked_live not in ids, f"the alert acknowledged during the load is listed as open again: {ids}"


async def test_an_acknowledgement_during_the_older_alerts_load_survives_it(api: Api, tab: Tab) -> None:
    """An alert on the page "Older alerts" is loading, acknowledged on the stream while that
    page (read before the acknowledgement) is in flight, is listed acknowledged once it lands."""
    oldest, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    for _ in range(100):  # a full first page (100) of newer alerts
        await reuse_alert(api, uid("vm"), uid("scope"))
    page = tab.page
    await sign_in(tab, api)
    rows = page.locator("#alert-rows")
    await page.locator("#more:not([hidden])").wait_for(timeout=WAIT_MS)

    held = HeldResponses()
    await page.route(lambda url: "/v1/alerts?" in url and "cursor=" in url, held.handle)
    await page.locator("#more").click()
    await until(held.fetched, "the older page to be read (and held)")
    status, _ = await api.post(f"/v1/alerts/{oldest}/acknowledge", {"note": "colleague"}, role="analyst")
    assert status == 200
    newest, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    await rows.locator(f'tr[data-alert-id="{newest}"]').wait_for(timeout=WAIT_MS)  # the stream is past the ack

    held.release()
    await page.locator("#more[hidden]").wait_for(state="attached", timeout=WAIT_MS)  # the older page landed
    oldest_rows = rows.locator(f'tr[data-alert-id="{oldest}"]')
    assert await oldest_rows.count() == 1
    assert "acknowledged" in await oldest_rows.inner_text(), "the older page put back the state before the ack"


async def test_an_alert_detail_read_before_a_live_change_does_not_replace_the_newer_one(
        api: Api, tab: Tab) -> None:
    """The open alert's detail, read before a colleague acknowledges it but landing after the
    detail read once the acknowledgement arrived, does not put the Acknowledge button back."""
    alert_id, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    page = tab.page
    await sign_in(tab, api)
    held = HeldResponses()
    await page.route(lambda url: url.endswith(f"/v1/alerts/{alert_id}"), held.handle)
    await page.evaluate("(id) => { location.hash = '#/alerts/' + encodeURIComponent(id); }", alert_id)
    await until(held.fetched, "the alert's detail to be read (and held)")

    status, _ = await api.post(f"/v1/alerts/{alert_id}/acknowledge", {"note": "colleague"}, role="analyst")
    assert status == 200
    detail = page.locator("#alert-detail")
    await detail.locator("#acked").wait_for(timeout=WAIT_MS)  # read again after the change on the stream

    async with page.expect_event("requestfinished", lambda r: r.url == held.urls[0]):
        held.release()
    await settle(page)
    assert await detail.locator("#ack").count() == 0, "the detail read before the acknowledgement replaced it"
    assert await detail.locator("#acked").count() == 1


async def test_a_timeline_read_before_a_live_alert_does_not_replace_the_newer_one(api: Api, tab: Tab) -> None:
    """A VM's timeline read before an alert on that VM, landing after the timeline read once the
    alert arrived on the stream, does not take the alert off the picture."""
    vm_id = uid("vm")
    await reuse_alert(api, vm_id, uid("scope"))
    page = tab.page
    await sign_in(tab, api)
    held = HeldResponses()
    await page.route(lambda url: "/timeline?" in url, held.handle)
    await page.evaluate("(vm) => { location.hash = '#/vms/' + encodeURIComponent(vm); }", vm_id)
    await until(held.fetched, "the timeline to be read (and held)")

    await reuse_alert(api, vm_id, uid("scope"))
    timeline = page.locator("#timeline svg.timeline")
    await timeline.locator("path.al").nth(1).wait_for(timeout=WAIT_MS)  # read again after the alert

    async with page.expect_event("requestfinished", lambda r: r.url == held.urls[0]):
        held.release()
    await settle(page)
    assert await timeline.locator("path.al").count() == 2, "the timeline read before the alert replaced it"
    assert (await page.locator("#timeline-rows tr").count()) == 4


async def test_a_live_change_to_the_open_alert_keeps_the_note_being_typed(api: Api, tab: Tab) -> None:
    """The open alert happens again (a live change) while the analyst is typing the note to
    acknowledge it: its detail is read again and the note is still in the box."""
    vm_id, scope = uid("vm"), uid("scope")
    alert_id, nonce = await reuse_alert(api, vm_id, scope)
    page = tab.page
    await sign_in(tab, api)
    await page.evaluate("(id) => { location.hash = '#/alerts/' + encodeURIComponent(id); }", alert_id)
    detail = page.locator("#alert-detail")
    await detail.locator("#ack-note").fill("checking with the VM owner")
    status, again = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": scope, "nonce": nonce})
    assert status == 200 and str(again["alert_id"]) == str(alert_id)
    await detail.locator("dt:text-is('count') + dd:text-is('2')").wait_for(timeout=WAIT_MS)  # read again
    assert await detail.locator("#ack-note").input_value() == "checking with the VM owner"


async def test_an_acknowledgement_the_service_refused_can_be_sent_again(api: Api, tab: Tab) -> None:
    """An acknowledgement answered with an error (here a 503) says why and leaves the
    Acknowledge button usable, the note kept, so the analyst can send it again."""
    alert_id, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    page = tab.page
    await sign_in(tab, api)

    async def unavailable(route: Any) -> None:
        await route.fulfill(status=503, json={"error": {"code": "ledger_unavailable",
                                                        "message": "the ledger is unavailable"}})

    def acknowledging(url: str) -> bool:
        return url.endswith("/acknowledge")

    await page.route(acknowledging, unavailable)
    await page.evaluate("(id) => { location.hash = '#/alerts/' + encodeURIComponent(id); }", alert_id)
    detail = page.locator("#alert-detail")
    await detail.locator("#ack-note").fill("isolated")
    await detail.locator("#ack").click()
    await detail.locator(".error", has_text="the ledger is unavailable").wait_for(timeout=WAIT_MS)
    assert await detail.locator("#ack").is_enabled(), "the Acknowledge button stayed disabled after the error"
    await page.unroute(acknowledging, unavailable)
    await detail.locator("#ack").click()
    await detail.locator("#acked", has_text="isolated").wait_for(timeout=WAIT_MS)


async def test_a_live_change_while_acknowledging_does_not_offer_the_acknowledgement_again(
        api: Api, tab: Tab) -> None:
    """The alert changes live (it happens again) while its acknowledgement is on its way (held
    before it reaches the service): the detail read again keeps Acknowledge disabled, and the
    alert is acknowledged, and ledgered, once."""
    vm_id, scope = uid("vm"), uid("scope")
    alert_id, nonce = await reuse_alert(api, vm_id, scope)
    page = tab.page
    await sign_in(tab, api)
    sent: list[str] = []
    release = asyncio.Event()

    async def hold(route: Any) -> None:
        sent.append(route.request.url)
        await release.wait()
        await route.continue_()

    await page.route(lambda url: url.endswith("/acknowledge"), hold)
    await page.evaluate("(id) => { location.hash = '#/alerts/' + encodeURIComponent(id); }", alert_id)
    detail = page.locator("#alert-detail")
    await detail.locator("#ack-note").fill("isolated")
    await detail.locator("#ack").click()
    await until(lambda: bool(sent), "the acknowledgement to be sent (and held)")
    status, again = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": scope, "nonce": nonce})
    assert status == 200 and str(again["alert_id"]) == str(alert_id)
    await detail.locator("dt:text-is('count') + dd:text-is('2')").wait_for(timeout=WAIT_MS)  # read again
    assert await detail.locator("#ack").is_disabled(), "Acknowledge is offered again while it is on its way"
    release.set()
    await detail.locator("#acked", has_text="isolated").wait_for(timeout=WAIT_MS)
    assert len(sent) == 1
    async with api.runtime.pool.acquire() as conn:
        acks = await conn.fetchval("SELECT count(*) FROM ledger WHERE kind = 'alert_ack'"
                                   " AND payload->>'alert_id' = $1", str(alert_id))
    assert acks == 1


HOSTILE_VM = '<script>window.__pwned = "vm"</script>'
HOSTILE_PRINCIPAL = '"><img src=x onerror="window.__pwned = \'principal\'">'
RTL_VM = "invoice-\u05e9\u05dc\u05d5\u05dd-<b>gnp.exe</b>"


async def hostile_alerts(api: Api) -> list[str]:
    """Reuse alerts whose VM and principal (a nonce scope) are markup, and one with RTL text."""
    ids = []
    for vm_id, scope in ((HOSTILE_VM, HOSTILE_PRINCIPAL), (RTL_VM, HOSTILE_VM)):
        body = {"vm_id": vm_id, "scope": scope, "nonce": secrets.token_hex(8)}
        await api.post("/v1/nonces/consume", body)
        status, second = await api.post("/v1/nonces/consume", body)
        assert second["reason"] == "reused", second
        ids.append(str(second["alert_id"]))
    evt = {"event_id": '<img src=x onerror="window.__pwned=\'event\'">', "type": "snapshot.reverted",
           "vm_id": HOSTILE_VM, "snapshot_id": "<svg onload=alert(1)>", "snapshot_created_at": api.clock.now - 30,
           "occurred_at": api.clock.now}
    status, _ = await api.post("/v1/hypervisor/events", evt, role="hypervisor")
    assert status == 202
    await api.enroll(HOSTILE_PRINCIPAL)
    status, _ = await api.post(f"/v1/alerts/{ids[0]}/acknowledge",
                               {"note": '<img src=x onerror="window.__pwned=\'note\'">'}, role="analyst")
    assert status == 200
    return ids


async def assert_inert(tab: Tab) -> None:
    page = tab.page
    assert await page.evaluate("() => window.__pwned === undefined"), "hostile markup ran"
    assert await page.locator("main img, main script, main b, main iframe").count() == 0
    assert tab.dialogs == [] and tab.csp_violations == []


async def test_hostile_identifiers_render_as_inert_text(api: Api, tab: Tab) -> None:
    """Markup and right-to-left text in VM ids, principals, event ids and notes are shown as text, never run."""
    first, _second = await hostile_alerts(api)
    page = tab.page
    await sign_in(tab, api, role="admin")
    rows = page.locator("#alert-rows")
    await rows.locator(f'tr[data-alert-id="{first}"]').wait_for(timeout=WAIT_MS)
    assert HOSTILE_VM in await rows.inner_text() and HOSTILE_PRINCIPAL in await rows.inner_text()
    assert RTL_VM in await rows.inner_text()
    await assert_inert(tab)

    await rows.locator(f'tr[data-alert-id="{first}"]').click()
    detail = page.locator("#alert-detail")
    await detail.locator("#acked").wait_for(timeout=WAIT_MS)
    assert "onerror" in await detail.locator("#acked").inner_text()
    await assert_inert(tab)

    await page.evaluate("(vm) => { location.hash = '#/vms/' + encodeURIComponent(vm); }", HOSTILE_VM)
    await page.locator("#timeline svg.timeline").wait_for(timeout=WAIT_MS)
    assert await page.locator("#vm-name").inner_text() == HOSTILE_VM
    titles = await page.locator("#timeline svg title").all_text_contents()
    assert any("<img src=x" in t for t in titles)
    await assert_inert(tab)

    for hash_, shown in (("#/vms", "#vm-rows tr"), ("#/ledger", "#verify dl"), ("#/principals", "#principal-rows tr")):
        await page.evaluate("(h) => { location.hash = h; }", hash_)
        await page.locator(shown).first.wait_for(timeout=WAIT_MS)
        await assert_inert(tab)
    await page.locator("#principal-rows tr", has_text="onerror").first.wait_for(timeout=WAIT_MS)
    await assert_inert(tab)
    await tab.screenshot("console-hostile")


@pytest.mark.parametrize("role", ["callout", "hypervisor"])
async def test_a_token_of_another_role_is_refused_at_login(api: Api, tab: Tab, role: str) -> None:
    """A callout or hypervisor token is not accepted as a console login, and is not kept."""
    page = tab.page
    await page.goto(str(api.client.make_url("/console/")))
    await page.locator("#token").fill(api.tokens[role])
    await page.locator("#token").press("Enter")
    await page.locator("#login-message", has_text="analyst or admin").wait_for(timeout=WAIT_MS)
    assert await page.evaluate("() => sessionStorage.length") == 0
    assert not [url for url in tab.requests if api.tokens[role] in url]


async def test_log_out_forgets_the_token(api: Api, tab: Tab) -> None:
    """Logging out removes the token from sessionStorage and shows the login page again."""
    page = tab.page
    await sign_in(tab, api)
    assert await page.evaluate("() => sessionStorage.getItem('replayguard.token')") == api.tokens["analyst"]
    await page.locator("#logout").click()
    await page.locator("#token").wait_for(timeout=WAIT_MS)
    assert await page.evaluate("() => sessionStorage.getItem('replayguard.token')") is None
    await page.reload()
    await page.locator("#token").wait_for(timeout=WAIT_MS)
    assert api.tokens["analyst"] not in page.url


async def test_unlock_from_the_principals_page(api_factory: Any, tab: Tab) -> None:
    """An admin sees a locked principal on the principals page and unlocks it; the unlock is ledgered."""
    api: Api = await api_factory(lockout_threshold=2, lockout_period_s=3600)
    principal, totp = await alice(api)
    wrong = f"{(int(totp.at(api.clock.now)) + 1) % 1_000_000:06d}"
    for _ in range(2):
        await api.post("/v1/otp/verify", {"vm_id": uid("vm"), "principal": principal, "otp": wrong})
    page = tab.page
    await sign_in(tab, api, role="admin")
    await page.locator("#nav-principals").click()
    row = page.locator(f'#principal-rows tr[data-principal="{principal}"]')
    await row.wait_for(timeout=WAIT_MS)
    assert "locked" in await row.inner_text()
    await row.locator(".unlock-note").fill("user called")
    await row.locator("button.unlock").click()
    await page.locator(f'#principal-rows tr[data-principal="{principal}"]:not(.locked)').wait_for(timeout=WAIT_MS)
    async with api.runtime.pool.acquire() as conn:
        note = await conn.fetchval("SELECT payload->>'note' FROM ledger WHERE kind = 'principal_unlock'"
                                   " AND subject = $1", principal)
    assert note == "user called"


async def many_rows(api: Api, table: str, count: int) -> None:
    """``count`` principals with one failed attempt (``table`` "principals") or VMs (``table``
    "vms"), named to sort after every other one: more than the console's first page (200)."""
    prefix = uid("zz")
    async with api.runtime.pool.acquire() as conn:
        if table == "principals":
            await conn.executemany("INSERT INTO principals (name, fail_count) VALUES ($1, 1)",
                                   [(f"{prefix}-{i:03d}",) for i in range(count)])
        else:
            await conn.executemany("INSERT INTO vms (vm_id, first_seen_us, last_seen_us) VALUES ($1, 1, 1)",
                                   [(f"{prefix}-{i:03d}",) for i in range(count)])


async def listed(tab: Tab, rows: str, attribute: str) -> list[str | None]:
    return [await r.get_attribute(attribute) for r in await tab.page.locator(f"{rows} tr").all()]


async def test_an_unlock_while_more_principals_load_lists_each_principal_once_unlocked(
        api_factory: Any, tab: Tab) -> None:
    """An unlock answered while "More principals" is loading (its page, read before the unlock,
    held until after it) leaves every principal listed once, in order, the unlocked one unlocked;
    the first page is not re-read in the meantime (such a re-read is held until the end)."""
    api: Api = await api_factory(lockout_threshold=2, lockout_period_s=3600)
    principal, totp = await alice(api)
    wrong = f"{(int(totp.at(api.clock.now)) + 1) % 1_000_000:06d}"
    for _ in range(2):
        await api.post("/v1/otp/verify", {"vm_id": uid("vm"), "principal": principal, "otp": wrong})
    await many_rows(api, "principals", 201)
    page = tab.page
    await sign_in(tab, api, role="admin")
    await page.locator("#nav-principals").click()
    row = page.locator(f'#principal-rows tr[data-principal="{principal}"]')
    await row.locator("button.unlock").wait_for(timeout=WAIT_MS)
    await page.locator("#more:not([hidden])").wait_for(timeout=WAIT_MS)

    held_more = HeldResponses()
    await page.route(lambda url: "/v1/principals?" in url and "cursor=" in url, held_more.handle)
    held_first = HeldResponses()
    await page.route(lambda url: "/v1/principals?" in url and "cursor=" not in url, held_first.handle)
    await page.locator("#more").click()
    await until(held_more.fetched, "the next page to be read (and held)")
    async with page.expect_event("requestfinished", lambda r: r.url.endswith("/unlock")):
        await row.locator("button.unlock").click()
    await settle(page)
    async with page.expect_event("requestfinished", lambda r: r.url == held_more.urls[0]):
        held_more.release()
    await settle(page)

    async with api.runtime.pool.acquire() as conn:
        every = [r["name"] for r in await conn.fetch(
            "SELECT name FROM principals UNION SELECT principal FROM otp_tokens ORDER BY 1")]
    shown = await listed(tab, "#principal-rows", "data-principal")
    assert len(shown) == len(set(shown)), "a principal is listed twice"
    assert shown == every, "the principals listed are not every principal once, in order"
    assert await row.count() == 1 and "locked" not in (await row.get_attribute("class") or "")
    assert await page.locator("#more").is_hidden()
    held_first.release()


@pytest.mark.parametrize(("hash_", "rows", "attribute"), [("#/vms", "#vm-rows", "data-vm-id"),
                                                           ("#/principals", "#principal-rows", "data-principal")])
async def test_a_double_clicked_more_button_reads_the_next_page_once(
        api: Api, tab: Tab, hash_: str, rows: str, attribute: str) -> None:
    """"More VMs" or "More principals" double-clicked asks for the next page once and lists
    each row once (the first answer is held until the double click is done)."""
    await many_rows(api, hash_.removeprefix("#/"), 201)
    page = tab.page
    await sign_in(tab, api, role="admin")
    await page.evaluate("(h) => { location.hash = h; }", hash_)
    await page.locator("#more:not([hidden])").wait_for(timeout=WAIT_MS)
    held = HeldResponses()
    await page.route(lambda url: "cursor=" in url, held.handle)
    await page.locator("#more").dblclick()
    await until(held.fetched, "the next page to be read (and held)")
    await settle(page)
    async with page.expect_event("requestfinished", lambda r: r.url == held.urls[0]):
        held.release()
    await settle(page)
    assert sum(1 for url in tab.requests if "cursor=" in url) == 1, "the next page was asked for twice"
    shown = await listed(tab, rows, attribute)
    assert len(shown) == len(set(shown)), "a row is listed twice"


async def test_verify_again_clicked_twice_while_verifying_verifies_once(api: Api, tab: Tab) -> None:
    """"Verify again" clicked a second time while the first verification is in flight does not
    ask the service to verify the whole chain a second time."""
    page = tab.page
    await sign_in(tab, api)
    await page.locator('nav a[data-page="ledger"]').click()
    await page.locator('#verify[data-ok="true"]').wait_for(timeout=WAIT_MS)
    before = sum(1 for url in tab.requests if url.endswith("/v1/ledger/verify"))
    held = HeldResponses()
    await page.route(lambda url: url.endswith("/v1/ledger/verify"), held.handle)
    await page.locator("#verify-again").evaluate("(button) => { button.click(); button.click(); }")
    await until(held.fetched, "the verification to be asked for (and held)")
    await settle(page)
    async with page.expect_event("requestfinished", lambda r: r.url == held.urls[0]):
        held.release()
    await settle(page)
    assert sum(1 for url in tab.requests if url.endswith("/v1/ledger/verify")) == before + 1
    await page.locator('#verify[data-ok="true"]').wait_for(timeout=WAIT_MS)


async def test_a_page_left_while_it_loads_does_not_draw_into_the_next(api: Api, tab: Tab) -> None:
    """The ledger page, left for the VMs while its status is in flight, cancels that read and
    does not add itself to the VMs page."""
    await reuse_alert(api, uid("vm"), uid("scope"))  # a VM to list
    page = tab.page
    await sign_in(tab, api)
    held = HeldResponses()
    await page.route(lambda url: url.endswith("/v1/status"), held.handle)
    await page.evaluate("() => { location.hash = '#/ledger'; }")
    await until(held.fetched, "the ledger's status to be read (and held)")
    async with page.expect_event("requestfailed", lambda r: r.url == held.urls[0], timeout=WAIT_MS):
        await page.evaluate("() => { location.hash = '#/vms'; }")
    await page.locator("#vm-rows tr").first.wait_for(timeout=WAIT_MS)
    held.release()
    await settle(page)
    assert await page.locator("#main h1").all_inner_texts() == ["VMs"]
    assert await page.locator("#verify").count() == 0, "the ledger page drew into the VMs page"


async def test_the_ledger_page_shows_verification_continuity_and_witnesses(
        api_factory: Any, fresh_database: Any, tab: Tab, tmp_path: Any) -> None:
    """The ledger page says the chain verifies, names the head, and lists each witness with its state."""
    from replayguard.settings import Secret

    (tmp_path / "witness").mkdir()
    held, gone = tmp_path / "witness" / "rg.json", tmp_path / "missing" / "rg.json"
    api: Api = await api_factory(database_url=Secret(await fresh_database()),
                                 witnesses=(f"file:{held}", f"file:{gone}"))
    await play_the_story(api)
    page = tab.page
    await sign_in(tab, api)
    await page.locator('nav a[data-page="ledger"]').click()
    await page.locator('#verify[data-ok="true"]').wait_for(timeout=WAIT_MS)
    rows = page.locator("#witnesses tbody tr")
    await rows.first.wait_for(timeout=WAIT_MS)
    states = {await r.get_attribute("data-witness"): (await r.inner_text()) for r in await rows.all()}
    assert "up" in states[f"file:{held}"] and "unreachable" in states[f"file:{gone}"]
    assert "witness_unreachable" in await page.locator("main").inner_text()
    await tab.screenshot("console-ledger")


async def test_leaving_the_ledger_page_aborts_its_verification(api: Api, tab: Tab) -> None:
    """The analyst leaves the ledger page while its whole-chain verification is in flight: the
    browser aborts that request (so the service stops verifying, see
    test_a_verification_whose_client_left_stops_on_the_server), and neither its answer nor an
    error is drawn, nor is the analyst logged out."""
    await reuse_alert(api, uid("vm"), uid("scope"))  # a VM to list
    page = tab.page
    await sign_in(tab, api)
    held = HeldResponses()
    await page.route(lambda url: url.endswith("/v1/ledger/verify"), held.handle)
    await page.evaluate("() => { location.hash = '#/ledger'; }")
    await until(held.fetched, "the verification to be asked for (and held)")
    async with page.expect_event("requestfailed", lambda r: r.url == held.urls[0], timeout=WAIT_MS) as failed:
        await page.evaluate("() => { location.hash = '#/vms'; }")
    assert "ABORTED" in ((await failed.value).failure or "").upper()
    await page.locator("#vm-rows tr").first.wait_for(timeout=WAIT_MS)
    held.release()
    await settle(page)
    assert await page.locator("#main h1").all_inner_texts() == ["VMs"]
    assert await page.locator("#verify").count() == 0, "the ledger page drew into the VMs page"
    assert await page.locator("#main .error").count() == 0, "the aborted request was shown as an error"
    assert await page.evaluate("() => sessionStorage.getItem('replayguard.token')") == api.tokens["analyst"]
    assert tab.console_errors == []


async def test_the_last_of_two_logins_in_flight_wins_token_and_role(api: Api, tab: Tab) -> None:
    """An admin login whose role lookup is still in flight when an analyst token is logged in
    does not give the analyst's session the admin's menu when it answers: the token kept and
    the role the menu follows are the last login's."""
    page = tab.page
    await page.goto(str(api.client.make_url("/console/")))
    held = HeldResponses()
    await page.route(lambda url: url.endswith("/v1/status"), held.handle)
    await page.locator("#token").fill(api.tokens["admin"])
    await page.locator("#login").click()
    await until(held.fetched, "the admin token's role lookup to be read (and held)")
    await page.locator("#token").fill(api.tokens["analyst"])
    await page.locator("#login").click()
    await page.locator("#alert-rows").wait_for(timeout=WAIT_MS)
    held.release()
    await settle(page)
    assert await page.evaluate("() => sessionStorage.getItem('replayguard.token')") == api.tokens["analyst"]
    assert await page.evaluate("() => sessionStorage.getItem('replayguard.role')") == "analyst"
    assert await page.locator("#nav-principals").is_hidden(), "the analyst's menu offers the admin's page"
    assert await page.locator("#login-message").count() == 0 or await page.locator("#login-message").inner_text() == ""
