"""The image's Python layer, natively: the wheel, installed as the Dockerfile installs it.

No docker engine runs here, so this test does what the image's build does, in a fresh
virtual environment: build kanmoe's wheel from the files the Dockerfile's wheel stage copies,
``pip install "<wheel>[serve]"`` (the CPU target's line; pip resolves the dependencies from
the package index), run ``docker/check_env.py`` as the build does, then start ``kanmoe
serve`` from that environment on the shipped ``model_repository/`` and check a prediction
against ONNX Runtime run on the same file here. The environment must hold no torch and
exactly one ONNX Runtime distribution, and the image's health-check script must tell a
ready server from a stopped one.

About half a minute: one wheel build and one ``pip install`` (cached downloads make it faster).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from kanmoe.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow

REPOSITORY = PROJECT_ROOT / "model_repository"
MODEL = "california_kamoe"
ROW = [8.3252, 41.0, 6.984, 1.024, 322.0, 2.556, 37.88, -122.23]  # the README's example
_PORT_LINE = re.compile(rb"Uvicorn running on http://[^:]+:(\d+)")
_INSTALL_TIMEOUT_S = 420
# Without build isolation (the development environment's setuptools builds it: seconds faster)
# when that environment has setuptools; pip fetches it otherwise.
_PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-deps"]
if importlib.util.find_spec("setuptools") is not None:
    _PIP_WHEEL.append("--no-build-isolation")


def _dockerfile_stage(name: str) -> list[str]:
    """The instruction lines (continuations joined) of one Dockerfile stage."""
    text = (PROJECT_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip() and ln[0] != "#"]
    start = next(
        i for i, ln in enumerate(lines) if re.match(rf"FROM \S+ AS {name}$", ln, re.IGNORECASE)
    )
    stage = []
    for line in lines[start + 1 :]:
        if line.upper().startswith("FROM "):
            break
        stage.append(line)
    return stage


def _clean_env() -> dict[str, str]:
    """The environment without anything that would let the new venv see this one."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSAFEPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("KANMOE_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip(venv: Path) -> list[str]:
    """This environment's pip, acting on ``venv``."""
    return [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``<wheel>[serve]`` installed, as the image's cpu stage does it."""
    work = tmp_path_factory.mktemp("wheel")
    src, dist, venv = work / "src", work / "dist", work / "venv"
    src.mkdir()
    # The wheel stage's COPY sources are the whole build input: copy exactly those.
    copies = [ln.split()[1:-1] for ln in _dockerfile_stage("wheel") if ln.startswith("COPY ")]
    for sources in copies:
        for source in sources:
            path = PROJECT_ROOT / source.rstrip("/")
            if path.is_dir():
                shutil.copytree(path, src / path.name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, src / path.name)
    built = _run(
        [*_PIP_WHEEL, "--wheel-dir", str(dist), "."],
        src,
        _INSTALL_TIMEOUT_S,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("kanmoe-*.whl")
    # A venv without pip of its own (no ensurepip: seconds faster); this pip installs into it.
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work, 120)
    assert made.returncode == 0, made.stderr
    # The Dockerfile's cpu stage: pip install --no-cache-dir "${wheel}[serve]" (the cache
    # only saves downloads; --no-compile skips writing .pyc files).
    installed = _run(
        [*_pip(venv), "install", "--no-compile", f"{wheel}[serve]"],
        work,
        _INSTALL_TIMEOUT_S,
    )
    assert installed.returncode == 0, installed.stdout[-4000:] + installed.stderr[-4000:]
    return venv


def test_the_dockerfile_installs_what_this_test_installs() -> None:
    """The lines this test mirrors are the Dockerfile's: a change there must show up here."""
    wheel_stage = " ".join(_dockerfile_stage("wheel"))
    assert "pip wheel --no-cache-dir --no-deps --wheel-dir /dist ." in wheel_stage
    cpu_stage = " ".join(_dockerfile_stage("cpu"))
    assert 'pip install --no-cache-dir "${wheel}[serve]"' in cpu_stage
    assert "check_env.py --ort onnxruntime --provider CPUExecutionProvider" in cpu_stage
    gpu_stage = " ".join(_dockerfile_stage("gpu"))
    assert 'pip install --no-cache-dir "${wheel}[gpu]"' in gpu_stage
    assert "check_env.py --ort onnxruntime-gpu --provider CUDAExecutionProvider" in gpu_stage
    assert "[serve]" not in gpu_stage  # serve would bring the CPU build next to the GPU one


def test_serving_venv_has_one_onnxruntime_and_no_torch(serving_venv: Path) -> None:
    listed = _run([*_pip(serving_venv), "list", "--format", "json"], PROJECT_ROOT, 60)
    names = {d["name"].lower().replace("_", "-") for d in json.loads(listed.stdout)}
    assert "kanmoe" in names
    assert "torch" not in names
    assert sorted(n for n in names if n.startswith(("onnxruntime", "ort-"))) == ["onnxruntime"]
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
    assert (
        _run([str(serving_venv / "bin" / "python"), "-c", probe], PROJECT_ROOT, 60).returncode == 0
    )


def test_build_check_passes_there_and_fails_where_it_should(serving_venv: Path) -> None:
    check = str(PROJECT_ROOT / "docker" / "check_env.py")
    python = str(serving_venv / "bin" / "python")
    ok = _run(
        [python, check, "--ort", "onnxruntime", "--provider", "CPUExecutionProvider"],
        PROJECT_ROOT,
        120,
    )
    assert ok.returncode == 0, ok.stderr
    # The GPU image's check, run on the CPU build: both the distribution and CUDA are wrong.
    wrong = _run(
        [python, check, "--ort", "onnxruntime-gpu", "--provider", "CUDAExecutionProvider"],
        PROJECT_ROOT,
        120,
    )
    assert wrong.returncode == 1
    assert "(onnxruntime-gpu), found ['onnxruntime']" in wrong.stderr
    assert "CUDAExecutionProvider is not offered" in wrong.stderr
    # The development environment holds torch: the same check refuses it.
    dev = _run([sys.executable, check, "--ort", "onnxruntime"], PROJECT_ROOT, 120)
    assert dev.returncode == 1 and "torch is installed" in dev.stderr


def _start(venv: Path, cwd: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``kanmoe serve`` from the venv's console script, on a free loopback port."""
    cmd = [str(venv / "bin" / "kanmoe"), "serve", "--repository", str(REPOSITORY)]
    cmd += ["--host", "127.0.0.1", "--port", "0"]
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            cmd, cwd=cwd, env=_clean_env(), stdout=sink, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = _PORT_LINE.search(log.read_bytes())
        if match:
            return process, int(match[1])
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    process.wait(10)
    pytest.fail(f"kanmoe serve from the wheel did not start:\n{log.read_text(errors='replace')}")


def _healthcheck(venv: Path, port: int) -> subprocess.CompletedProcess[str]:
    env = _clean_env() | {"KANMOE_PORT": str(port)}
    script = str(PROJECT_ROOT / "docker" / "healthcheck.py")
    return subprocess.run(
        [str(venv / "bin" / "python"), script], env=env, capture_output=True, text=True, timeout=30
    )


def test_wheel_serves_a_correct_prediction(serving_venv: Path, tmp_path: Path) -> None:
    # cwd away from the source tree, so only the installed wheel can be imported.
    process, port = _start(serving_venv, tmp_path, tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _healthcheck(serving_venv, port).returncode != 0:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/models/{MODEL}/predict", json={"inputs": [ROW]}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        session = ort.InferenceSession(
            str(REPOSITORY / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        want, gates = session.run(
            ["output", "gate_weights"], {"input": np.array([ROW], np.float32)}
        )
        assert body["predictions"][0] == pytest.approx(float(want[0, 0]), rel=1e-5, abs=1e-6)
        assert body["gate_weights"]["moe"][0] == pytest.approx(gates[0].tolist(), abs=1e-6)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'providers="CPUExecutionProvider"' in metrics
        # The server this environment runs is the wheel's, not the source tree's.
        where = _run(
            [str(serving_venv / "bin" / "python"), "-c", "import kanmoe; print(kanmoe.__file__)"],
            tmp_path,
            60,
        )
        assert Path(where.stdout.strip()).is_relative_to(serving_venv), where.stdout
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 0, (tmp_path / "serve.log").read_text()
    stopped = _healthcheck(serving_venv, port)
    assert stopped.returncode == 1 and "unhealthy" in stopped.stderr
