"""Page cursors: only one this service issued, for this listing, opens; anything else is
the contract's 400 naming the ``cursor`` field, never another error."""

from __future__ import annotations

import base64
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replayguard.core import cursors
from replayguard.core.validation import MAX_ID
from replayguard.errors import InvalidRequest

KEY = cursors.cursor_key(b"p" * 32)


def refused(text: str, kind: str = "alerts", key: bytes = KEY) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        cursors.open_cursor(key, kind, text)
    assert caught.value.field == "cursor"
    return caught.value


def test_a_cursor_opens_only_under_its_key_and_kind() -> None:
    """A cursor round-trips (unpadded ASCII); another key, another kind, an edited byte or a
    truncation is refused; the key is a sub-key of the pepper, never the pepper itself."""
    text = cursors.issue(KEY, "vms", "web-01 ü")
    assert "=" not in text and text.isascii()
    assert cursors.open_cursor(KEY, "vms", text) == "web-01 ü"
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    edited = base64.urlsafe_b64encode(raw[:-1] + bytes([raw[-1] ^ 1])).decode().rstrip("=")
    for bad, kind in ((text, "alerts"), (edited, "vms"), (text[:-2], "vms"), ("", "vms"), ("é", "vms")):
        refused(bad, kind=kind)
    refused(text, kind="vms", key=cursors.cursor_key(b"q" * 32))
    assert hmac.digest(b"p" * 32, b"replayguard-cursor-key", "sha256") == KEY


def test_a_forged_tag_of_the_right_length_is_refused() -> None:
    """Another 16-byte tag over the same body, or the right tag over another body, is refused."""
    raw = base64.urlsafe_b64decode(cursors.issue(KEY, "alerts", "1") + "==")
    tag, body = raw[:cursors.TAG_BYTES], raw[cursors.TAG_BYTES:]
    forged_tag = bytes([tag[0] ^ 1]) + tag[1:]
    for forged in (forged_tag + body, tag + b"alerts:2", tag + body + b"0"):
        refused(base64.urlsafe_b64encode(forged).decode().rstrip("="))


@pytest.mark.parametrize("text", ["", "é" + "A" * 30, "A" * (cursors.MAX_CURSOR_CHARS + 1), "!!!!", "QQ", "A"])
def test_malformed_text_is_refused(text: str) -> None:
    """Empty, non-ASCII, longer than the bound, not base64, or shorter than a tag: refused."""
    refused(text)


@pytest.mark.parametrize("kind", ["alerts", "vms", "principals"])
def test_a_cursor_after_the_longest_identifier_opens(kind: str) -> None:
    """A listing whose page ends at a VM id or principal of MAX_ID four-byte characters
    issues a cursor that opens again: paging never stops at a hostile but valid name."""
    value = "\U0001F600" * MAX_ID
    text = cursors.issue(KEY, kind, value)
    assert len(text) <= cursors.MAX_CURSOR_CHARS
    assert cursors.open_cursor(KEY, kind, text) == value


def test_a_cursor_of_exactly_the_bound_is_read() -> None:
    """The longest kind and identifier make a cursor of exactly MAX_CURSOR_CHARS, which is read;
    one character more is refused before any decoding (test_malformed_text_is_refused)."""
    kind, value = "k" * cursors.MAX_KIND_CHARS, "\U0001F600" * MAX_ID
    text = cursors.issue(KEY, kind, value)
    assert len(text) == cursors.MAX_CURSOR_CHARS
    assert cursors.open_cursor(KEY, kind, text) == value


@pytest.mark.parametrize("kind", ["", "k" * 17, "vmś"])
def test_a_kind_the_bound_does_not_cover_is_a_programming_error(kind: str) -> None:
    """Issuing under a kind longer than MAX_KIND_CHARS (or empty, or not ASCII) raises at once
    instead of issuing a cursor that might not open."""
    with pytest.raises(ValueError, match="kind"):
        cursors.issue(KEY, kind, "x")


def test_a_body_that_is_not_utf8_is_refused() -> None:
    """A correctly tagged body whose value is not UTF-8 (only we can tag, but the check holds) is refused."""
    body = b"alerts:\xff\xfe"
    raw = cursors._tag(KEY, body) + body
    refused(base64.urlsafe_b64encode(raw).decode().rstrip("="))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_a_value_or_the_400(text: str) -> None:
    """Whatever a client sends, the answer is the value of a cursor we issued or the 400."""
    try:
        cursors.open_cursor(KEY, "alerts", text)
    except InvalidRequest as exc:
        assert exc.field == "cursor"
