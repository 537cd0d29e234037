"""Exact bytes of CEF lines and RFC 5424 messages, from tables (replayguard.core.cef)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from replayguard.core import cef

NOW = datetime(2026, 11, 29, 10, 6, 1, tzinfo=UTC)

ALERT = {
    "type": "alert", "id": "al-1", "kind": "replay_after_rollback", "severity": "critical",
    "status": "open", "vm_id": "web-01", "principal": "alice", "count": 2,
    "first_seen": "2026-11-29T10:05:00Z", "last_seen": "2026-11-29T10:06:00.5Z",
    "summary": 'A credential first used on VM "web-01" inside a rollback window was presented again',
}  # fmt: skip
ALERT_CEF = (
    "CEF:0|replayguard|replayguard|0.1.0|replay_after_rollback|Replay after VM rollback|9|"
    "rt=1795946760500 start=1795946700000 end=1795946760500 cnt=2 externalId=al-1 cat=alert "
    "duser=alice cs1Label=vmId cs1=web-01 cs2Label=status cs2=open "
    'msg=A credential first used on VM "web-01" inside a rollback window was presented again'
)
CHECKPOINT = {"type": "checkpoint", "id": "cp-1", "seq": 1000, "hash": "ab12"}
CHECKPOINT_CEF = (
    "CEF:0|replayguard|replayguard|0.1.0|checkpoint|Ledger checkpoint|3|"
    "externalId=cp-1 cat=checkpoint cs3Label=hash cs3=ab12 cn1Label=seq cn1=1000"
)


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain", "plain"),
        ("a|b", "a\\|b"),
        ("a\\b", "a\\\\b"),
        ("\\|", "\\\\\\|"),
        ("a=b", "a=b"),
        ("a\nb", "a b"),
        ("a\r\nb", "a  b"),
        ("", ""),
    ],
)
def test_escape_header(raw: str, escaped: str) -> None:
    """Header fields escape pipes and backslashes, keep '=' and turn line breaks into spaces."""
    assert cef.escape_header(raw) == escaped


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain text", "plain text"),
        ("a=b", "a\\=b"),
        ("a\\b", "a\\\\b"),
        ("\\=", "\\\\\\="),
        ("a|b", "a|b"),
        ("a\nb", "a\\nb"),
        ("a\r\nb", "a\\r\\nb"),
        ("x msg=forged", "x msg\\=forged"),
        ("trailing\\", "trailing\\\\"),
    ],
)
def test_escape_extension(raw: str, escaped: str) -> None:
    """Extension values escape '=', backslashes and line breaks, and leave pipes alone."""
    assert cef.escape_extension(raw) == escaped


@pytest.mark.parametrize(
    ("record", "line"),
    [
        (ALERT, ALERT_CEF),
        (CHECKPOINT, CHECKPOINT_CEF),
        (
            {"type": "alert", "id": "a|2", "kind": "odd|kind\\x", "severity": "warning"},
            "CEF:0|replayguard|replayguard|0.1.0|odd\\|kind\\\\x|Odd\\|kind\\\\x|6|externalId=a|2 cat=alert",
        ),
        (
            {"type": "alert", "id": "a3", "kind": "reuse", "severity": "info", "vm_id": "vm=1\nx",
             "summary": "s\\ms=1"},
            "CEF:0|replayguard|replayguard|0.1.0|reuse|One-time credential reused|3|"
            "externalId=a3 cat=alert cs1Label=vmId cs1=vm\\=1\\nx msg=s\\\\ms\\=1",
        ),
        (  # a hostile principal, quoted in the summary: CEF escapes its backslashes and '=' as any
            {"type": "alert", "id": "a6", "kind": "brute_force", "severity": "warning",
             "principal": 'a\\" : ok=1', "summary": '5 consecutive failures for "a\\\\\\" : ok=1": locked out'},
            "CEF:0|replayguard|replayguard|0.1.0|brute_force|Brute-force attempt|6|externalId=a6 cat=alert "
            'duser=a\\\\" : ok\\=1 msg=5 consecutive failures for "a\\\\\\\\\\\\" : ok\\=1": locked out',
        ),
        (
            {"type": "alert", "id": "a4", "kind": "brute_force", "severity": "warning", "principal": None},
            "CEF:0|replayguard|replayguard|0.1.0|brute_force|Brute-force attempt|6|externalId=a4 cat=alert",
        ),
        (
            {"type": "alert", "id": "a5", "kind": "new_kind", "severity": "critical",
             "first_seen": "2026-11-29T12:06:00.123+02:00"},
            "CEF:0|replayguard|replayguard|0.1.0|new_kind|New kind|9|"
            "start=1795946760123 externalId=a5 cat=alert",
        ),
    ],
)
def test_format_cef(record: dict[str, object], line: str) -> None:
    """A record becomes exactly this CEF:0 line, fields in a fixed order, absent ones omitted."""
    assert cef.format_cef(record, version="0.1.0") == line


def test_format_cef_version_is_escaped() -> None:
    """The device version is a header field too, so a pipe in it is escaped."""
    assert cef.format_cef(CHECKPOINT, version="1|2").startswith("CEF:0|replayguard|replayguard|1\\|2|")


def test_format_cef_truncates_msg() -> None:
    """The msg extension is cut to CEF's 1023-character maximum."""
    line = cef.format_cef({"type": "alert", "id": "a", "summary": "x" * 5000}, version="1")
    assert line.endswith("msg=" + "x" * 1023)


