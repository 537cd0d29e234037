"""Decisions are values: what the service answers a callout, and why."""

from __future__ import annotations

import enum
from typing import NamedTuple


class Verdict(str, enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"


class Reason(str, enum.Enum):
    OK = "ok"
    INVALID = "invalid"
    REUSED = "reused"
    REPLAY_AFTER_ROLLBACK = "replay_after_rollback"
    LOCKED_OUT = "locked_out"
    NO_TOKEN = "no_token"  # noqa: S105 - a reason code, not a password
    EXPIRED = "expired"


class Flag(str, enum.Enum):
    ROLLBACK_DETECTED = "rollback_detected"
    CLONE_DETECTED = "clone_detected"
    RECEIPT_INVALID = "receipt_invalid"
    RECEIPT_MISSING = "receipt_missing"


class AlertKind(str, enum.Enum):
    """Every kind of alert the service raises (CONTRACT §6); the SQL raises only these."""

    REPLAY_AFTER_ROLLBACK = "replay_after_rollback"
    REUSE = "reuse"
    ROLLBACK_DETECTED = "rollback_detected"
    CLONE_DETECTED = "clone_detected"
    RECEIPT_INVALID = "receipt_invalid"
    RECEIPT_MISSING = "receipt_missing"
    BRUTE_FORCE = "brute_force"
    CLOCK_REGRESSION = "clock_regression"
    LEDGER_TAMPER = "ledger_tamper"
    LEDGER_ROLLBACK = "ledger_rollback"
    WITNESS_UNREACHABLE = "witness_unreachable"


class Severity(str, enum.Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class DecisionResult(NamedTuple):
    """The answer to one verify/consume request, as CONTRACT §4 renders it (a NamedTuple
    rather than a frozen dataclass: one is built for every decision)."""

    verdict: Verdict
    reason: Reason
    flags: tuple[Flag, ...]
    seq: int | None
    receipt: str | None
    alert_id: str | None = None

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {
            "decision": self.verdict.value,
            "reason": self.reason.value,
            "flags": [flag.value for flag in self.flags],
            "seq": self.seq,
            "receipt": self.receipt,
        }
        if self.alert_id is not None:
            body["alert_id"] = self.alert_id
        return body
