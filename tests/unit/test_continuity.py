"""Ledger continuity, the pure rules: judging a held checkpoint, what a witness admits, the
recovery statement's signature, and which nonces a recorded recovery refuses."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from replayguard.core import checkpoints as cps
from replayguard.core import continuity
from replayguard.core.continuity import Admission, Verdict
from replayguard.errors import ConfigError
from replayguard.settings import load_settings

KEY = Ed25519PrivateKey.generate()
H = [bytes([i]) * 32 for i in range(8)]


def cp(seq: int, h: bytes, ts: int = 100) -> cps.Checkpoint:
    return cps.sign(KEY, seq, h, ts)


def statement(recovery_seq: int = 11, ts: int = 500, abandoned_seq: int = 20) -> continuity.Statement:
    return continuity.sign_statement(KEY, recovery_seq, H[7], ts, abandoned_seq, H[6])


@pytest.mark.parametrize(("held", "head", "hash_at", "recoveries", "verdict"), [
    (cp(10, H[1]), 12, H[1], [], Verdict.OK),
    (cp(10, H[1]), 10, H[1], [], Verdict.OK),
    (cp(15, H[1]), 12, None, [], Verdict.BEHIND),
    (cp(10, H[1]), 12, H[2], [], Verdict.FORKED),
    (cp(10, H[1]), 12, None, [], Verdict.FORKED),
    (cp(15, H[1], ts=400), 12, None, [statement()], Verdict.COVERED),
    (cp(15, H[1], ts=600), 12, None, [statement()], Verdict.BEHIND),  # newer than the recovery
    (cp(25, H[1], ts=400), 12, None, [statement()], Verdict.BEHIND),  # past what it abandoned
    (cp(12, H[1]), 12, H[2], [], Verdict.FORKED),  # at the head's seq with another hash: forked, not behind
    (cp(20, H[1], ts=400), 12, None, [statement()], Verdict.COVERED),  # exactly the abandoned seq
    (cp(15, H[1], ts=500), 12, None, [statement()], Verdict.COVERED),  # exactly the recovery's time
    (cp(21, H[1], ts=500), 12, None, [statement()], Verdict.BEHIND),  # one past the abandoned seq
    (cp(15, H[1], ts=501), 12, None, [statement()], Verdict.BEHIND),  # a microsecond after the recovery
])
def test_judge(held: cps.Checkpoint, head: int, hash_at: bytes | None, recoveries: list[continuity.Statement],
               verdict: Verdict) -> None:
    """A held checkpoint is fine when the ledger has its entry with its hash, covered when a
    recovery gave it up, else the ledger is behind it or forked from it."""
    assert continuity.judge(held, head, hash_at, recoveries) is verdict


@pytest.mark.parametrize(("held", "new", "recovery", "admission"), [
    (None, cp(3, H[1]), None, Admission.ACCEPT),
    (cp(3, H[1]), cp(3, H[1]), None, Admission.SAME),
    (cp(3, H[1]), cp(5, H[2]), None, Admission.ACCEPT),
    (cp(5, H[1]), cp(3, H[2]), None, Admission.STEPS_BACK),
    (cp(5, H[1]), cp(5, H[2]), None, Admission.FORKS),
    (cp(15, H[1], ts=400), cp(11, H[2], ts=500), statement(), Admission.RECOVERY),
    (cp(15, H[1], ts=400), cp(10, H[2], ts=500), statement(), Admission.STEPS_BACK),  # before the recovery entry
    (cp(15, H[1], ts=600), cp(11, H[2], ts=700), statement(), Admission.STEPS_BACK),  # a replayed old statement
    (cp(21, H[1], ts=400), cp(11, H[2], ts=500), statement(), Admission.STEPS_BACK),  # lost more than it says
])
def test_admit(held: cps.Checkpoint | None, new: cps.Checkpoint, recovery: continuity.Statement | None,
               admission: Admission) -> None:
    """A witness moves only forward, except onto a recovery that covers what it holds."""
    assert continuity.admit(held, new, recovery) is admission


@pytest.mark.parametrize(("held", "new", "admission"), [
    (cp(15, H[1], ts=600), cp(20, H[2], ts=400), Admission.FORKS),  # the abandoned chain's, a higher seq
    (cp(15, H[1], ts=600), cp(19, H[2], ts=500), Admission.FORKS),  # at the recovery's very time
    (cp(15, H[1], ts=600), cp(21, H[2], ts=400), Admission.ACCEPT),  # past what it abandoned
    (cp(15, H[1], ts=600), cp(16, H[2], ts=501), Admission.ACCEPT),  # signed after the recovery
    (cp(15, H[1], ts=500), cp(15, H[1], ts=500), Admission.SAME),  # the recovery's own checkpoint again
])
def test_admit_refuses_what_the_held_recovery_gave_up(held: cps.Checkpoint, new: cps.Checkpoint,
                                                      admission: Admission) -> None:
    """A witness refuses a checkpoint that the recovery it keeps gave up, whatever its seq."""
    assert continuity.admit(held, new, None, statement()) is admission


def test_a_witness_keeps_the_newest_recovery_statement() -> None:
    """An offer without a statement, or with an older one, leaves the witness's own in place."""
    old, new = statement(ts=300), statement(ts=500)
    assert continuity.newest_statement(None, new) == new
    assert continuity.newest_statement(new, None) == new
    assert continuity.newest_statement(new, old) == new
    assert continuity.newest_statement(old, new) == new


