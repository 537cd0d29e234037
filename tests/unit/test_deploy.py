"""The deployment files in deploy/ stay true to the code: settings, systemd unit, compose file and image."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from replayguard.settings import Settings, load_settings
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
EXAMPLE = DEPLOY / "replayguard.example.toml"
UNIT = DEPLOY / "systemd" / "replayguard.service"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
_KEY_LINE = re.compile(r"^(#\s)?([a-z_]+)\s*=", re.MULTILINE)
_COMMENTED = re.compile(r"^# ([a-z_]+ = .*)$", re.MULTILINE)


def _uncommented(text: str) -> str:
    """The example with every commented-out setting switched on."""
    return _COMMENTED.sub(r"\1", text)


def test_example_config_loads() -> None:
    """The example file loads through the real loader, as shipped."""
    settings = load_settings(env={}, config_file=EXAMPLE)
    assert settings.host == "127.0.0.1" and settings.port == 8080


def test_example_config_documents_every_setting() -> None:
    """Every field of Settings appears in the example, on or commented out, so it cannot drift."""
    documented = {match.group(2) for match in _KEY_LINE.finditer(EXAMPLE.read_text())}
    missing = sorted({f.name for f in dataclasses.fields(Settings)} - documented)
    assert not missing, f"deploy/replayguard.example.toml does not document: {missing}"


def test_example_commented_settings_are_valid(tmp_path: Path) -> None:
    """Switching on every commented example still loads: no example value is refused."""
    path = tmp_path / "all.toml"
    path.write_text(_uncommented(EXAMPLE.read_text()))
    path.chmod(0o600)  # it holds secrets now: the key-file rule applies
    settings = load_settings(env={}, config_file=path)
    assert settings.sinks and settings.database_url is not None


def test_example_defaults_match_the_code(tmp_path: Path) -> None:
    """Each commented number or word the example calls a default is the code's default."""
    path = tmp_path / "all.toml"
    path.write_text(_uncommented(EXAMPLE.read_text()))
    path.chmod(0o600)  # it holds secrets now: the key-file rule applies
    loaded, defaults = load_settings(env={}, config_file=path), Settings()
    for field in dataclasses.fields(Settings):
        default: Any = getattr(defaults, field.name)
        if isinstance(default, (int, str)) and not isinstance(default, bool):
            assert getattr(loaded, field.name) == default, field.name


def _unit_settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize(("key", "value"), [
    ("User", "replayguard"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
    ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"), ("StateDirectory", "replayguard"),
    ("ReadWritePaths", "/var/lib/replayguard"), ("CapabilityBoundingSet", ""),
    ("EnvironmentFile", "-/etc/replayguard/replayguard.env"),
    ("Environment", "REPLAYGUARD_DATA_DIR=/var/lib/replayguard"),
    ("RuntimeDirectory", "replayguard"), ("RuntimeDirectoryMode", "0700"),
])
def test_service_unit_is_hardened(key: str, value: str) -> None:
    """The service unit keeps each hardening setting the deployment promises."""
    assert value in _unit_settings().get(key, [])


def test_service_unit_exposure_is_low(tmp_path: Path) -> None:
    """systemd's own offline security analysis rates the unit's exposure at 2.0 or better."""
    copy = tmp_path / "replayguard.service"
    shutil.copy(UNIT, copy)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(copy)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:]


def _compose() -> dict[str, Any]:
    import yaml  # pyyaml: see deploy/CI-PACKAGES.txt

    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_parses_and_has_two_instances() -> None:
    """The compose file is YAML with PostgreSQL 16+, Redis and two replayguard instances on their own ports."""
    services = _compose()["services"]
    image = re.match(r"postgres:(\d+)", services["postgres"]["image"])
    assert image is not None, services["postgres"]["image"]
    major = int(image.group(1))
    assert major >= 16 and services["redis"]["image"].startswith("redis:")
    instances = [name for name in services if name.startswith("replayguard-")]
    ports = {services[name]["ports"][0] for name in instances}
    assert len(instances) == 2 and len(ports) == 2


def test_compose_instances_share_keys_ledger_and_redis() -> None:
    """Both instances read the same key files, database URL secret and Redis: one ledger, one key set."""
    services = _compose()["services"]
    environments = [services[name]["environment"] for name in ("replayguard-1", "replayguard-2")]
    assert environments[0] == environments[1]
    for key in ("REPLAYGUARD_PEPPER_FILE", "REPLAYGUARD_RECEIPT_KEY_FILE", "REPLAYGUARD_DATABASE_URL_FILE",
                "REPLAYGUARD_REDIS_URL"):
        assert key in environments[0]
    assert all("keys:/keys:ro" in services[name]["volumes"] for name in ("replayguard-1", "replayguard-2"))


def test_unit_installs_the_toml_private() -> None:
    """The unit's install comment puts the TOML in place as the service user's, mode 0600."""
    text = UNIT.read_text()
    line = next(line for line in text.splitlines() if "replayguard.example.toml" in line)
    assert "-m 0600" in line and "-o replayguard" in line
    assert "<<<" not in text  # the comment's commands run under sh, not only bash


DOCKERFILE = DEPLOY / "compose" / "Dockerfile"


def _wheel_stage_copies() -> list[tuple[str, str]]:
    """The (source, destination) of each COPY in the Dockerfile's first (wheel) stage."""
    copies: list[tuple[str, str]] = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("FROM") and copies:
            break
        if line.startswith("COPY ") and "--from" not in line:
            *sources, destination = line.split()[1:]
            copies.extend((source, destination) for source in sources)
    return copies


def test_the_image_wheel_stage_copies_everything_the_build_reads() -> None:
    """The Dockerfile's wheel stage copies, each to the same relative place under WORKDIR /src,
    every file and directory pyproject.toml builds the wheel from: itself, its readme, its
    license-files (so the image's wheel carries licenses/LICENSE, as scripts/wheel-smoke
    requires) and the top directories of its packages."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    tools = project["tool"]["setuptools"]
    needed = {"pyproject.toml", project["project"]["readme"], *project["project"]["license-files"]}
    needed |= {name.split(".")[0] for name in tools["packages"] if name.split(".")[0] not in tools["package-dir"]}
    needed |= {path.split("/")[0] for path in tools["package-dir"].values()}
    copies = _wheel_stage_copies()
    assert copies, "no COPY in the Dockerfile's wheel stage"
    for source, destination in copies:
        assert destination in ("./", f"./{source.rstrip('/')}"), (source, destination)
        assert (REPO / source).exists(), source
    copied = {source.rstrip("/") for source, _destination in copies}
    assert needed <= copied, sorted(needed - copied)
