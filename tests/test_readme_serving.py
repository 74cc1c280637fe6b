"""The README's serving section matches the code: every setting and metric is listed, and
its curl examples work as shown against a real server."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from kanmoe.paths import PROJECT_ROOT
from kanmoe.service.metrics import METRIC_DOCS
from kanmoe.service.settings import ServeSettings

README = (PROJECT_ROOT / "README.md").read_text()
SERVING = README[README.index("## Serving") : README.index("## The default model")]


def test_every_setting_is_listed_with_its_flag_and_env_name():
    for name in ServeSettings.model_fields:
        assert f"`KANMOE_{name.upper()}`" in SERVING, name
        assert f"--{name.replace('_', '-')}" in SERVING, name


def test_every_metric_is_listed():
    for name, *_ in METRIC_DOCS:
        assert f"`{name}`" in SERVING, name


def _curl_commands() -> list[str]:
    """Each curl command of the section's bash blocks, continuation lines and multi-line
    quoted bodies joined (a command ends where its quotes balance)."""
    commands, pending = [], ""
    for block in re.findall(r"```bash\n(.*?)```", SERVING, flags=re.S):
        for line in block.splitlines():
            pending += line + "\n"
            if pending.count("'") % 2 == 0 and not line.endswith("\\"):
                if pending.strip().startswith("curl "):
                    commands.append(pending.strip())
                pending = ""
    return commands


def test_readme_has_curl_examples():
    assert len(_curl_commands()) >= 4


@pytest.mark.parametrize("command", _curl_commands())
def test_curl_example_works_as_shown(default_server, command):
    command = command.replace("http://127.0.0.1:8000", default_server.url)
    out = subprocess.run(
        ["bash", "-c", command + " -w '\\n%{http_code}'"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    body, status = out.stdout.rsplit("\n", 1)
    assert status == "200", (command, body)
    if body.strip():
        assert "error" not in json.loads(body)
