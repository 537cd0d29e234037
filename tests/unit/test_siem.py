"""core/siem: the ECS, OCSF and Splunk HEC shapes of sink records, written out in full.

tests/integration/test_siem_sinks.py checks that these documents reach real receivers and
pass the schemas' required fields; here every field's value is pinned, so a change of
mapping (a severity, a category, an activity, a time's unit) fails a test.
"""

from __future__ import annotations

from typing import Any

import pytest

from replayguard import __version__
from replayguard.core import siem

REPLAY: dict[str, Any] = {
    "type": "alert", "id": "alert-17.5b1e0c2a9d3f4e67.3.0f1e2d3c4b5a6978", "alert_id": "17",
    "alert_uid": "17.5b1e0c2a9d3f4e67", "kind": "reuse", "severity": "warning",
    "status": "open", "vm_id": "web-01", "principal": "alice", "count": 1,
    "first_seen": "2026-11-29T10:05:00.000000Z", "last_seen": "2026-11-29T10:05:00.250000Z",
    "updated_at": "2026-11-29T10:05:01.500000Z", "summary": "A credential was presented again",
    "details": {"first_seq": 5}, "acknowledged": None, "change": 3,
}
ACKED: dict[str, Any] = {
    **REPLAY, "id": "alert-18.77aa01bc23de45f6.9.1a2b3c4d5e6f7081", "alert_id": "18",
    "alert_uid": "18.77aa01bc23de45f6", "kind": "rollback_detected", "severity": "critical",
    "status": "acknowledged", "principal": None, "count": 3, "change": 9,
    "acknowledged": {"by": "analyst-1", "note": "planned restore"},
}
CHECKPOINT: dict[str, Any] = {
    "type": "checkpoint", "id": "checkpoint-5", "seq": 5, "hash": "ab" * 32, "ts_us": 1_795_000_000_000_000,
    "created_at": "2026-11-29T10:05:00.000000Z", "algorithm": "Ed25519", "key_id": "21fe31dfa154a261",
    "signature": "cd" * 64, "summary": "ledger entry 5 has hash " + "ab" * 32,
}
OBSERVER = {"vendor": "replayguard", "product": "replayguard", "version": __version__}
T_FIRST, T_LAST, T_UPDATED = 1_795_946_700_000, 1_795_946_700_250, 1_795_946_701_500  # date -u -d … +%s


def test_ecs_of_a_credential_replay() -> None:
    """A refused credential: an alert in intrusion_detection and authentication, outcome failure,
    the VM as host and the principal as user."""
    assert siem.ecs(REPLAY) == {
        "@timestamp": "2026-11-29T10:05:01.500000Z", "ecs": {"version": "8.11.0"},
        "message": "A credential was presented again",
        "event": {"kind": "alert", "category": ["intrusion_detection", "authentication"], "type": ["info"],
                  "id": REPLAY["id"], "code": "reuse", "severity": 47, "start": "2026-11-29T10:05:00.000000Z",
                  "end": "2026-11-29T10:05:00.250000Z", "dataset": "replayguard.alert", "module": "replayguard",
                  "provider": "replayguard", "outcome": "failure"},
        "rule": {"name": "reuse", "category": "replay"},
        "observer": OBSERVER,
        "replayguard": {"alert": {"id": "17", "uid": "17.5b1e0c2a9d3f4e67", "severity": "warning", "status": "open",
                                  "count": 1, "change": 3, "details": {"first_seq": 5}}},
        "host": {"name": "web-01", "id": "web-01"},
        "user": {"name": "alice"},
    }


def test_ecs_of_an_acknowledged_rollback() -> None:
    """Not a credential: no authentication category and no outcome; no principal, no user;
    the acknowledgement travels; critical is severity 73."""
    doc = siem.ecs(ACKED)
    assert doc["event"]["category"] == ["intrusion_detection"] and "outcome" not in doc["event"]
    assert doc["event"]["severity"] == 73 and "user" not in doc
    assert doc["replayguard"]["alert"]["acknowledged"] == {"by": "analyst-1", "note": "planned restore"}
    assert siem.ecs({**ACKED, "severity": "info"})["event"]["severity"] == 21
    assert siem.ecs({**ACKED, "severity": "unheard-of"})["event"]["severity"] == 21
    assert "host" not in siem.ecs({**ACKED, "vm_id": None})


@pytest.mark.parametrize("kind", ["replay_after_rollback", "reuse", "brute_force"])
def test_ecs_credential_kinds_are_authentication_failures(kind: str) -> None:
    """The three alerts about a presented credential are authentication failures too."""
    event = siem.ecs({**ACKED, "kind": kind})["event"]
    assert event["category"] == ["intrusion_detection", "authentication"] and event["outcome"] == "failure"


