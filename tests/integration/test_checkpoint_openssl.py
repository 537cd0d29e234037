"""A signed checkpoint checked by plain OpenSSL, as the README tells a third party to.

The signed bytes are rebuilt from the checkpoint's JSON by the README's description
(``replayguard-checkpoint-v1\\n<seq>\\n<hash hex>\\n<ts_us>\\n``), not by our code, and
``openssl pkeyutl -verify -pubin -rawin`` checks them against the PEM our code exports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from replayguard.core import checkpoints as cps

from ..unit.test_ledger_check import RFC8032_SECRET

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="needs the openssl command (scripts/system-deps)")


def readme_message(checkpoint: dict[str, object]) -> bytes:
    """The signed bytes as the README describes them, from the JSON form alone."""
    return f"replayguard-checkpoint-v1\n{checkpoint['seq']}\n{checkpoint['hash']}\n{checkpoint['ts_us']}\n".encode()


def openssl_verifies(tmp_path: Path, public_pem: str, message: bytes, signature_hex: str) -> bool:
    (tmp_path / "pub.pem").write_text(public_pem)
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "sig").write_bytes(bytes.fromhex(signature_hex))
    run = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin", "-in", "msg",
                          "-sigfile", "sig"], cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False)
    return run.returncode == 0 and "Signature Verified Successfully" in run.stdout


def test_openssl_verifies_a_checkpoint_from_its_json_and_refuses_an_altered_one(tmp_path: Path) -> None:
    """Our exported PEM and a checkpoint's JSON are all OpenSSL needs; a changed seq, hash
    or time, or another key, fails its check."""
    key = Ed25519PrivateKey.generate()
    checkpoint = json.loads(json.dumps(cps.to_json(cps.sign(key, 1234, bytes(range(32)), 1_790_000_000_000_001))))
    pem = cps.public_key_pem(key.public_key())
    assert openssl_verifies(tmp_path, pem, readme_message(checkpoint), str(checkpoint["signature"]))
    for change in ({"seq": 1235}, {"hash": "00" * 32}, {"ts_us": 1_790_000_000_000_002}):
        assert not openssl_verifies(tmp_path, pem, readme_message({**checkpoint, **change}),
                                    str(checkpoint["signature"]))
    other = cps.public_key_pem(Ed25519PrivateKey.generate().public_key())
    assert not openssl_verifies(tmp_path, other, readme_message(checkpoint), str(checkpoint["signature"]))


def test_openssl_signs_the_same_bytes_to_the_same_signature(tmp_path: Path) -> None:
    """Ed25519 is deterministic: OpenSSL, given RFC 8032's first test key and the README's
    bytes, produces the very signature our code put in the checkpoint."""
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(RFC8032_SECRET))
    checkpoint = cps.to_json(cps.sign(key, 42, bytes(range(32, 64)), 1_790_000_000_123_456))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (tmp_path / "msg").write_bytes(readme_message(checkpoint))
    subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", "key.pem", "-in", "msg", "-out", "sig"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=30)
    assert (tmp_path / "sig").read_bytes().hex() == checkpoint["signature"]
