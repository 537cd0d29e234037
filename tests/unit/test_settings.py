"""Settings: flags over environment over file over defaults, validated once."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from replayguard.cli.main import build_parser, settings_from_args
from replayguard.errors import ConfigError
from replayguard.settings import OPTIONS, Secret, Settings, load_settings, markdown_table
from tests.conftest import REPO


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
    ({"REPLAYGUARD_EMBEDDED_SHARED_BUFFERS_MB": "-1"}, "embedded_shared_buffers_mb must be between 0"),
    ({"REPLAYGUARD_EMBEDDED_SHARED_BUFFERS_MB": "1024", "REPLAYGUARD_DATABASE_URL": "postgresql://h/db"},
     "embedded_shared_buffers_mb sizes the embedded PostgreSQL, and database_url names another server"),
    ({"REPLAYGUARD_EVENT_HMAC_SECRET": " \t"}, "event_hmac_secret is empty"),
    ({"REPLAYGUARD_WEBHOOK_SECRET": "  "}, "webhook_secret is empty"),
    ({"REPLAYGUARD_WITNESS_TOKEN": "\n"}, "witness_token is empty"),
    ({"REPLAYGUARD_DATA_DIR": "~rg_no_such_user_zz/data"}, "data_dir has an invalid value"),
])
def test_bad_values_are_one_clear_error(env: dict[str, str], message: str) -> None:
    """Every bad value stops start-up with a ConfigError that names the setting."""
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


@pytest.mark.parametrize("name", ["EVENT_HMAC_SECRET", "WEBHOOK_SECRET", "WITNESS_TOKEN"])
def test_empty_key_in_environment_is_refused_like_a_blank_one(name: str) -> None:
    """An empty REPLAYGUARD_EVENT_HMAC_SECRET= (WEBHOOK_SECRET, WITNESS_TOKEN), e.g. an unset
    shell variable expanded in an env file, stops start-up with one line naming the variable,
    as a blank one, an empty *_FILE and an empty TOML value do: it is never taken as 'not set'."""
    with pytest.raises(ConfigError, match=f"^REPLAYGUARD_{name} is set but empty"):
        load_settings(env={f"REPLAYGUARD_{name}": ""})


def test_witness_required_without_any_witness_is_refused() -> None:
    """witness_required = true with no witnesses configured stops start-up with one line: the
    requirement would otherwise be silently void."""
    with pytest.raises(ConfigError, match="witness_required is set but no witnesses are"):
        load_settings(env={"REPLAYGUARD_WITNESS_REQUIRED": "true"})


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
    path.chmod(0o600)
    settings = load_settings(env={"REPLAYGUARD_DATABASE_URL_FILE": str(path)})
    assert settings.database_url == Secret("postgresql://u:hunter2@db/rg")
    assert "hunter2" not in repr(settings)


def test_table_and_settings_object_agree() -> None:
    """Every setting of the table is a field of Settings and back, and the table's default is the field's."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    assert sorted(o.name for o in OPTIONS) == sorted(fields)
    defaults = Settings()
    for option in OPTIONS:
        value = getattr(defaults, option.name)
        if isinstance(value, bool):
            assert str(value).lower() == option.default, option.name
        elif isinstance(value, int) or (isinstance(value, str) and option.kind == "str"):
            assert str(value) == option.default, option.name


def test_readme_table_is_the_settings_table() -> None:
    """README's settings table is exactly the one generated from settings.OPTIONS."""
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- settings table: python -m replayguard.settings -->\n", "<!-- end of settings table -->"
    assert start in readme and end in readme
    assert readme.split(start, 1)[1].split(end, 1)[0] == markdown_table()


def test_every_setting_is_a_flag() -> None:
    """serve --help offers one flag per setting, whose help names its environment variable."""
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    serve = commands.choices["serve"]
    helps = {a.dest: a.help for a in serve._actions}
    for option in OPTIONS:
        assert option.env in (helps.get(option.name) or ""), option.name


def test_repeated_and_comma_separated_sinks_flag() -> None:
    """--sinks may be repeated and each may list several sinks, comma-separated."""
    args = build_parser().parse_args(["serve", "--sinks", "file:/tmp/a.jsonl,file:/tmp/b.jsonl", "--sinks",
                                      "file:/tmp/c.jsonl"])
    assert settings_from_args(args).sinks == ("file:/tmp/a.jsonl", "file:/tmp/b.jsonl", "file:/tmp/c.jsonl")


@pytest.mark.parametrize(("env", "message"), [
    ({"REPLAYGUARD_LOCKOUT_TRESHOLD": "3"}, "unknown environment variable REPLAYGUARD_LOCKOUT_TRESHOLD"),
    ({"REPLAYGUARD_PORT_FILE": "/x"}, "unknown environment variable REPLAYGUARD_PORT_FILE"),
    ({"REPLAYGUARD_SINKS": "bogus"}, "sinks: sink 'bogus'"),
])
def test_unknown_environment_variable_and_bad_sink(env: dict[str, str], message: str) -> None:
    """A misspelled REPLAYGUARD_* variable or a bad sink is a start-up error naming it."""
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


@pytest.mark.parametrize("env", [
    {"REPLAYGUARD_URL": "http://x", "REPLAYGUARD_TOKEN": "t", "REPLAYGUARD_TOKEN_FILE": "/x"},
    {"REPLAYGUARD_RELAY_URI": "test:///default", "REPLAYGUARD_TEST_PG": "x", "REPLAYGUARD_BENCH_PG": "x"},
])
def test_other_tools_variables_are_not_settings_errors(env: dict[str, str]) -> None:
    """The client's, the relays' and the test suite's own REPLAYGUARD_* variables are left alone."""
    assert load_settings(env=env).port == 8080


def test_inline_secret_in_a_readable_config_file_is_refused(tmp_path: Path) -> None:
    """A TOML file that holds a secret must obey the key-file rule; one without secrets need not."""
    path = tmp_path / "rg.toml"
    path.write_text('database_url = "postgresql://u:pw@db/rg"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"config file with secrets .* run chmod 600"):
        load_settings(env={}, config_file=path)
    path.write_text("port = 9001\n")
    assert load_settings(env={}, config_file=path).port == 9001


def test_default_data_dir_as_root_is_var_lib(monkeypatch: pytest.MonkeyPatch) -> None:
    """As root the default data dir is /var/lib/replayguard (never under /root, which the service user cannot reach)."""
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert Settings().data_dir == Path("/var/lib/replayguard")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", "/home/u/.local/share")
    assert Settings().data_dir == Path("/home/u/.local/share/replayguard")
