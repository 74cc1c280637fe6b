"""Start a real ``kanmoe serve`` process on a free loopback port for tests.

The server binds port 0 and the helper reads the port uvicorn logged, so parallel runs
never race for a port. ``stop()`` sends SIGTERM and returns the exit code.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kanmoe.paths import PROJECT_ROOT

DEFAULT_REPOSITORY = PROJECT_ROOT / "model_repository"
DEFAULT_MODEL = "california_kamoe"
_PORT_LINE = re.compile(rb"Uvicorn running on http://[^:]+:(\d+)")


@dataclass
class LiveServer:
    process: subprocess.Popen
    port: int
    log_path: Path
    repository: Path
    _closed: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """``host:port`` as tritonclient wants it (no scheme)."""
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._closed = True
        return self.process.returncode


def copy_repository(dest: Path, source: Path = DEFAULT_REPOSITORY) -> Path:
    """A private copy of a repository, so a test may change it freely."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".*"))
    return dest


def start_server(
    repository: Path = DEFAULT_REPOSITORY,
    *args: str,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 60.0,
) -> LiveServer:
    """``kanmoe serve --repository REPO --port 0 ARGS``; waits for the port (and readiness)."""
    log = Path(tempfile.mkstemp(prefix="kanmoe-serve-", suffix=".log")[1])
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KANMOE_")}
    full_env.update(env or {})
    cmd = [
        sys.executable,
        "-m",
        "kanmoe.cli",
        "serve",
        "--repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *args,
    ]
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, env=full_env, stdin=subprocess.DEVNULL
        )
    deadline = time.monotonic() + timeout
    port = None
    while port is None:
        match = _PORT_LINE.search(log.read_bytes())
        if match:
            port = int(match[1])
            break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"kanmoe serve did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    server = LiveServer(process, port, log, Path(repository))
    if wait_ready:
        wait_until_ready(server, deadline - time.monotonic())
    return server


def wait_until_ready(server: LiveServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server not ready in {timeout:.0f} s:\n{server.log()}")
