"""The service's own log shows every critical alert as an error line and every warning
alert as a warning line (kind, VM, principal, alert id), so the journal alone shows an
attack; the line is written once per alert raised or escalated, not once per repeat."""

from __future__ import annotations

import io
import json
from typing import Any

from replayguard.http.state import ANALYSTS
from tests.api.test_rollback_attack import alice, event, login
from tests.conftest import Api, uid
from tests.waiting import until


def alert_lines(buffer: io.StringIO, alert_id: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "alert" and line.get("alert_id") == alert_id]


async def test_a_replay_after_rollback_is_an_error_line_in_the_service_log(
        api: Api, log_buffer: io.StringIO) -> None:
    """The critical replay_after_rollback alert appears once as a JSON error line naming kind, VM, principal, id."""
    await until(lambda: api.client.app[ANALYSTS].feed.leader, "this instance to lead the alert feed", timeout=15)
    vm_id = uid("web-01")
    principal, totp = await alice(api)
    await event(api, vm_id, "snapshot.created", snapshot_id="nightly", snapshot_created_at=api.clock.now)
    api.clock.advance(5)
    code = totp.at(api.clock.now)
    assert (await login(api, vm_id, principal, code))["decision"] == "accept"
    api.clock.advance(5)
    await event(api, vm_id, "snapshot.reverted", snapshot_id="nightly")
    replay = await login(api, vm_id, principal, code)
    assert replay["reason"] == "replay_after_rollback"
    lines = await until(lambda: alert_lines(log_buffer, replay["alert_id"]), "the alert's log line", timeout=15)
    line = lines[0]
    assert (line["level"], line["kind"], line["severity"]) == ("error", "replay_after_rollback", "critical")
    assert (line["vm_id"], line["principal"]) == (vm_id, principal)
    assert code not in json.dumps(line)

    for _ in range(3):  # repeats join the alert: no new line for the same kind and severity
        await login(api, vm_id, principal, code)
    seen = len(alert_lines(log_buffer, replay["alert_id"]))
    status, acked = await api.post(f"/v1/alerts/{replay['alert_id']}/acknowledge", {"note": "x"}, role="analyst")
    assert status == 200
    feed = api.client.app[ANALYSTS].feed
    await until(lambda: (feed._pos or 0) >= acked["change"], "the feed to read the acknowledgement", timeout=15)
    assert seen == 1 and len(alert_lines(log_buffer, replay["alert_id"])) == 1


async def test_a_warning_alert_is_a_warning_line(api: Api, log_buffer: io.StringIO) -> None:
    """A reused nonce (a warning alert) is logged at warning level with its alert id and VM."""
    await until(lambda: api.client.app[ANALYSTS].feed.leader, "this instance to lead the alert feed", timeout=15)
    vm_id, scope = uid("vm"), uid("scope")
    body = {"vm_id": vm_id, "scope": scope, "nonce": uid("n")}
    await api.post("/v1/nonces/consume", body)
    _status, second = await api.post("/v1/nonces/consume", body)
    assert second["reason"] == "reused"
    lines = await until(lambda: alert_lines(log_buffer, second["alert_id"]), "the alert's log line", timeout=15)
    assert (lines[0]["level"], lines[0]["vm_id"], lines[0]["severity"]) == ("warning", vm_id, "warning")
