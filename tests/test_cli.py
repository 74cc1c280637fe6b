"""The console script itself: help, version, one-line errors."""

import subprocess
import sys

import kanmoe


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kanmoe.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "version" in result.stdout


def test_version_matches_package() -> None:
    result = run_cli("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == kanmoe.__version__


def test_cli_import_does_not_import_torch() -> None:
    code = "import sys, kanmoe.cli; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