@pytest.mark.parametrize(
    ("record", "error"),
    [
        ({"type": "alert", "severity": "fatal"}, "unknown severity"),
        ({"type": "alert", "severity": 3}, "unknown severity"),
        ({"type": "alert", "last_seen": "2026-11-29T10:00:00"}, "without offset"),
        ({"type": "alert", "first_seen": "yesterday"}, "Invalid isoformat"),
    ],
)
def test_format_cef_refuses_malformed(record: dict[str, object], error: str) -> None:
    """Unknown severities and unparseable or offset-less times are refused, not guessed."""
    with pytest.raises(ValueError, match=error):
        cef.format_cef(record, version="1")


@pytest.mark.parametrize(
    ("severity", "facility", "pri", "cef_severity"),
    [
        ("info", 10, 86, 3),
        ("warning", 10, 84, 6),
        ("critical", 10, 82, 9),
        ("critical", 16, 130, 9),
        ("info", 0, 6, 3),
        ("warning", 23, 188, 6),
    ],
)
def test_severity_and_pri(severity: str, facility: int, pri: int, cef_severity: int) -> None:
    """PRI is facility*8 plus the syslog severity; CEF severity maps info 3, warning 6, critical 9."""
    record = {"type": "alert", "id": "x", "kind": "reuse", "severity": severity}
    message = cef.format_syslog(record, now=NOW, hostname="h", procid="1", facility=facility, version="1")
    assert message.startswith(f"<{pri}>1 ".encode())
    assert f"|{cef_severity}|externalId=x".encode() in message


def test_format_syslog_alert() -> None:
    """A full RFC 5424 message: PRI, VERSION, TIMESTAMP, HOSTNAME, APP-NAME, PROCID, MSGID, no SD, CEF."""
    message = cef.format_syslog(ALERT, now=NOW, hostname="hv-03", procid="4242", facility=10, version="0.1.0")
    assert message == f"<82>1 2026-11-29T10:06:01.000000Z hv-03 replayguard 4242 alert - {ALERT_CEF}".encode()


def test_format_syslog_checkpoint_msgid() -> None:
    """MSGID is the record type, and a record without severity is informational."""
    message = cef.format_syslog(CHECKPOINT, now=NOW, hostname="hv-03", procid="7", facility=4, version="0.1.0")
    assert message == f"<38>1 2026-11-29T10:06:01.000000Z hv-03 replayguard 7 checkpoint - {CHECKPOINT_CEF}".encode()


def test_format_syslog_bom_only_for_non_ascii() -> None:
    """A UTF-8 MSG carries the BOM RFC 5424 asks for; an ASCII MSG does not."""
    record = {"type": "alert", "id": "a", "summary": "café"}
    message = cef.format_syslog(record, now=NOW, hostname="h", procid="1", facility=10, version="1")
    assert b" - \xef\xbb\xbfCEF:0|" in message
    assert message.endswith("msg=café".encode())
    ascii_message = cef.format_syslog(CHECKPOINT, now=NOW, hostname="h", procid="1", facility=10, version="1")
    assert b"\xef\xbb\xbf" not in ascii_message


def test_format_syslog_refuses_bad_facility() -> None:
    """Facilities outside 0-23 do not exist in RFC 5424."""
    with pytest.raises(ValueError, match="facility"):
        cef.format_syslog(CHECKPOINT, now=NOW, hostname="h", procid="1", facility=24, version="1")


