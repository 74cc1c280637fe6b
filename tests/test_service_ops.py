"""Operating the server: readiness, reloads with broken versions, back-pressure, SIGTERM,
GPU requirement and a sequence model, each against a real ``kanmoe serve`` process."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kanmoe.service.settings import ServeSettings
from kanmoe.service.store import ModelStore, NotFound, NotReady
from tests.serving import DEFAULT_MODEL, copy_repository, wait_until_ready

ROW = [8.3252, 41.0, 6.984, 1.024, 322.0, 2.556, 37.88, -122.23]
PREDICT = f"/v1/models/{DEFAULT_MODEL}/predict"


def _predict(server, rows=1, version=None, **kw) -> httpx.Response:
    path = PREDICT if version is None else f"/v1/models/{DEFAULT_MODEL}/versions/{version}/predict"
    return httpx.post(server.url + path, json={"inputs": [ROW] * rows}, timeout=30, **kw)


def test_readiness_is_false_until_every_version_has_warmed_up(tmp_path, server_factory):
    repo = copy_repository(tmp_path / "repo")
    for v in range(2, 25):  # 24 versions take long enough to load to watch readiness flip
        shutil.copytree(repo / DEFAULT_MODEL / "1", repo / DEFAULT_MODEL / str(v))
    server = server_factory(repo, wait_ready=False)
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/v2/health/live").status_code != 200:
        assert time.monotonic() < deadline
    first = httpx.get(server.url + "/v2/health/ready")
    assert first.status_code == 503 and "still loading" in first.json()["error"]
    wait_until_ready(server, 60)
    models = httpx.get(server.url + "/v1/models").json()["models"]
    assert len(models[0]["versions"]) == 24
    assert all(v["state"] == "READY" for v in models[0]["versions"])


def test_a_model_asked_for_before_the_first_load_ends_is_503_not_404(tmp_path):
    """A client (or a worker process) early on must hear "not yet", not "no such model"."""
    store = ModelStore(ServeSettings(repository=copy_repository(tmp_path / "repo")))
    with pytest.raises(NotReady, match="still loading"):
        store.get(DEFAULT_MODEL)
    asyncio.run(store.load_all())
    try:
        assert store.get(DEFAULT_MODEL).ready
        with pytest.raises(NotFound, match="unknown model 'nope'"):
            store.get("nope")
    finally:
        asyncio.run(store.close())


def _onnx_with_input_named(path: Path, name: str) -> None:
    x = helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 8])
    g = helper.make_tensor_value_info("gate_weights", TensorProto.FLOAT, ["batch", 8])
    graph = helper.make_graph(
        [
            helper.make_node("Identity", [name], ["output"]),
            helper.make_node("Identity", [name], ["gate_weights"]),
        ],
        "wrong",
        [x],
        [y, g],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, path)


def test_broken_new_versions_leave_the_loaded_one_serving(tmp_path, server_factory):
    repo = copy_repository(tmp_path / "repo")
    server = server_factory(repo)
    good = _predict(server).json()["predictions"]
    v1 = repo / DEFAULT_MODEL / "1"
    broken = {
        "2": "truncated",  # half a model file
        "3": "garbage",  # not ONNX at all
        "4": "wrong input",  # a valid graph whose input is not 'input'
        "5": "no sidecar",  # kanmoe.json missing
    }
    for version in broken:
        shutil.copytree(v1, repo / DEFAULT_MODEL / version)
    data = (v1 / "model.onnx").read_bytes()
    (repo / DEFAULT_MODEL / "2" / "model.onnx").write_bytes(data[: len(data) // 2])
    (repo / DEFAULT_MODEL / "3" / "model.onnx").write_bytes(b"\x00garbage" * 100)
    _onnx_with_input_named(repo / DEFAULT_MODEL / "4" / "model.onnx", "x")
    (repo / DEFAULT_MODEL / "5" / "kanmoe.json").unlink()

    r = httpx.post(f"{server.url}/v2/repository/models/{DEFAULT_MODEL}/load", json={})
    assert r.status_code == 200, r.text
    assert r.json()["versions"] == {
        "1": "READY",
        "2": "UNAVAILABLE",
        "3": "UNAVAILABLE",
        "4": "UNAVAILABLE",
        "5": "UNAVAILABLE",
    }
    errors = r.json()["errors"]
    assert "cannot load" in errors["2"] and "cannot load" in errors["3"]
    assert "expected one input named 'input'" in errors["4"]
    assert "kanmoe.json is missing" in errors["5"]
    assert _predict(server).json()["predictions"] == good  # version 1 still serves
    assert _predict(server).json()["version"] == "1"
    r = _predict(server, version=3)
    assert r.status_code == 503 and "UNAVAILABLE" in r.json()["error"]
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    index = httpx.post(server.url + "/v2/repository/index").json()
    assert {(e["version"], e["state"]) for e in index} >= {("1", "READY"), ("3", "UNAVAILABLE")}


def test_reload_picks_up_new_and_removed_versions_and_unload_works(tmp_path, server_factory):
    repo = copy_repository(tmp_path / "repo")
    server = server_factory(repo)
    shutil.copytree(repo / DEFAULT_MODEL / "1", repo / DEFAULT_MODEL / "2")
    load = f"{server.url}/v2/repository/models/{DEFAULT_MODEL}/load"
    assert httpx.post(load, json={}).status_code == 200
    assert _predict(server).json()["version"] == "2"  # the newest ready version by default
    assert _predict(server, version=1).json()["version"] == "1"
    shutil.rmtree(repo / DEFAULT_MODEL / "2")
    assert httpx.post(load, json={}).json()["versions"] == {"1": "READY"}
    assert _predict(server, version=2).status_code == 404
    r = httpx.post(f"{server.url}/v2/repository/models/{DEFAULT_MODEL}/unload", json={})
    assert r.status_code == 200, r.text
    assert _predict(server).status_code == 404
    assert httpx.get(server.url + "/v2/health/ready").status_code == 503
    assert httpx.post(load, json={}).status_code == 200
    assert _predict(server).status_code == 200
    missing = httpx.post(f"{server.url}/v2/repository/models/nothing/load", json={})
    assert missing.status_code == 404 and "no model 'nothing'" in missing.json()["error"]


def test_a_full_queue_answers_429_with_retry_after(server_factory):
    server = server_factory("model_repository", "--max-queue-rows", "4", "--max-delay-ms", "600")
    results: dict[str, httpx.Response] = {}
    first = threading.Thread(target=lambda: results.setdefault("a", _predict(server, rows=4)))
    first.start()
    time.sleep(0.2)  # the 4 rows now wait for the batch delay, filling the queue
    refused = _predict(server, rows=1)
    first.join()
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1" and "queue full" in refused.json()["error"]
    assert results["a"].status_code == 200 and len(results["a"].json()["predictions"]) == 4
    metrics = httpx.get(server.url + "/metrics").text
    assert f'kanmoe_rejected_total{{model="{DEFAULT_MODEL}",reason="queue_full"}} 1.0' in metrics


def test_sigterm_finishes_in_flight_requests_and_exits_zero(server_factory):
    server = server_factory("model_repository", "--max-delay-ms", "1000")
    responses: list[httpx.Response] = []
    client = httpx.Client(timeout=30)
    threads = [
        threading.Thread(
            target=lambda: responses.append(
                client.post(server.url + PREDICT, json={"inputs": [ROW]})
            )
        )
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    depth = f'kanmoe_queue_depth{{model="{DEFAULT_MODEL}",version="1"}} 8.0'
    deadline = time.monotonic() + 10
    while depth not in httpx.get(server.url + "/metrics").text:  # all 8 wait for the batch
        assert time.monotonic() < deadline, "requests never queued"
        time.sleep(0.02)
    server.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert server.process.wait(30) == 0, server.log()
    assert [r.status_code for r in responses] == [200] * 8
    assert "draining" in server.log()
    with pytest.raises(httpx.ConnectError):
        _predict(server)
    client.close()


def test_require_gpu_keeps_readiness_false_on_a_cpu_only_host(server_factory):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this host has CUDA; the CPU-only behaviour cannot be observed")
    server = server_factory(
        "model_repository", env={"KANMOE_REQUIRE_GPU": "true"}, wait_ready=False
    )
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(server.url + "/v2/health/ready")
        if "still loading" not in r.text or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.status_code == 503 and "CUDA is not active" in r.json()["error"]
    meta = httpx.get(f"{server.url}/v2/models/{DEFAULT_MODEL}").json()
    assert meta["parameters"]["providers"] == ["CPUExecutionProvider"]
    assert httpx.get(server.url + "/v2/health/live").status_code == 200


@pytest.fixture(scope="module")
def sequence_repository(tmp_path_factory) -> Path:
    """A tiny KAMoE-GRU trained for one epoch and exported, as a user would."""
    import pandas as pd

    from kanmoe.export.repository import export_run
    from kanmoe.model.config import apply_overrides, read_yaml, validate_config
    from kanmoe.model.training import train_run
    from kanmoe.paths import CONFIGS_DIR

    tmp = tmp_path_factory.mktemp("seq")
    rng = np.random.default_rng(0)
    rows = [
        {
            "time": t,
            "series": f"s{s}",
            "value": 50 * (s + 1) * (1.5 + np.sin(t / 6 + s)) + rng.normal(0, 1),
        }
        for s in range(2)
        for t in range(160)
    ]
    pd.DataFrame(rows).to_csv(tmp / "series.csv", index=False)
    raw = apply_overrides(
        read_yaml(CONFIGS_DIR / "sequence_kamoe_gru.yaml"),
        [
            f"data.path={tmp / 'series.csv'}",
            "data.window=12",
            "data.lookback=8",
            "data.horizon=2",
            "model.hidden=[6, 6]",
            "train.epochs=1",
            "train.threads=1",
        ],
    )
    train_run(validate_config(raw), tmp / "run", write_plots=False)
    export_run(tmp / "run", tmp / "repo", "seq", version=1)
    return tmp / "repo"


def test_a_sequence_model_is_served_end_to_end(sequence_repository, server_factory):
    server = server_factory(sequence_repository)
    info = httpx.get(server.url + "/v1/models/seq").json()["versions"][0]
    assert info["is_sequence"] and info["seq_len"] == 8 and "rolling median" in info["input_units"]
    rng = np.random.default_rng(1)
    windows = (rng.random((3, 8, 1)) + 0.5).astype(np.float32)
    session = ort.InferenceSession(
        str(sequence_repository / "seq" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    want, gates = session.run(["output", "gate_weights"], {"input": windows})
    r = httpx.post(server.url + "/v1/models/seq/predict", json={"inputs": windows.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(body["predictions"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(body["gate_weights"]["moe"], gates[:, -1, :], atol=1e-6)
    named = httpx.post(
        server.url + "/v1/models/seq/predict",
        json={"instances": [{"value": w[:, 0].tolist()} for w in windows]},
    )
    np.testing.assert_allclose(named.json()["predictions"], want, rtol=1e-5, atol=1e-6)
    v2 = httpx.post(
        server.url + "/v2/models/seq/infer",
        content=json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [3, 8, 1],
                        "data": windows.ravel().tolist(),
                    }
                ]
            }
        ),
    )
    assert v2.status_code == 200, v2.text
    out = {o["name"]: o for o in v2.json()["outputs"]}
    np.testing.assert_allclose(
        np.reshape(out["output"]["data"], out["output"]["shape"]), want, rtol=1e-5, atol=1e-6
    )
    flat = httpx.post(server.url + "/v1/models/seq/predict", json={"inputs": [[0.5, 0.6]]})
    assert flat.status_code == 400 and "[rows, steps, 1]" in flat.json()["error"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'kanmoe_expert_gate_weight_count{expert="expert_0",layer="moe",model="seq"' in metrics


def test_a_request_that_waits_past_its_deadline_gets_503(server_factory):
    server = server_factory(
        "model_repository", "--request-timeout-s", "0.3", "--max-delay-ms", "1000"
    )
    r = _predict(server)  # waits for a batch that holds off for 1 s: past the 0.3 s deadline
    assert r.status_code == 503 and "no result within 0.3 s" in r.json()["error"]
    assert r.headers["retry-after"] == "1"
    metrics = httpx.get(server.url + "/metrics").text
    assert f'kanmoe_rejected_total{{model="{DEFAULT_MODEL}",reason="timeout"}} 1.0' in metrics
    time.sleep(1.2)  # the abandoned row still ran; the server is healthy afterwards
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
