"""core.mac: HMAC with each key's padded blocks hashed once is HMAC, byte for byte."""

from __future__ import annotations

import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replayguard.core.mac import KeyedMac, keyed

# RFC 2202 §3 (HMAC-SHA-1) and RFC 4231 §4 (HMAC-SHA-256, HMAC-SHA-512): key, data, MAC.
# The last cases of each use a key longer than the hash's block, which is hashed first.
VECTORS = [
    ("sha1", b"\x0b" * 20, b"Hi There", "b617318655057264e28bc0b6fb378c8ef146be00"),
    ("sha1", b"Jefe", b"what do ya want for nothing?", "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"),
    ("sha1", b"\xaa" * 20, b"\xdd" * 50, "125d7342b9ac11cd91a39af48aa17b4f63f175d3"),
    ("sha1", b"\xaa" * 80, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "aa4ae5e15272d00e95705637ce8a3b55ed402112"),
    ("sha256", b"\x0b" * 20, b"Hi There",
     "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    ("sha256", b"Jefe", b"what do ya want for nothing?",
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    ("sha256", b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
    ("sha512", b"\x0b" * 20, b"Hi There",
     "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
     "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854"),
    ("sha512", b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f352"
     "6b56d037e05f2598bd0fd2215d6a1e5295e64f73f63f0aec8b915a985d786598"),
]


@pytest.mark.parametrize(("name", "key", "data", "expected"), VECTORS)
def test_rfc_vectors(name: str, key: bytes, data: bytes, expected: str) -> None:
    """The RFC 2202 and RFC 4231 vectors, short keys and keys longer than a block."""
    assert KeyedMac(key, name).digest(data).hex() == expected


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["sha1", "sha256", "sha512"]), key=st.binary(max_size=300),
       messages=st.lists(st.binary(max_size=400), min_size=1, max_size=4))
def test_same_as_hmac_digest(name: str, key: bytes, messages: list[bytes]) -> None:
    """Any key (empty, a block long, longer) and any messages: what ``hmac.digest`` gives,
    also for several messages in turn under one kept key (the kept states are copied, not used up)."""
    mac = KeyedMac(key, name)
    for message in messages:
        assert mac.digest(message) == hmac.digest(key, message, name)
        assert keyed(key, name).digest(message) == hmac.digest(key, message, name)


def test_keys_do_not_share_state() -> None:
    """Two keys that differ in one byte each give their own HMAC, as ``hmac.digest`` does."""
    a, b = b"k" * 32, b"k" * 31 + b"j"
    assert keyed(a).digest(b"m") != keyed(b).digest(b"m")
    assert keyed(a).digest(b"m") == hmac.digest(a, b"m", "sha256")
    assert keyed(b).digest(b"m") == hmac.digest(b, b"m", "sha256")


def test_an_unknown_hash_is_refused() -> None:
    """Only the hashes OTP secrets and our own MACs use are offered."""
    with pytest.raises(KeyError):
        KeyedMac(b"key", "md5")
