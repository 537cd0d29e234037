"""Sink records in the shapes SIEMs ingest: Elastic Common Schema and OCSF.

Pure functions of one sink record (an alert change from ``alerts.sink_record`` or a
checkpoint from ``core.checkpoints.to_json``), no clock and no I/O.

- **ECS** (Elastic Common Schema 8.x): an alert is ``event.kind: alert`` in the
  ``intrusion_detection`` category (``authentication`` too for credential replays),
  ``rule.name`` its kind, ``host.name`` the VM, ``user.name`` the principal,
  ``replayguard.alert.uid`` the alert's ``alert_uid`` (as OCSF's finding uid); a checkpoint
  is ``event.kind: state`` in the ``database`` category.
- **OCSF** 1.1: an alert is a Detection Finding (class 2004, category 2 Findings): created
  when raised, updated on later changes, closed when acknowledged; the VM is the finding's
  resource. ``finding_info.uid`` is ``replayguard-alert-<alert_uid>`` (``alerts.alert_uid``):
  one alert's changes share it, and an alert raised under an id a restore gave out again
  has another. Checkpoints are not findings and have no OCSF form (``None``): an OCSF sink
  carries alerts only.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .. import __version__

ECS_VERSION = "8.11.0"
OCSF_VERSION = "1.1.0"
PRODUCT = {"name": "replayguard", "vendor_name": "replayguard", "version": __version__}
# ECS event.severity and OCSF severity_id: info, warning, critical.
ECS_SEVERITY = {"info": 21, "warning": 47, "critical": 73}
OCSF_SEVERITY = {"info": 1, "warning": 3, "critical": 5}
OCSF_SEVERITY_NAMES = {1: "Informational", 3: "Medium", 5: "Critical", 0: "Unknown"}
_CREDENTIAL_KINDS = frozenset({"replay_after_rollback", "reuse", "brute_force"})
DETECTION_FINDING = 2004
FINDINGS_CATEGORY = 2


def _ms(rfc3339: object) -> int | None:
    if not isinstance(rfc3339, str):
        return None
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


def _ack(record: Mapping[str, Any]) -> Mapping[str, Any]:
    ack = record.get("acknowledged")
    return ack if isinstance(ack, Mapping) else {}


def ecs(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record as one ECS document."""
    if record.get("type") == "checkpoint":
        return {
            "@timestamp": record["created_at"], "ecs": {"version": ECS_VERSION},
            "message": record["summary"],
            "event": {"kind": "state", "category": ["database"], "type": ["info"], "id": record["id"],
                      "dataset": "replayguard.checkpoint", "module": "replayguard", "provider": "replayguard"},
            "observer": {"vendor": "replayguard", "product": "replayguard", "version": __version__},
            "replayguard": {"checkpoint": {k: record[k] for k in ("seq", "hash", "key_id", "algorithm", "signature")}},
        }
    kind, severity = record["kind"], record["severity"]
    categories = ["intrusion_detection"] + (["authentication"] if kind in _CREDENTIAL_KINDS else [])
    doc: dict[str, Any] = {
        "@timestamp": record["updated_at"], "ecs": {"version": ECS_VERSION}, "message": record["summary"],
        "event": {
            "kind": "alert", "category": categories, "type": ["info"],
            "id": record["id"], "code": kind, "severity": ECS_SEVERITY.get(severity, 21),
            "start": record["first_seen"], "end": record["last_seen"], "dataset": "replayguard.alert",
            "module": "replayguard", "provider": "replayguard",
        },
        "rule": {"name": kind, "category": "replay"},
        "observer": {"vendor": "replayguard", "product": "replayguard", "version": __version__},
        "replayguard": {"alert": {"id": record["alert_id"], "uid": record["alert_uid"], "severity": severity,
                                  "status": record["status"], "count": record["count"], "change": record["change"],
                                  "details": record.get("details")}},
    }
    if kind in _CREDENTIAL_KINDS:
        doc["event"]["outcome"] = "failure"  # the presentation was refused
    if record.get("vm_id") is not None:
        doc["host"] = {"name": record["vm_id"], "id": record["vm_id"]}
    if record.get("principal") is not None:
        doc["user"] = {"name": record["principal"]}
    ack = _ack(record)
    if ack:
        doc["replayguard"]["alert"]["acknowledged"] = dict(ack)
    return doc


def ocsf(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record as an OCSF Detection Finding, or None when it is not an alert."""
    if record.get("type") != "alert":
        return None
    acknowledged = record["status"] == "acknowledged"
    activity = 3 if acknowledged else (1 if record.get("count") == 1 and not _ack(record) else 2)
    severity_id = OCSF_SEVERITY.get(record["severity"], 0)
    finding: dict[str, Any] = {
        "uid": f"replayguard-alert-{record['alert_uid']}", "title": record["summary"], "types": [record["kind"]],
        "created_time": _ms(record["first_seen"]), "first_seen_time": _ms(record["first_seen"]),
        "last_seen_time": _ms(record["last_seen"]), "modified_time": _ms(record["updated_at"]),
        "analytic": {"name": record["kind"], "type_id": 1, "type": "Rule"},
    }
    doc: dict[str, Any] = {
        "activity_id": activity, "category_uid": FINDINGS_CATEGORY, "class_uid": DETECTION_FINDING,
        "type_uid": DETECTION_FINDING * 100 + activity, "severity_id": severity_id,
        "severity": OCSF_SEVERITY_NAMES[severity_id],
        "status_id": 3 if acknowledged else 1, "status": "Resolved" if acknowledged else "New",
        "time": _ms(record["updated_at"]), "message": record["summary"],
        "metadata": {"version": OCSF_VERSION, "product": dict(PRODUCT), "uid": record["id"]},
        "finding_info": finding, "count": record["count"],
        "unmapped": {"replayguard": {"alert_id": record["alert_id"], "change": record["change"],
                                     "details": record.get("details")}},
    }
    if record.get("vm_id") is not None:
        doc["resources"] = [{"uid": record["vm_id"], "name": record["vm_id"], "type": "Virtual Machine"}]
    if record.get("principal") is not None:
        doc["actor"] = {"user": {"name": record["principal"]}}
    ack = _ack(record)
    if ack:
        doc["comment"] = ack.get("note")
    return doc


def splunk_event(record: Mapping[str, Any], *, host: str, index: str | None, sourcetype: str) -> dict[str, Any]:
    """One Splunk HTTP Event Collector event wrapping the record (time in epoch seconds)."""
    stamp = record.get("updated_at") or record.get("created_at")
    millis = _ms(stamp)
    event: dict[str, Any] = {"event": dict(record), "host": host, "source": "replayguard",
                             "sourcetype": sourcetype}
    if millis is not None:
        event["time"] = millis / 1000
    if index:
        event["index"] = index
    return event
