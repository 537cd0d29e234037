"""Pure formatting of alert records for external sinks: ArcSight CEF inside RFC 5424 syslog.

Alerts leave the host in real time so that an intruder who owns a VM cannot erase them;
receivers are SIEMs that parse CEF lines carried by syslog. Everything here is a plain
function of a record (a JSON-like mapping) and of values the caller passes in (``now``,
hostname, process id): no I/O, no clock reads, so the exact bytes are tested from tables.

References: ArcSight "Common Event Format" (CEF:0; escaping rules of the header and of
extension values), RFC 5424 (message syntax), RFC 6587 §3.4.1 (octet-counting framing).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

CEF_VENDOR = "replayguard"
CEF_PRODUCT = "replayguard"
APP_NAME = "replayguard"
MSG_MAX = 1023  # CEF's documented maximum length of the ``msg`` extension

CEF_SEVERITY = {"info": 3, "warning": 6, "critical": 9}
SYSLOG_SEVERITY = {"info": 6, "warning": 4, "critical": 2}  # RFC 5424 table 2

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12,
    "security": 13, "console": 14, "solaris-cron": 15,
    **{f"local{i}": 16 + i for i in range(8)},
}  # fmt: skip

KIND_NAMES = {
    "replay_after_rollback": "Replay after VM rollback",
    "reuse": "One-time credential reused",
    "rollback_detected": "VM rollback detected",
    "clone_detected": "VM clone detected",
    "receipt_missing": "VM lost its state receipt",
    "brute_force": "Brute-force attempt",
    "clock_regression": "Clock regression",
    "receipt_invalid": "Forged or corrupt receipt",
    "ledger_tamper": "Ledger tampering detected",
    "ledger_rollback": "Ledger rolled back",
    "witness_unreachable": "Ledger witness unreachable",
    "checkpoint": "Ledger checkpoint",
}

_BOM = b"\xef\xbb\xbf"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def escape_header(value: str) -> str:
    """Escape one CEF header field: ``\\`` and ``|`` get a backslash.

    The spec allows no line breaks in the header, so CR and LF become spaces rather than
    letting a crafted ``kind`` or name start a forged second event.
    """
    escaped = value.replace("\\", "\\\\").replace("|", "\\|")
    return escaped.replace("\r", " ").replace("\n", " ")


def escape_extension(value: str) -> str:
    """Escape one CEF extension value: ``\\``, ``=`` and line breaks (as ``\\n``/``\\r``)."""
    escaped = value.replace("\\", "\\\\").replace("=", "\\=")
    return escaped.replace("\r", "\\r").replace("\n", "\\n")


def severity_of(record: Mapping[str, object]) -> str:
    """The record's severity; records without one (checkpoints) are ``info``."""
    severity = record.get("severity", "info")
    if not isinstance(severity, str) or severity not in CEF_SEVERITY:
        raise ValueError(f"unknown severity {severity!r}")
    return severity


def signature_of(record: Mapping[str, object]) -> str:
    """CEF Device Event Class ID: the alert kind, else the record type."""
    return str(record.get("kind") or record.get("type") or "unknown")


def rfc3339_to_epoch_ms(value: str) -> int:
    """Convert an RFC 3339 time to the epoch milliseconds CEF's ``rt``/``start``/``end`` use."""
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"time without offset: {value!r}")
    return (moment - _EPOCH) // timedelta(milliseconds=1)  # exact, no float rounding


def _extension_pairs(record: Mapping[str, object]) -> list[tuple[str, str]]:
    """The (key, value) pairs of the extension, in a fixed order, for fields present."""
    pairs: list[tuple[str, str]] = []
    last_seen = record.get("last_seen")
    if isinstance(last_seen, str):
        pairs.append(("rt", str(rfc3339_to_epoch_ms(last_seen))))
    first_seen = record.get("first_seen")
    if isinstance(first_seen, str):
        pairs.append(("start", str(rfc3339_to_epoch_ms(first_seen))))
    if isinstance(last_seen, str):
        pairs.append(("end", str(rfc3339_to_epoch_ms(last_seen))))
    simple = [("cnt", "count"), ("externalId", "id"), ("cat", "type"), ("duser", "principal")]
    pairs += [(key, str(record[field])) for key, field in simple if record.get(field) is not None]
    labelled = [("cs1", "vmId", "vm_id"), ("cs2", "status", "status"), ("cs3", "hash", "hash"),
                ("cn1", "seq", "seq")]  # fmt: skip
    for key, label, field in labelled:
        if record.get(field) is not None:
            pairs += [(f"{key}Label", label), (key, str(record[field]))]
    summary = record.get("summary")
    if summary is not None:
        pairs.append(("msg", str(summary)[:MSG_MAX]))
    return pairs


def format_cef(record: Mapping[str, object], *, version: str) -> str:
    """One CEF:0 line for a record (alert or checkpoint), escaped per the CEF spec."""
    signature = signature_of(record)
    name = KIND_NAMES.get(signature, signature.replace("_", " ").capitalize())
    header = [CEF_VENDOR, CEF_PRODUCT, version, signature, name]
    head = "|".join(escape_header(field) for field in header)
    extension = " ".join(f"{key}={escape_extension(value)}" for key, value in _extension_pairs(record))
    return f"CEF:0|{head}|{CEF_SEVERITY[severity_of(record)]}|{extension}"


def header_field(value: str, max_len: int) -> str:
    """An RFC 5424 header field: PRINTUSASCII only (others become ``_``), ``-`` when empty."""
    cleaned = "".join(ch if 33 <= ord(ch) <= 126 else "_" for ch in value[:max_len])
    return cleaned or "-"


def rfc5424_timestamp(now: datetime) -> str:
    """RFC 5424 TIMESTAMP in UTC with microseconds (the most the RFC allows)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_syslog(
    record: Mapping[str, object],
    *,
    now: datetime,
    hostname: str,
    procid: str,
    facility: int,
    version: str,
) -> bytes:
    """One RFC 5424 message whose MSG is the record's CEF line.

    MSGID is the record type; there is no STRUCTURED-DATA. The BOM that marks a UTF-8 MSG is
    added only when the line is not plain ASCII, because several CEF parsers choke on a BOM
    before ``CEF:`` and an ASCII MSG is valid without it.
    """
    if not 0 <= facility <= 23:
        raise ValueError(f"facility out of range: {facility}")
    pri = facility * 8 + SYSLOG_SEVERITY[severity_of(record)]
    fields = [
        f"<{pri}>1",
        rfc5424_timestamp(now),
        header_field(hostname, 255),
        header_field(APP_NAME, 48),
        header_field(procid, 128),
        header_field(str(record.get("type", "")), 32),
        "-",
    ]
    msg = format_cef(record, version=version).encode()
    bom = b"" if msg.isascii() else _BOM
    return " ".join(fields).encode("ascii") + b" " + bom + msg


def octet_counted(message: bytes) -> bytes:
    """Frame one message for syslog over TCP (RFC 6587 §3.4.1: ``LEN SP MSG``)."""
    return str(len(message)).encode("ascii") + b" " + message
