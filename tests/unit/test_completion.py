"""``replayguard completion bash`` completes the CLI's real commands, subcommands and flags in bash."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from replayguard.cli.completion import bash_script
from replayguard.cli.main import build_parser


def complete(words: list[str]) -> list[str]:
    """What bash offers for the last of ``words`` with the generated script loaded."""
    quoted = " ".join(f"'{w}'" for w in words)
    program = (f"{bash_script(build_parser())}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1};"
               " _replayguard; printf '%s\\n' \"${COMPREPLY[@]}\"")
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line]


pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")


@pytest.mark.parametrize(("words", "expected"), [
    (["replayguard", "al"], ["alerts"]),
    (["replayguard", "alerts", ""], ["ack", "follow", "list", "show"]),
    (["replayguard", "alerts", "list", "--sev"], ["--severity"]),
    (["replayguard", "principals", "un"], ["unlock"]),
    (["replayguard", "--vm", "x", "vms", "--time"], ["--timeline"]),
    (["replayguard", "vms", "cl"], ["clear"]),
    (["replayguard", "vms", "clear", "web-01", "--n"], ["--note"]),
    (["replayguard", "status", "--v"], ["--verify"]),
    (["replayguard", "sinks", ""], ["test"]),
])
def test_bash_completes_commands_and_flags(words: list[str], expected: list[str]) -> None:
    """Each position offers the subcommands or flags the parser defines there."""
    assert [w for w in complete(words) if w != "--help"] == expected