def test_ecs_of_a_checkpoint() -> None:
    """A checkpoint is a state event in the database category carrying what verifies it."""
    assert siem.ecs(CHECKPOINT) == {
        "@timestamp": "2026-11-29T10:05:00.000000Z", "ecs": {"version": "8.11.0"},
        "message": "ledger entry 5 has hash " + "ab" * 32,
        "event": {"kind": "state", "category": ["database"], "type": ["info"], "id": "checkpoint-5",
                  "dataset": "replayguard.checkpoint", "module": "replayguard", "provider": "replayguard"},
        "observer": OBSERVER,
        "replayguard": {"checkpoint": {"seq": 5, "hash": "ab" * 32, "key_id": "21fe31dfa154a261",
                                       "algorithm": "Ed25519", "signature": "cd" * 64}},
    }


def test_ocsf_of_a_new_credential_replay() -> None:
    """Raised (count 1, never acknowledged): Detection Finding, activity Create, status New,
    times in epoch milliseconds, the VM a resource and the principal the actor."""
    assert siem.ocsf(REPLAY) == {
        "activity_id": 1, "category_uid": 2, "class_uid": 2004, "type_uid": 200401, "severity_id": 3,
        "severity": "Medium", "status_id": 1, "status": "New", "time": T_UPDATED,
        "message": "A credential was presented again",
        "metadata": {"version": "1.1.0", "product": {"name": "replayguard", "vendor_name": "replayguard",
                                                     "version": __version__}, "uid": REPLAY["id"]},
        "finding_info": {"uid": "replayguard-alert-17.5b1e0c2a9d3f4e67", "title": "A credential was presented again",
                         "types": ["reuse"], "created_time": T_FIRST, "first_seen_time": T_FIRST,
                         "last_seen_time": T_LAST, "modified_time": T_UPDATED,
                         "analytic": {"name": "reuse", "type_id": 1, "type": "Rule"}},
        "count": 1,
        "unmapped": {"replayguard": {"alert_id": "17", "change": 3, "details": {"first_seq": 5}}},
        "resources": [{"uid": "web-01", "name": "web-01", "type": "Virtual Machine"}],
        "actor": {"user": {"name": "alice"}},
    }


@pytest.mark.parametrize(("change", "activity", "status"), [
    ({"count": 2}, 2, (1, "New")),  # seen again: Update
    ({"count": 1, "acknowledged": {"by": "a"}}, 2, (1, "New")),  # a note on an open alert: Update
    ({"status": "acknowledged", "acknowledged": {"by": "a", "note": "n"}}, 3, (3, "Resolved")),  # Close
])
def test_ocsf_activity_follows_the_alert(change: dict[str, Any], activity: int, status: tuple[int, str]) -> None:
    """Create once, Update on later changes, Close when acknowledged, with the matching status."""
    doc = siem.ocsf({**REPLAY, **change})
    assert doc is not None
    assert (doc["activity_id"], doc["type_uid"], (doc["status_id"], doc["status"])) == (
        activity, 200400 + activity, status)


def test_ocsf_of_an_acknowledged_rollback() -> None:
    """Critical is severity 5; the acknowledgement's note is the comment; no principal, no actor;
    an unknown severity is 0, Unknown; a checkpoint has no OCSF form."""
    doc = siem.ocsf(ACKED)
    assert doc is not None and (doc["severity_id"], doc["severity"]) == (5, "Critical")
    assert doc["comment"] == "planned restore" and "actor" not in doc
    assert "comment" not in (siem.ocsf(REPLAY) or {})
    unknown = siem.ocsf({**ACKED, "severity": "unheard-of"})
    assert unknown is not None and (unknown["severity_id"], unknown["severity"]) == (0, "Unknown")
    assert "resources" not in (siem.ocsf({**ACKED, "vm_id": None}) or {})
    assert siem.ocsf(CHECKPOINT) is None


def test_splunk_event_wraps_the_record() -> None:
    """The record itself is the event; time is the record's in epoch seconds (the alert's last
    change, a checkpoint's creation); index only when configured."""
    assert siem.splunk_event(REPLAY, host="hv-03", index="sec", sourcetype="replayguard:alert") == {
        "event": REPLAY, "host": "hv-03", "source": "replayguard", "sourcetype": "replayguard:alert",
        "time": T_UPDATED / 1000, "index": "sec"}
    checkpoint = siem.splunk_event(CHECKPOINT, host="h", index=None, sourcetype="s")
    assert checkpoint["time"] == T_FIRST / 1000 and "index" not in checkpoint
    assert "time" not in siem.splunk_event({"type": "probe"}, host="h", index="", sourcetype="s")