def test_statement_signature_and_json_round_trip() -> None:
    """A statement verifies under its key, survives JSON, and fails once altered or under another key."""
    st = statement()
    again = continuity.statement_from_json(continuity.statement_json(st))
    assert again == st and continuity.statement_valid(KEY.public_key(), again)
    altered = continuity.statement_from_json({**continuity.statement_json(st), "abandoned_seq": 99})
    assert not continuity.statement_valid(KEY.public_key(), altered)
    assert not continuity.statement_valid(Ed25519PrivateKey.generate().public_key(), st)
    with pytest.raises(ValueError, match="signature"):
        continuity.statement_from_json({**continuity.statement_json(st), "signature": "zz"})


RECOVERED_US = 1_000_000 * 1_000_000


@pytest.mark.parametrize(("issued_at_s", "now_s", "refused"), [
    (None, 1_000_100, True),  # no issued_at: the lost range may have used it
    (999_000, 1_000_100, True),  # issued before the recovery
    (1_000_030, 1_000_100, True),  # within the issuer clock's slack
    (1_000_061, 1_000_100, False),  # issued after the recovery
    (1_000_059.5, 1_000_100, True),  # half a second inside the slack
    (1_000_060, 1_000_100, False),  # exactly at the slack's end: after it
    (None, 1_000_000 + 3600, False),  # every nonce of that time has expired
    (None, 1_000_000 + 3599.5, True),  # half a second before that
])
def test_nonces_after_a_recovery(issued_at_s: float | None, now_s: float, refused: bool) -> None:
    """Nonces the lost range may have consumed are refused until they could not be accepted anyway."""
    issued = None if issued_at_s is None else datetime.fromtimestamp(issued_at_s, UTC)
    assert continuity.nonce_before_recovery(issued, now_s, RECOVERED_US, 3600) is refused
    assert continuity.nonce_before_recovery(issued, now_s, None, 3600) is False


def test_witness_settings() -> None:
    """Witnesses come comma-separated from the environment; a relative file or other scheme stops start-up."""
    settings = load_settings(env={"REPLAYGUARD_WITNESSES": "file:/srv/w.json, https://peer:8443",
                                  "REPLAYGUARD_WITNESS_REQUIRED": "true"})
    assert settings.witnesses == ("file:/srv/w.json", "https://peer:8443") and settings.witness_required is True
    for bad in ("file:w.json", "ftp://x"):
        with pytest.raises(ConfigError, match="witness"):
            load_settings(env={"REPLAYGUARD_WITNESSES": bad})
    with pytest.raises(ConfigError, match="witness_required"):
        load_settings(env={"REPLAYGUARD_WITNESS_REQUIRED": "perhaps"})


