"""Opaque page cursors the service can recognise as its own.

A cursor is ``base64url(tag || kind ":" value)`` where ``tag`` is the first 16 bytes of
HMAC-SHA256 under a key derived from the pepper. A cursor the service did not issue (made
up, edited, another deployment's, or for another listing) fails the tag and is a 400;
callers still range-check the value, so even a forged tag could not reach the database
with a value it cannot hold.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from ..errors import InvalidRequest
from .mac import keyed
from .validation import MAX_ID

TAG_BYTES = 16
MAX_KIND_CHARS = 16
# The longest cursor issued: the tag, the longest kind and ":", and an identifier (a VM id,
# a principal) of MAX_ID characters of four UTF-8 bytes each, base64url without padding.
MAX_CURSOR_CHARS = -(-(TAG_BYTES + MAX_KIND_CHARS + 1 + 4 * MAX_ID) * 4 // 3)


def cursor_key(pepper: bytes) -> bytes:
    """The key that tags cursors (a sub-key: the pepper itself never MACs anything public)."""
    return keyed(pepper).digest(b"replayguard-cursor-key")


def _tag(key: bytes, body: bytes) -> bytes:
    return keyed(key).digest(body)[:TAG_BYTES]


def issue(key: bytes, kind: str, value: str) -> str:
    if not 0 < len(kind) <= MAX_KIND_CHARS or not kind.isascii():
        raise ValueError(f"a cursor kind is 1 to {MAX_KIND_CHARS} ASCII characters")
    body = f"{kind}:{value}".encode()
    return base64.urlsafe_b64encode(_tag(key, body) + body).decode("ascii").rstrip("=")


def open_cursor(key: bytes, kind: str, text: str) -> str:
    """The value of a cursor this service issued for ``kind``; anything else is a 400."""
    refused = InvalidRequest("cursor is not one this service issued", field="cursor")
    if not 0 < len(text) <= MAX_CURSOR_CHARS or not text.isascii():
        raise refused
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise refused from None
    tag, body = raw[:TAG_BYTES], raw[TAG_BYTES:]
    if len(tag) != TAG_BYTES or not hmac.compare_digest(tag, _tag(key, body)):
        raise refused
    prefix = f"{kind}:".encode()
    if not body.startswith(prefix):
        raise refused
    try:
        return body[len(prefix):].decode()
    except UnicodeDecodeError:
        raise refused from None
