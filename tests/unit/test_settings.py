"""Settings: flags over environment over file over defaults, validated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from replayguard.errors import ConfigError
from replayguard.settings import Secret, load_settings


@pytest.mark.parametrize(("flags", "env", "expected_port"), [
    ({}, {}, 8080),
    ({}, {"REPLAYGUARD_PORT": "9000"}, 9000),
    ({"port": 9100}, {"REPLAYGUARD_PORT": "9000"}, 9100),
    ({"port": None}, {"REPLAYGUARD_PORT": "9000"}, 9000),
])
def test_precedence(flags: dict[str, object], env: dict[str, str], expected_port: int) -> None:
    """A flag beats the environment, which beats the default; an unset flag does not count."""
    assert load_settings(flags=flags, env=env).port == expected_port


def test_file_then_env(tmp_path: Path) -> None:
    """The TOML file supplies values the environment does not override."""
    path = tmp_path / "rg.toml"
    path.write_text('port = 7000\nlockout_threshold = 9\nsinks = ["file:/tmp/a.jsonl"]\n')
    settings = load_settings(env={"REPLAYGUARD_PORT": "7001"}, config_file=path)
    assert (settings.port, settings.lockout_threshold, settings.sinks) == (7001, 9, ("file:/tmp/a.jsonl",))


@pytest.mark.parametrize(("env", "message"), [
    ({"REPLAYGUARD_PORT": "eighty"}, "port has an invalid value"),
    ({"REPLAYGUARD_PORT": "70000"}, "port must be between"),
    ({"REPLAYGUARD_DATABASE_URL": "mysql://x"}, "database_url must start with"),
    ({"REPLAYGUARD_DATABASE_URL": "postgresql://h:notaport/db"}, "database_url is not a valid URL"),
    ({"REPLAYGUARD_REDIS_URL": "http://x"}, "redis_url must start with"),
    ({"REPLAYGUARD_RECEIPT_REACTION": "ignore"}, "receipt_reaction must be"),
    ({"REPLAYGUARD_LOG_LEVEL": "loud"}, "log_level must be"),
    ({"REPLAYGUARD_HTTP_FRONT": "nginx"}, "http_front must be"),
    ({"REPLAYGUARD_WORKERS": "0"}, "workers must be between"),
    ({"REPLAYGUARD_DB_POOL_SIZE": "2"}, "db_pool_size must be between 3"),
])
def test_bad_values_are_one_clear_error(env: dict[str, str], message: str) -> None:
    """Every bad value stops start-up with a ConfigError that names the setting."""
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


def test_bad_file(tmp_path: Path) -> None:
    """A config file with unknown keys or bad TOML is refused with its path in the message."""
    path = tmp_path / "rg.toml"
    path.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown settings: prot"):
        load_settings(env={}, config_file=path)
    path.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(env={}, config_file=path)


def test_secret_file_and_redaction(tmp_path: Path) -> None:
    """A secret can come from *_FILE, and its repr never shows it."""
    path = tmp_path / "url"
    path.write_text("postgresql://u:hunter2@db/rg\n")
    settings = load_settings(env={"REPLAYGUARD_DATABASE_URL_FILE": str(path)})
    assert settings.database_url == Secret("postgresql://u:hunter2@db/rg")
    assert "hunter2" not in repr(settings)
