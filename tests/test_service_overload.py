"""Overload: ten times what the server can do, from a separate load-generator process.

First the capacity is measured (closed loop, ``tests/load_client.py``), then requests arrive
open-loop at FACTOR x that rate for a bounded time. What must hold: every accepted request
gets the right answer (the load generator checks each against ONNX Runtime), every other
one gets 429 or 503 with Retry-After (no dropped connection, no other status), the p99 of
accepted requests stays under a configured bound, the server's memory stays bounded, and it
is healthy afterwards with its rejection counter equal to the 429s the clients saw.

Knobs (environment; ``make test-overload`` runs the long version):
KANMOE_OVERLOAD_SECONDS (3), KANMOE_OVERLOAD_FACTOR (10), KANMOE_OVERLOAD_P99_S (3.0),
KANMOE_OVERLOAD_ROWS (1024 rows per request: makes the server, not the client, the bottleneck).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from kanmoe.paths import PROJECT_ROOT
from tests.serving import DEFAULT_MODEL, DEFAULT_REPOSITORY

MODEL_FILE = DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "model.onnx"
SECONDS = float(os.environ.get("KANMOE_OVERLOAD_SECONDS", "3"))
FACTOR = float(os.environ.get("KANMOE_OVERLOAD_FACTOR", "10"))
# Generous by default: CI shares two cores with other jobs, and the bound must hold there too.
# A quiet machine measures ~0.3 s here; set a tighter bound in the long run on one.
P99_BOUND_S = float(os.environ.get("KANMOE_OVERLOAD_P99_S", "3.0"))
ROWS = int(os.environ.get("KANMOE_OVERLOAD_ROWS", "1024"))
RSS_PEAK_MIB = 256  # growth allowed while overloaded (queue is bounded in rows)
RSS_AFTER_MIB = 96  # growth left once the load is gone


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _load(server, out: Path, *args: str) -> dict:
    """Run the load generator in its own process and return its JSON summary."""
    cmd = [
        sys.executable,
        "-m",
        "tests.load_client",
        "--port",
        str(server.port),
        "--model",
        DEFAULT_MODEL,
        "--model-file",
        str(MODEL_FILE),
        "--rows",
        str(ROWS),
        "--out",
        str(out),
        *args,
    ]
    subprocess.run(cmd, check=True, cwd=PROJECT_ROOT, timeout=SECONDS * 4 + 120)
    return json.loads(out.read_text())


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(p in line for p in want.split(",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _refused(server) -> float:
    """The server's own count of queue-full refusals so far."""
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    return _metric(metrics, "kanmoe_rejected_total", model=DEFAULT_MODEL, reason="queue_full")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_ten_times_capacity_is_answered_right_or_refused_with_retry_after(tmp_path, server_factory):
    # One ORT thread and a queue of four requests: a small, predictable capacity.
    server = server_factory(
        DEFAULT_REPOSITORY,
        "--intra-op-threads",
        "1",
        "--max-queue-rows",
        str(4 * ROWS),
        "--max-request-rows",
        str(ROWS),
    )
    pid = server.process.pid
    # Capacity: closed loop with one request running and four queued (all the queue holds,
    # so none is refused), after a warm-up run (the first batches pay for ORT's arena).
    _load(server, tmp_path / "warm.json", "--mode", "capacity", "--seconds", "1")
    capacity = _load(
        server, tmp_path / "capacity.json", "--mode", "capacity", "--seconds", "2",
        "--concurrency", "5",
    )  # fmt: skip
    assert capacity["n_connection_errors"] == 0 and not capacity["wrong_answers"], capacity
    assert set(capacity["statuses"]) <= {"200", "429"}, capacity
    rate = FACTOR * capacity["accepted_per_s"]
    rss_before = _rss_mib(pid)
    refused_before = _refused(server)

    peak = [rss_before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = _load(
            server,
            tmp_path / "overload.json",
            "--mode",
            "open",
            "--rate",
            f"{rate:.1f}",
            "--seconds",
            str(SECONDS),
        )
    finally:
        done.set()
        sampler.join()
    report = json.dumps({"capacity": capacity, "overload": result}, indent=1)
    print(report)

    # The load was really FACTOR x capacity (the generator kept its schedule).
    assert result["sent_per_s"] >= 0.8 * rate, report
    assert result["sent"] >= int(0.95 * SECONDS * rate), report
    # Every request got an HTTP answer: the right one, or a refusal with Retry-After.
    assert result["n_connection_errors"] == 0, report
    statuses = {int(k): v for k, v in result["statuses"].items()}
    assert set(statuses) <= {200, 429, 503}, report
    assert sum(statuses.values()) == result["sent"], report
    assert statuses.get(200, 0) > 0 and statuses.get(429, 0) + statuses.get(503, 0) > 0, report
    assert result["wrong_answers"] == [] and result["max_relative_error"] <= 1e-4, report
    assert result["missing_retry_after"] == 0, report
    # Accepted requests did not wait behind an unbounded queue.
    assert result["p99_s"] <= P99_BOUND_S, report
    # Memory: bounded while overloaded, back near the start once the load is gone.
    time.sleep(0.5)
    rss_after = _rss_mib(pid)
    assert peak[0] - rss_before <= RSS_PEAK_MIB, (rss_before, peak[0])
    assert rss_after - rss_before <= RSS_AFTER_MIB, (rss_before, rss_after)

    # Healthy afterwards: ready, right answers, and its own count of refusals agrees.
    assert httpx.get(server.url + "/v2/health/ready", timeout=10).status_code == 200
    x = np.random.default_rng(3).normal(size=(5, 8)).astype(np.float32) + 2
    session = ort.InferenceSession(str(MODEL_FILE), providers=["CPUExecutionProvider"])
    (want,) = session.run(["output"], {"input": x})
    r = httpx.post(
        f"{server.url}/v1/models/{DEFAULT_MODEL}/predict", json={"inputs": x.tolist()}, timeout=10
    )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["predictions"], want[:, 0], rtol=1e-5, atol=1e-6)
    refused = _refused(server) - refused_before
    assert refused == statuses.get(429, 0), (refused, statuses)
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert _metric(metrics, "kanmoe_queue_depth", model=DEFAULT_MODEL, version="1") == 0.0