@pytest.mark.parametrize(
    ("value", "max_len", "field"),
    [
        ("hv-03", 255, "hv-03"),
        ("", 255, "-"),
        ("hv 03", 255, "hv_03"),
        ("héte", 255, "h_te"),
        ("a\tb\nc", 255, "a_b_c"),
        ("x" * 40, 32, "x" * 32),
    ],
)
def test_header_field(value: str, max_len: int, field: str) -> None:
    """Header fields hold printable US-ASCII only, are truncated to their limit, and '-' when empty."""
    assert cef.header_field(value, max_len) == field


@pytest.mark.parametrize(("char", "kept"), [
    ("\x20", False), ("\x21", True), ("\x7e", True), ("\x7f", False), ("\x00", False), ("\u00a0", False)])
def test_header_field_printable_bounds(char: str, kept: bool) -> None:
    """PRINTUSASCII is %d33-126 (RFC 5424 §6): space and DEL are the first characters outside it."""
    assert cef.header_field(f"a{char}b", 255) == (f"a{char}b" if kept else "a_b")


@pytest.mark.parametrize(("name", "limit"), [("hostname", 255), ("procid", 128), ("msgid", 32)])
def test_syslog_header_fields_stop_at_their_rfc5424_lengths(name: str, limit: int) -> None:
    """HOSTNAME 255, PROCID 128 and MSGID 32 characters (RFC 5424 §6): a field of exactly
    its limit is kept whole, one character longer is cut to it; APP-NAME is ours, 11 of 48."""
    header = {"hostname": 2, "procid": 4, "msgid": 5}[name]
    for length, kept in ((limit, limit), (limit + 1, limit)):
        value = "x" * length
        record = {**CHECKPOINT, "type": value} if name == "msgid" else CHECKPOINT
        kwargs = {"hostname": "h", "procid": "1", name: value} if name != "msgid" else {"hostname": "h", "procid": "1"}
        fields = cef.format_syslog(record, now=NOW, facility=4, version="1", **kwargs).split(b" ")
        assert fields[header] == b"x" * kept
        assert fields[3] == b"replayguard"


def test_syslog_msgid_of_a_record_without_type_is_nil() -> None:
    """A record with no ``type`` has the NILVALUE as MSGID, not an empty field."""
    record = {key: value for key, value in CHECKPOINT.items() if key != "type"}
    fields = cef.format_syslog(record, now=NOW, hostname="h", procid="1", facility=4, version="1").split(b" ")
    assert fields[5] == b"-"


@pytest.mark.parametrize(
    ("now", "stamp"),
    [
        (datetime(2026, 11, 29, 10, 6, 1, tzinfo=UTC), "2026-11-29T10:06:01.000000Z"),
        (datetime(2026, 11, 29, 10, 6, 1, 123456, tzinfo=UTC), "2026-11-29T10:06:01.123456Z"),
        (datetime(2026, 11, 29, 12, 6, 1, tzinfo=timezone(timedelta(hours=2))), "2026-11-29T10:06:01.000000Z"),
        (datetime(2026, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=-5))), "2026-01-01T05:00:00.000000Z"),
    ],
)
def test_rfc5424_timestamp(now: datetime, stamp: str) -> None:
    """TIMESTAMP is UTC with six fraction digits, whatever offset ``now`` carries."""
    assert cef.rfc5424_timestamp(now) == stamp


def test_rfc5424_timestamp_is_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TIMESTAMP never follows the machine's time zone."""
    import time

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        stamp = cef.rfc5424_timestamp(datetime(2026, 11, 29, 12, 6, 1, tzinfo=timezone(timedelta(hours=2))))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert stamp == "2026-11-29T10:06:01.000000Z"


def test_rfc5424_timestamp_refuses_naive() -> None:
    """A naive time has no defined instant, so it is refused."""
    with pytest.raises(ValueError, match="aware"):
        cef.rfc5424_timestamp(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("message", "frame"),
    [
        (b"abc", b"3 abc"),
        (b"", b"0 "),
        ("é".encode(), b"2 \xc3\xa9"),
        (b"x" * 1000, b"1000 " + b"x" * 1000),
    ],
)
def test_octet_counted(message: bytes, frame: bytes) -> None:
    """TCP framing prefixes the length in octets (not characters) and a space (RFC 6587 §3.4.1)."""
    assert cef.octet_counted(message) == frame


@pytest.mark.parametrize(
    ("value", "millis"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("2026-11-29T10:05:00Z", 1795946700000),
        ("2026-11-29T10:06:00.5Z", 1795946760500),
        ("2026-11-29T12:06:00.123+02:00", 1795946760123),
    ],
)
def test_rfc3339_to_epoch_ms(value: str, millis: int) -> None:
    """CEF times are epoch milliseconds, converted exactly (no float rounding)."""
    assert cef.rfc3339_to_epoch_ms(value) == millis
