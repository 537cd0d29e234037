"""Every bad setting stops start-up the same way: one line on stderr, exit status 2, no traceback.

Each row of the table is run as a real subprocess (``python -m replayguard ...``) with a
database URL that works (the data dir rows: on the embedded default), so the row's own
problem is the only thing wrong; the checks run
before the port is opened (nothing is logged, so no ``serving`` line either).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env, run_cli

NOBODY = 65534
PASSWORD = "hunter2-never-shown"  # in a URL of a row: no message may show it
Setup = Callable[[Path], tuple[list[str], dict[str, str]]]


def _key(path: Path, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(mode)
    return path


def data_dir_is_a_file(tmp: Path) -> tuple[list[str], dict[str, str]]:
    (tmp / "file").write_text("x")
    return ["--data-dir", str(tmp / "file")], {}


def data_dir_under_proc(tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["--data-dir", "/proc/nope"], {}


def bogus_sink(tmp: Path) -> tuple[list[str], dict[str, str]]:
    return [], {"REPLAYGUARD_SINKS": "bogus"}


def misspelled_variable(tmp: Path) -> tuple[list[str], dict[str, str]]:
    return [], {"REPLAYGUARD_LOCKOUT_TRESHOLD": "3"}


def unknown_toml_key(tmp: Path) -> tuple[list[str], dict[str, str]]:
    (tmp / "rg.toml").write_text("lockout_treshold = 3\n")
    return ["--config", str(tmp / "rg.toml")], {}


def missing_config_file(tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["--config", str(tmp / "absent.toml")], {}


def readable_toml_with_secret(tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = tmp / "rg.toml"
    path.write_text('webhook_secret = "s3cret"\n')
    path.chmod(0o644)
    return ["--config", str(path)], {}


def readable_secret_file(tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = tmp / "hmac"
    path.write_text("s3cret\n")
    path.chmod(0o644)
    return [], {"REPLAYGUARD_EVENT_HMAC_SECRET_FILE": str(path)}


def key_readable_by_others(tmp: Path) -> tuple[list[str], dict[str, str]]:
    _key(tmp / "data" / "keys" / "pepper.key", 0o644)
    return [], {}


def keys_dir_open_to_all(tmp: Path) -> tuple[list[str], dict[str, str]]:
    key = _key(tmp / "data" / "keys" / "signing.key")
    key.parent.chmod(0o777)
    return [], {}


def key_of_another_user(tmp: Path) -> tuple[list[str], dict[str, str]]:
    key = _key(tmp / "data" / "keys" / "receipt.key")
    os.chown(key, NOBODY, NOBODY)
    return [], {}


def data_dir_open_to_all_before_keys(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """No keys yet, in a data dir others can write: refused before any key is written (and every later run)."""
    (tmp / "data").mkdir()
    (tmp / "data").chmod(0o777)
    return [], {}


def keys_dir_of_another_user(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """An empty keys dir planted by someone else (owner nobody, mode 777) is never filled with keys."""
    keys = tmp / "data" / "keys"
    keys.mkdir(parents=True)
    keys.parent.chmod(0o700)
    keys.chmod(0o777)
    os.chown(keys, NOBODY, NOBODY)
    return [], {}


def data_dir_of_unknown_user(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """``~user`` of a user the system does not know (expanduser raises RuntimeError)."""
    return ["--data-dir", "~rg_no_such_user_zz/data"], {}


def nul_in_toml_path(tmp: Path) -> tuple[list[str], dict[str, str]]:
    (tmp / "rg.toml").write_text('pepper_file = "/tmp/rg\\u0000x"\n')
    return ["--config", str(tmp / "rg.toml")], {}


def config_file_not_utf8(tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = tmp / "rg.toml"
    path.write_bytes(b'log_level = "info\xff"\n')
    path.chmod(0o600)
    return ["--config", str(path)], {}


def secret_file_not_utf8(tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = tmp / "hmac"
    path.write_bytes(b"\xff\xfe-not-text\n")
    path.chmod(0o600)
    return [], {"REPLAYGUARD_EVENT_HMAC_SECRET_FILE": str(path)}


def empty_secret_file(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """A credential file created but never filled: an HMAC key anyone knows."""
    path = tmp / "hmac"
    path.write_text("\n")
    path.chmod(0o600)
    return [], {"REPLAYGUARD_EVENT_HMAC_SECRET_FILE": str(path)}


def port_not_a_number(tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["--port", "eighty"], {}


def unknown_flag(tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["--lockout-treshold", "3"], {}


def bad_choice(tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["--receipt-reaction", "ignore"], {}


def redis_url_bad_option(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """A query option the Redis client cannot read (it raised only once the pool was open)."""
    return ["--redis-url", f"redis://:{PASSWORD}@127.0.0.1:6379/5?socket_timeout=zz"], {}


CASES: list[tuple[Setup, str]] = [
    (data_dir_is_a_file, "is not a directory"),
    (data_dir_under_proc, "cannot create data dir /proc/nope"),
    (bogus_sink, "sinks: sink 'bogus'"),
    (misspelled_variable, "unknown environment variable REPLAYGUARD_LOCKOUT_TRESHOLD"),
    (unknown_toml_key, "unknown settings: lockout_treshold"),
    (missing_config_file, "cannot read config file"),
    (readable_toml_with_secret, "config file with secrets"),
    (readable_secret_file, "secret file"),
    (key_readable_by_others, "chmod 600"),
    (keys_dir_open_to_all, "chmod go-w"),
    (data_dir_open_to_all_before_keys, "can be written by others (mode 777): run chmod go-w"),
    (data_dir_of_unknown_user, "data_dir has an invalid value"),
    (nul_in_toml_path, "pepper_file has an invalid value"),
    (config_file_not_utf8, "is not UTF-8 text"),
    (secret_file_not_utf8, "event_hmac_secret file"),
    (empty_secret_file, "event_hmac_secret is empty"),
    (port_not_a_number, "port has an invalid value"),
    (unknown_flag, "unrecognized arguments: --lockout-treshold"),
    (bad_choice, "receipt_reaction must be one of flag, refuse"),
    (redis_url_bad_option, "redis_url: Invalid value for 'socket_timeout'"),
]
if os.geteuid() == 0:
    CASES.append((key_of_another_user, "belongs to user nobody"))
    CASES.append((keys_dir_of_another_user, "belongs to user nobody"))


KEY_CASES = (key_readable_by_others, keys_dir_open_to_all, key_of_another_user,  # migrate reads no keys
             data_dir_open_to_all_before_keys, keys_dir_of_another_user)
RUNS = [(command, setup, expected) for command in ("serve", "migrate") for setup, expected in CASES
        if not (command == "migrate" and setup in KEY_CASES)]


@pytest.mark.parametrize(("command", "setup", "expected"), RUNS, ids=[f"{s.__name__}-{c}" for c, s, _ in RUNS])
def test_bad_setting_is_one_line_and_exit_2(tmp_path: Path, database_url: str, command: str,
                                            setup: Setup, expected: str) -> None:
    """The bad setting stops the command with exit 2 and one line naming the problem, no traceback, no new key."""
    args, env = setup(tmp_path)
    planted = sorted(tmp_path.glob("data/keys/*.key"))
    if "--data-dir" not in args:
        args += ["--data-dir", str(tmp_path / "data")]
    if command == "serve":
        args += ["--port", "0"] if "--port" not in args else []  # any port: start-up stops before binding
    if setup not in (data_dir_is_a_file, data_dir_under_proc):  # those two are about the embedded default
        args += ["--database-url", database_url]
    done = run_cli(command, *args, env=cli_env(**env))
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("replayguard: error: "), done.stderr
    assert expected in done.stderr and PASSWORD not in done.stderr, done.stderr
    assert sorted(tmp_path.glob("data/keys/*.key")) == planted, "a refused start wrote a key"


@pytest.mark.parametrize(("option", "url"), [
    ("--database-url", f"postgresql://replayguard:{PASSWORD}/Wk9rT4@127.0.0.1:5432/replayguard"),
    ("--redis-url", f"redis://:{PASSWORD}/ET@127.0.0.1:6379/0"),
])
def test_a_url_whose_password_breaks_it_is_refused_without_quoting_it(tmp_path: Path, option: str, url: str) -> None:
    """A URL setting whose password holds an unescaped '/' is refused with one line naming
    the setting, and no part of the password."""
    done = run_cli("migrate", "--data-dir", str(tmp_path / "data"), option, url,
                   *(() if option == "--database-url" else ("--database-url", "postgresql://127.0.0.1:1/x")))
    assert done.returncode == 2 and PASSWORD not in done.stdout + done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "is not a valid URL" in done.stderr, done.stderr


def _open_files_limit(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return apply


def _serve_under_limit(tmp_path: Path, soft: int, hard: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`serve` under an open-files limit, on a database that does not answer (the limit is
    checked before it is reached); stopped by the test's timeout if it gets further."""
    return subprocess.run([sys.executable, "-m", "replayguard", "serve", "--port", "0", "--data-dir",
                           str(tmp_path / "data"), "--database-url", "postgresql://postgres@127.0.0.1:1/x", *args],
                          capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=60, check=False,
                          preexec_fn=_open_files_limit(soft, hard))


