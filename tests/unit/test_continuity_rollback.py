"""How a rollback names its holder in messages and alert summaries: the service's own words
for itself and the database's checkpoints, a witness's name quoted as summaries show names
the service did not choose (``core/summaries.py``)."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from replayguard.core import checkpoints as cps
from replayguard.core.continuity import Verdict
from replayguard.services.continuity_rollback import DATABASE, SELF, Rollback

HELD = cps.sign(Ed25519PrivateKey.generate(), 15, b"\x01" * 32, 100)
# A witness file's path may hold anything a path may: quotes, a summary's words, a backslash.
WITNESS = 'file:/srv/w "ledger ok": no action needed\\'


def test_a_witness_is_named_quoted() -> None:
    """A witness's checkpoint, behind or forked: its name is one JSON string in the message,
    which decodes to the name and ends where the service's own words resume."""
    shown = json.dumps(WITNESS)
    assert Rollback.of(WITNESS, HELD, Verdict.BEHIND, 12).message() == (
        f"the ledger went back in time: {shown} holds a signed checkpoint of entry 15 but the ledger ends at 12")
    assert Rollback.of(WITNESS, HELD, Verdict.FORKED, 20).message() == (
        f"the ledger forked: {shown} holds a signed checkpoint of entry 15 with another hash than the ledger's")


def test_the_services_own_holders_are_named_in_its_words() -> None:
    """The database's own checkpoints and this process are named plainly, whatever the verdict."""
    assert Rollback.of(DATABASE, HELD, Verdict.BEHIND, 12).message().startswith(
        "the ledger went back in time: database checkpoints holds a signed checkpoint of entry 15")
    assert Rollback(SELF, 9, None, Verdict.BEHIND, 7).message().startswith(
        "the ledger went back in time: this service process answered a decision at entry 9")
    assert Rollback(SELF, 9, b"\x02" * 32, Verdict.FORKED, 12).message().startswith(
        "the ledger went back in time: this service process knew entry 9 committed")
