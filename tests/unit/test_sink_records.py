"""services/alerts: the records the sinks get, and the alert uid a SIEM correlates them by
(the OCSF finding's uid): one per alert across its changes, another per alert raised under
an id a restore gave out again."""

from __future__ import annotations

from typing import Any

from replayguard.core import siem
from replayguard.services.alerts import alert_uid, sink_record

ROW: dict[str, Any] = {
    "id": 2, "kind": "reuse", "severity": "warning", "status": "open", "vm_id": "web-01", "principal": "alice",
    "count": 1, "first_seen_us": 1_795_946_700_000_000, "last_seen_us": 1_795_946_700_000_000,
    "updated_us": 1_795_946_700_000_000, "summary": "A credential was presented again", "details": {"first_seq": 9},
    "ack_by": None, "ack_by_name": None, "ack_note": None, "ack_us": None, "change_seq": 4,
    "raised": {"ts_us": 1_795_946_700_000_000, "seq": 10, "change": "raised", "kind": "reuse", "severity": "warning"},
    "raised_hash": bytes.fromhex("aa" * 32),
}
# The same alert later: joined again and acknowledged (count, times, summary, status move on).
LATER = {**ROW, "count": 3, "last_seen_us": ROW["last_seen_us"] + 5_000_000,
         "updated_us": ROW["updated_us"] + 6_000_000, "status": "acknowledged", "ack_by": "tok-1",
         "ack_by_name": "analyst", "ack_note": "seen",
         "ack_us": ROW["updated_us"] + 6_000_000, "change_seq": 9}
# Raised on the restored database under the same id, at the same time, by another entry.
RESTORED = {**ROW, "kind": "ledger_rollback", "severity": "critical", "vm_id": None, "principal": None,
            "raised": {**ROW["raised"], "seq": 8, "kind": "ledger_rollback", "severity": "critical"},
            "raised_hash": bytes.fromhex("bb" * 32)}


def test_every_change_of_one_alert_and_every_delivery_keep_its_uid() -> None:
    """The uid depends only on what raised the alert: the same record delivered again, and a
    later change of the same alert, carry the uid (and finding uid) it was first sent with."""
    first, again, later = sink_record(ROW), sink_record(dict(ROW)), sink_record(LATER)
    assert first == again
    assert first["alert_uid"] == later["alert_uid"] and first["alert_uid"].startswith("2.")
    finding = [(siem.ocsf(r) or {})["finding_info"]["uid"] for r in (first, later)]
    assert finding == [f"replayguard-alert-{first['alert_uid']}"] * 2
    assert first["id"] != later["id"] and first["id"].startswith(f"alert-{first['alert_uid']}.4.")


def test_an_alert_raised_under_a_reused_id_gets_another_uid() -> None:
    """Two alerts holding id 2 (one before a restore, one after) differ in the entry that
    raised them, and so in their uid, finding uid and record ids; so does one raised by the
    same entry number in another history (another hash)."""
    before, after = sink_record(ROW), sink_record(RESTORED)
    assert before["alert_id"] == after["alert_id"] == "2"
    assert before["alert_uid"] != after["alert_uid"]
    assert (siem.ocsf(before) or {})["finding_info"]["uid"] != (siem.ocsf(after) or {})["finding_info"]["uid"]
    assert alert_uid(ROW) != alert_uid({**ROW, "raised_hash": bytes.fromhex("cc" * 32)})
    assert alert_uid(ROW) != alert_uid({**ROW, "first_seen_us": ROW["first_seen_us"] + 1})


def test_an_alert_without_a_first_history_item_still_has_a_stable_uid() -> None:
    """A row whose history is empty (raised before histories were kept) has no raising
    entry: its uid is made of what it does have, the same at every change."""
    bare = {**ROW, "raised": None, "raised_hash": None}
    assert alert_uid(bare) == alert_uid({**bare, "count": 7, "change_seq": 12}) != alert_uid(ROW)