WITNESS_PASSWORD = "hunter2WitnessPw"


@pytest.mark.parametrize("url", [f"http://ops:{WITNESS_PASSWORD}@127.0.0.1:8443", "https://ops@peer",
                                 f"https://peer/?token={WITNESS_PASSWORD}", f"https://peer/#{WITNESS_PASSWORD}",
                                 "http://:8443"])
def test_witness_url_with_credentials_query_or_fragment_is_refused_without_showing_it(url: str) -> None:
    """An HTTP witness's URL names it in /metrics, logs and alerts, so credentials, a query or a
    fragment in it (or no host) stop start-up with one line that never shows a password."""
    with pytest.raises(ConfigError, match=r"^witnesses: ") as caught:
        load_settings(env={"REPLAYGUARD_WITNESSES": url})
    assert WITNESS_PASSWORD not in caught.value.message and "\n" not in caught.value.message


def test_http_witness_is_named_by_scheme_host_port_and_path() -> None:
    """An HTTP witness is shown as scheme://host:port/path, whatever else its URL held."""
    from replayguard.services.witness import HttpWitness

    assert HttpWitness("https://peer:8443/base", "d", None).name == "https://peer:8443/base"
    assert HttpWitness("http://[::1]:9", "d", None).name == "http://[::1]:9"
    named = HttpWitness(f"http://ops:{WITNESS_PASSWORD}@127.0.0.1:9/x?k={WITNESS_PASSWORD}#f", "d", None).name
    assert named == "http://127.0.0.1:9/x"


async def test_http_witness_whose_url_aiohttp_refuses_is_unreachable() -> None:
    """A witness URL with credentials and a witness_token (aiohttp raises ValueError before any
    connection) reads as unreachable, naming no password, not as a traceback."""
    from replayguard.services.witness import HttpWitness, WitnessUnreachable

    witness = HttpWitness(f"http://ops:{WITNESS_PASSWORD}@127.0.0.1:9", "d", "rgt_" + "w" * 43)
    with pytest.raises(WitnessUnreachable) as caught:
        await witness.read()
    assert WITNESS_PASSWORD not in str(caught.value)


def test_witness_settings_from_toml_and_flags(tmp_path: Path) -> None:
    """A TOML list and repeated --witness flags give the same tuple."""
    path = tmp_path / "rg.toml"
    path.write_text('witnesses = ["file:/a", "http://b:1"]\nwitness_required = true\n')
    assert load_settings(env={}, config_file=path).witnesses == ("file:/a", "http://b:1")
    assert load_settings(env={}, config_file=path).witness_required is True
    assert load_settings(flags={"witnesses": ["file:/c"]}, env={}).witnesses == ("file:/c",)


def test_a_checkpoint_past_the_head_is_a_missing_tail() -> None:
    """A signed checkpoint naming an entry past the ledger's end is reported at the first missing seq."""
    from replayguard.core.chain import GENESIS
    from replayguard.core.ledger_check import ChainChecker, Problem, past_head

    finding = ChainChecker(checkpoints={15: H[1]}).finish(0, GENESIS)
    assert finding is not None and finding.problem is Problem.MISSING_TAIL and finding.seq == 1
    assert "names entry 15 but the ledger ends at 0: entries 1 to 15" in finding.message
    assert past_head(12, 12) is None
    assert ChainChecker().finish(0, GENESIS) is None  # an empty ledger with no checkpoint is whole


@pytest.mark.parametrize("key_id", [7, "", None])
def test_a_statement_without_a_key_id_string_is_refused(key_id: object) -> None:
    """A recovery statement's key_id must be a non-empty string, like a checkpoint's."""
    with pytest.raises(ValueError, match="key_id"):
        continuity.statement_from_json({**continuity.statement_json(statement()), "key_id": key_id})