def test_connection_cap_over_the_open_files_limit_is_refused_at_start(tmp_path: Path) -> None:
    """`serve` raises its soft open-files limit to the hard one; when max_connections (1024 by
    default) with the pool and a reserve still does not fit under it (here both are 1024),
    accept() would fail with EMFILE before the cap answered 503: start-up stops with one line,
    exit 2, before any key is written."""
    done = _serve_under_limit(tmp_path, 1024, 1024)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "open files" in done.stderr and "max_connections (1024)" in done.stderr, done.stderr
    assert not (tmp_path / "data" / "keys").exists()


def test_the_soft_open_files_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    """Under a soft limit of 1024 and a higher hard one (a login shell's, a unit's without
    LimitNOFILE=), `serve` raises the soft limit and goes on (here to the unreachable
    database, which is the one-line error it stops at)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or hard >= 2048, f"this host's hard limit ({hard}) is too low"
    done = _serve_under_limit(tmp_path, 1024, hard)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "open files" not in done.stderr and "database" in done.stderr.lower(), done.stderr
    probe = subprocess.run([sys.executable, "-c", "import resource\n"
                            "from replayguard.http.server import raise_fd_limit\n"
                            "from replayguard.settings import load_settings\n"
                            "print(raise_fd_limit(load_settings(env={})),\n"
                            "      resource.getrlimit(resource.RLIMIT_NOFILE)[0])"],
                           capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=60, check=False,
                           preexec_fn=_open_files_limit(1024, hard))
    raised = hard if hard != resource.RLIM_INFINITY else 1024 + 8 + 64  # unlimited: what the defaults need
    assert probe.returncode == 0 and probe.stdout.split() == [str(raised)] * 2, (probe.stdout, probe.stderr)
