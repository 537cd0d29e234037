"""HMAC (RFC 2104) under keys used for many messages: each key's padded blocks are hashed once.

``hmac.digest`` hashes ``key ^ ipad`` and ``key ^ opad`` again on every call, and under
OpenSSL 3 it also looks the digest up each time; a decision computes three to six MACs
under the same few keys (the pepper, the receipt key, an OTP secret). ``keyed`` keeps,
per key, the two hash states after their first block, and a MAC is then two copies and
two updates. The result is HMAC itself, byte for byte (tests/unit/test_mac.py holds it to
``hmac.digest`` and to the RFC 2202 and RFC 4231 vectors).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hashlib import _Hash

_HASHES: dict[str, Callable[..., _Hash]] = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


class KeyedMac:
    """HMAC under one key with one hash function."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes, hash_name: str) -> None:
        new = _HASHES[hash_name]
        block = new().block_size
        if len(key) > block:  # RFC 2104 §2: a longer key is hashed first
            key = new(key).digest()
        key = key.ljust(block, b"\x00")
        self._inner = new(key.translate(_IPAD))
        self._outer = new(key.translate(_OPAD))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


# The working set is a handful of keys (pepper, receipt key, cursor key) plus the OTP secrets,
# which _KeyedHOTP holds itself; these keys are in the process's memory already.
@functools.lru_cache(maxsize=64)
def keyed(key: bytes, hash_name: str = "sha256") -> KeyedMac:
    """The ``KeyedMac`` of ``key``, made once per key."""
    return KeyedMac(key, hash_name)
