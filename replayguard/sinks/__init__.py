"""External alert sinks: copies of alerts and checkpoints written outside, in real time.

An intruder who owns a VM can erase what is logged inside it, never what already left
the host. ``SinkDispatcher.submit`` is called on the decision path, so it is synchronous,
never touches the network and never raises. Each sink has a lane: the record is appended
to the lane's spool file (the durable outbox, ``<spool_dir>/<name>.jsonl``) and, while
there is room, to a bounded in-memory queue that spares re-reading the disk. One task per
lane delivers in spool order and commits the delivered byte offset to ``<name>.cursor``
(atomic rename), so a sink that is down, or a restart, loses nothing: delivery resumes at
the cursor. Delivery is at-least-once; every record carries its ``id`` for receivers that
must deduplicate (a crash between a send and its cursor commit repeats that batch).

Sinks: an append-only JSON-lines file, syslog (RFC 5424, UDP or TCP with RFC 6587
octet counting) carrying CEF lines (``core/cef.py``), an HTTP webhook with an optional
HMAC-SHA256 signature, and Splunk's HTTP Event Collector; file and webhook sinks may
carry ECS documents or OCSF Detection Findings instead (``core/siem.py``).
"""

from .config import SinkConfig, SinkKind, parse_sink, parse_sink_spec
from .dispatcher import Backoff, SinkDispatcher, SinkStats
from .outbox import Spool
from .transports import (
    Clock,
    DeliveryError,
    FileSink,
    Record,
    Sink,
    SplunkSink,
    SyslogSink,
    WebhookSink,
    build_sink,
    webhook_signature_headers,
)

__all__ = [
    "Backoff",
    "Clock",
    "DeliveryError",
    "FileSink",
    "Record",
    "Sink",
    "SinkConfig",
    "SinkDispatcher",
    "SinkKind",
    "SinkStats",
    "SplunkSink",
    "Spool",
    "SyslogSink",
    "WebhookSink",
    "build_sink",
    "parse_sink",
    "parse_sink_spec",
    "webhook_signature_headers",
]
