"""The relay spool's own safety: private directories, no-follow writes, a bounded dead/, signed posts."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from replayguard.core.signatures import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from replayguard.durable import atomic_write
from replayguard.errors import ConfigError
from replayguard.relay.spool import Spool, private_dir, signed_headers
from replayguard.settings import Secret


def test_a_new_spool_directory_is_created_0700(tmp_path: Path) -> None:
    """The relay creates its spool and dead/ readable and writable by its own user only."""
    Spool(tmp_path / "spool")
    for path in (tmp_path / "spool", tmp_path / "spool" / "dead"):
        assert path.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_spool_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    """A pre-existing spool writable by group or others is refused with one line naming the fix."""
    path = tmp_path / "spool"
    path.mkdir()
    path.chmod(mode)
    with pytest.raises(ConfigError) as caught:
        Spool(path)
    assert "writable by group or others" in caught.value.message and "\n" not in caught.value.message


def test_a_symlinked_spool_is_refused(tmp_path: Path) -> None:
    """A spool path that is a symlink is refused: the relay names real directories only."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ConfigError, match="symlink"):
        private_dir(tmp_path / "link")


def test_a_dead_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    """dead/ is held to the same rule as the spool itself."""
    (tmp_path / "dead").mkdir()
    (tmp_path / "dead").chmod(0o777)
    tmp_path.chmod(0o700)
    with pytest.raises(ConfigError, match="dead/"):
        Spool(tmp_path)


def test_atomic_write_never_follows_a_planted_temp_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A symlink at the temp name is an error, and the file it points to is left as it was."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"root only")
    monkeypatch.setattr(secrets, "token_hex", lambda _n: "fixed")  # the module durable names its temp files with
    (tmp_path / ".cursor.json.fixed.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "cursor.json", b"{}")
    assert victim.read_bytes() == b"root only" and not (tmp_path / "cursor.json").exists()


def test_atomic_write_replaces_a_symlink_at_the_target_not_its_target(tmp_path: Path) -> None:
    """A symlink planted at the file's own name is replaced by the file; what it pointed to is untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"root only")
    (tmp_path / "cursor.json").symlink_to(victim)
    atomic_write(tmp_path / "cursor.json", b"{}")
    assert victim.read_bytes() == b"root only"
    assert not (tmp_path / "cursor.json").is_symlink() and (tmp_path / "cursor.json").read_bytes() == b"{}"


def test_an_old_predictable_temp_symlink_is_harmless(tmp_path: Path) -> None:
    """A symlink at the temp name older relays used is removed at start and never written through."""
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.write_bytes(b"root only")
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    (spool / ".proxmox-cursor.json.tmp").symlink_to(victim)
    Spool(spool)
    atomic_write(spool / "proxmox-cursor.json", b"{}")
    assert victim.read_bytes() == b"root only"


def test_dead_letters_are_bounded_and_counted(tmp_path: Path) -> None:
    """dead/ keeps at most dead_max letters, dropping the oldest and counting each drop."""
    spool = Spool(tmp_path, dead_max=3)
    for i in range(5):
        spool.bury(spool.put_bytes(f"e{i}", b'{"event_id": "e%d"}' % i))
    assert len(spool.dead_letters()) == 3 and spool.dead_dropped == 2
    assert next(p.read_bytes() for p in spool.dead_letters()) == b'{"event_id": "e2"}'


def test_an_id_waiting_in_the_spool_is_not_spooled_twice(tmp_path: Path) -> None:
    """Spooling an id that is still waiting keeps the one file (a re-poll or a VEBA resend)."""
    spool = Spool(tmp_path)
    first = spool.put_bytes("UPID:1", b"{}")
    assert spool.put_bytes("UPID:1", b"{}") == first and len(spool.pending()) == 1


def test_signed_headers_are_what_the_service_verifies() -> None:
    """The relay's headers pass the service's own verification with the same secret."""
    body = b'{"event_id": "e1"}'
    headers = signed_headers(Secret("s3cret"), body, 1_790_000_000.0)
    verify_signature(b"s3cret", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER], 1_790_000_001.0, 300)
    assert signed_headers(None, body, 0.0) == {}


def test_mkdir_failure_is_one_line(tmp_path: Path) -> None:
    """A spool that cannot be created is a ConfigError naming it, not a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create"):
        private_dir(blocker / "spool")
    assert os.path.exists(blocker)


def test_cli_reads_the_event_secret_from_a_file_or_the_environment(tmp_path: Path) -> None:
    """--event-hmac-secret-file wins over REPLAYGUARD_RELAY_EVENT_HMAC_SECRET;
    neither means unsigned; an empty file is an error."""
    from replayguard.relay.options import event_secret

    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    env = {"REPLAYGUARD_RELAY_EVENT_HMAC_SECRET": "from-env"}
    assert (found := event_secret(str(secret_file), env)) is not None and found.reveal() == "from-file"
    assert (found := event_secret(None, env)) is not None and found.reveal() == "from-env"
    assert event_secret(None, {}) is None
    secret_file.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        event_secret(str(secret_file), {})
