"""Page cursors: only one this service issued, for this listing, opens; anything else is
the contract's 400 naming the ``cursor`` field, never another error."""

from __future__ import annotations

import base64

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


def test_an_issued_cursor_opens_for_its_listing_only() -> None:
    """A cursor opens to its value under its key and kind; another kind or key refuses it."""
    text = cursors.issue(KEY, "alerts", "1234:99")
    assert "=" not in text and text.isascii()
    assert cursors.open_cursor(KEY, "alerts", text) == "1234:99"
    refused(text, kind="vms")
    refused(text, key=cursors.cursor_key(b"q" * 32))


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
