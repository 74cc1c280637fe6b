"""kanmoe as a Ray Serve application: a local one-node Ray cluster on loopback, 2 replicas.

The cluster starts once for the module (~30-90 s on 2 shared cores: Ray's GCS, raylet,
Serve controller, proxy and two replica actors) and is shut down in teardown. Answers are
checked against ONNX Runtime run here on the same model file, and the ``x-kanmoe-replica``
header shows that both replicas served.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import ray
from ray import serve

from kanmoe.paths import CALIFORNIA_HOUSING_CSV
from kanmoe.service.ray_app import DEPLOYMENT_NAME, REPLICA_HEADER, build, settings_env
from kanmoe.service.settings import ServeSettings
from tests.serving import DEFAULT_MODEL, DEFAULT_REPOSITORY

pytestmark = pytest.mark.slow

MODEL_FILE = DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "model.onnx"
FEATURES = json.loads((MODEL_FILE.parent / "kanmoe.json").read_text())["feature_names"]
HEADER = REPLICA_HEADER.decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ray() -> None:
    """A fresh local cluster on loopback (address="local": never one found on the machine).

    Ray waits a fixed 30 s for its raylet to register; on a machine shared by other jobs
    that can run out, so a node that timed out during start-up is retried (twice).
    """
    for attempt in range(3):
        try:
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                _node_ip_address="127.0.0.1",
            )
            return
        except Exception as exc:
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise


# Serve's controller marks its HTTP proxy unhealthy after 3 health checks of 10 s and kills
# it; a proxy still importing on 2 busy cores misses those. The processes of a local
# cluster inherit the driver's environment, so these reach the controller.
PATIENT_SERVE = {
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "20",
}


@pytest.fixture(scope="module")
def ray_url():
    port = _free_port()
    saved = {k: os.environ.get(k) for k in PATIENT_SERVE}
    os.environ.update(PATIENT_SERVE)
    _start_ray()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # build() is what `serve run kanmoe.service.ray_app:build key=value ...` calls.
        args = {"num_replicas": "2", "num_cpus": "0.5", "intra_op_threads": "1"}
        app = build({**args, "repository": str(DEFAULT_REPOSITORY)})
        serve.run(app, name=DEPLOYMENT_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=url, timeout=10) as client:
            while client.get("/v2/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "Ray Serve app not ready after 120 s"
                time.sleep(0.2)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return pd.read_csv(CALIFORNIA_HOUSING_CSV, nrows=16)[FEATURES].to_numpy(np.float32)


@pytest.fixture(scope="module")
def reference(rows):
    session = ort.InferenceSession(str(MODEL_FILE), providers=["CPUExecutionProvider"])
    return session.run(["output", "gate_weights"], {"input": rows})


def test_v2_infer_through_ray_equals_onnx_runtime(ray_url, rows, reference):
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "data": rows.ravel().tolist(),
            }
        ]
    }
    r = httpx.post(f"{ray_url}/v2/models/{DEFAULT_MODEL}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers[HEADER]
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    want_out, want_gates = reference
    assert outputs["output"]["shape"] == [len(rows), 1]
    np.testing.assert_allclose(outputs["output"]["data"], want_out.ravel(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outputs["gate_weights"]["data"], want_gates.ravel(), atol=1e-6)


def test_v1_predict_through_ray_equals_onnx_runtime(ray_url, rows, reference):
    instances = [dict(zip(FEATURES, map(float, r), strict=True)) for r in rows]
    r = httpx.post(
        f"{ray_url}/v1/models/{DEFAULT_MODEL}/predict", json={"instances": instances}, timeout=30
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == DEFAULT_MODEL
    want_out, want_gates = reference
    np.testing.assert_allclose(body["predictions"], want_out[:, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(body["gate_weights"]["moe"], want_gates, atol=1e-6)


def test_errors_keep_the_service_contract_under_ray(ray_url):
    r = httpx.post(f"{ray_url}/v1/models/{DEFAULT_MODEL}/predict", json={"inputs": [[1.0]]})
    assert 400 <= r.status_code < 500 and "error" in r.json()
    assert httpx.get(f"{ray_url}/v2/models/nope/ready").status_code == 404


def test_both_replicas_serve_with_their_own_process(ray_url, rows, reference):
    url = f"{ray_url}/v2/models/{DEFAULT_MODEL}/infer"
    row = rows[:1]
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8], "data": row[0].tolist()}]
    }

    def one(_: int) -> tuple[str, float]:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 200, r.text
        return r.headers[HEADER], r.json()["outputs"][0]["data"][0]

    seen: dict[str, float] = {}
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(8) as pool:
        while len(seen) < 2 and time.monotonic() < deadline:
            seen.update(pool.map(one, range(16)))
    assert len(seen) == 2, f"only replica(s) {sorted(seen)} answered"
    pids = {v.rsplit(":", 1)[1] for v in seen}
    assert len(pids) == 2
    for value in seen.values():  # each replica's own session gives the same answer
        assert value == pytest.approx(float(reference[0][0, 0]), rel=1e-6, abs=1e-6)


def test_build_arguments_are_checked():
    with pytest.raises(Exception, match="unknown argument"):
        build({"replicas": "2"})
    with pytest.raises(Exception, match="not a directory"):
        build({"repository": "/nonexistent/kanmoe-repo"})


def test_the_service_imports_without_ray():
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import kanmoe.service.app, kanmoe.service.server\n"
        "try:\n"
        "    import kanmoe.service.ray_app\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("KanmoeError") and "kanmoe[ray]" in out.stdout


def test_settings_reach_replicas_unchanged_through_the_environment(monkeypatch, tmp_path):
    given = ServeSettings(
        repository=tmp_path, max_batch_size=32, cors_origins=["http://a", "http://b"],
        api_token="t0k", metrics=False, max_delay_ms=1.5, workers=4,
    )  # fmt: skip
    for key in [k for k in os.environ if k.startswith("KANMOE_")]:
        monkeypatch.delenv(key)
    for key, value in settings_env(given).items():
        monkeypatch.setenv(key, value)
    assert ServeSettings() == given.model_copy(update={"workers": 1})
