"""The v1 API and the error contract, against a real ``kanmoe serve`` on loopback."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from kanmoe.paths import CALIFORNIA_HOUSING_CSV
from tests.serving import DEFAULT_MODEL, DEFAULT_REPOSITORY

MODEL_FILE = DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "model.onnx"
FEATURES = json.loads((MODEL_FILE.parent / "kanmoe.json").read_text())["feature_names"]
PREDICT = f"/v1/models/{DEFAULT_MODEL}/predict"


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    frame = pd.read_csv(CALIFORNIA_HOUSING_CSV, nrows=40)
    return frame[FEATURES].to_numpy(np.float32)


@pytest.fixture(scope="module")
def reference():
    session = ort.InferenceSession(str(MODEL_FILE), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out, gates = session.run(["output", "gate_weights"], {"input": x})
        return out, gates

    return run


@pytest.fixture(scope="module")
def client(default_server):
    with httpx.Client(base_url=default_server.url, timeout=30) as c:
        yield c


def test_named_and_positional_inputs_equal_the_onnx_file(client, rows, reference):
    want, want_gates = reference(rows)
    named = client.post(
        PREDICT, json={"instances": [dict(zip(FEATURES, map(float, r), strict=True)) for r in rows]}
    )
    positional = client.post(PREDICT, json={"inputs": rows.tolist()})
    for response in (named, positional):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == DEFAULT_MODEL and body["version"] == "1"
        assert body["experts"] == {"moe": ["expert_0", "expert_1", "expert_2"]}
        np.testing.assert_allclose(body["predictions"], want[:, 0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(body["gate_weights"]["moe"], want_gates, atol=1e-6)
    versioned = client.post(
        f"/v1/models/{DEFAULT_MODEL}/versions/1/predict", json={"inputs": rows[:3].tolist()}
    )
    np.testing.assert_allclose(versioned.json()["predictions"], want[:3, 0], rtol=1e-6)


def test_concurrent_requests_are_batched_and_answered_correctly(default_server, rows, reference):
    """64 concurrent one-row requests: each gets its own row's answer back."""
    import asyncio

    want, _ = reference(rows)

    async def main():
        async with httpx.AsyncClient(base_url=default_server.url, timeout=30) as c:
            tasks = [
                c.post(PREDICT, json={"inputs": [rows[i % len(rows)].tolist()]}) for i in range(64)
            ]
            return await asyncio.gather(*tasks)

    responses = asyncio.run(main())
    for i, r in enumerate(responses):
        assert r.status_code == 200
        assert r.json()["predictions"][0] == pytest.approx(
            float(want[i % len(rows), 0]), rel=1e-5, abs=1e-6
        )


def test_model_list_names_features_ranges_targets_experts(client):
    body = client.get("/v1/models").json()
    (model,) = [m for m in body["models"] if m["name"] == DEFAULT_MODEL]
    (version,) = model["versions"]
    assert version["state"] == "READY" and version["providers"] == ["CPUExecutionProvider"]
    assert [f["name"] for f in version["features"]] == FEATURES
    frame = pd.read_csv(CALIFORNIA_HOUSING_CSV)
    for f in version["features"]:  # the training range lies inside the whole data set's
        assert frame[f["name"]].min() <= f["min"] < f["max"] <= frame[f["name"]].max()
    assert version["targets"] == ["MedHouseVal"]
    assert version["experts"] == {"moe": ["expert_0", "expert_1", "expert_2"]}
    assert client.get(f"/v1/models/{DEFAULT_MODEL}").json()["name"] == DEFAULT_MODEL


def _row(**override) -> dict:
    row = dict.fromkeys(FEATURES, 1.0)
    row.update(override)
    return row


BAD_V1 = [
    ("malformed json", b'{"inputs": [[1, 2', 400, "malformed JSON"),
    ("not an object", b"[1, 2, 3]", 400, "JSON object"),
    ("empty body", b"", 400, "empty request body"),
    (
        "both keys",
        json.dumps({"inputs": [[1] * 8], "instances": [_row()]}).encode(),
        400,
        "exactly one",
    ),
    ("unknown key", json.dumps({"rows": [[1] * 8]}).encode(), 400, "unknown keys ['rows']"),
    ("wrong width", json.dumps({"inputs": [[1.0] * 7]}).encode(), 400, "expected shape [rows, 8]"),
    ("wrong rank", json.dumps({"inputs": [1.0] * 8}).encode(), 400, "expected shape [rows, 8]"),
    ("ragged", json.dumps({"inputs": [[1.0] * 8, [1.0] * 7]}).encode(), 400, "ragged"),
    ("string value", json.dumps({"inputs": [["a"] * 8]}).encode(), 400, "must be a number"),
    ("bool value", json.dumps({"inputs": [[True] * 8]}).encode(), 400, "booleans"),
    ("null value", json.dumps({"inputs": [[None] * 8]}).encode(), 400, "must be a number"),
    ("empty batch", json.dumps({"inputs": []}).encode(), 400, "empty batch"),
    ("empty instances", json.dumps({"instances": []}).encode(), 400, "empty batch"),
    (
        "missing feature",
        json.dumps({"instances": [{"MedInc": 1.0}]}).encode(),
        400,
        "missing features",
    ),
    (
        "unknown feature",
        json.dumps({"instances": [_row(Colour=1.0)]}).encode(),
        400,
        "unknown features ['Colour']",
    ),
    (
        "overflow to inf",
        json.dumps({"inputs": [[1e39] + [1.0] * 7]}).encode(),
        400,
        "feature 'MedInc' is not finite",
    ),
    (
        "explain not bool",
        json.dumps({"inputs": [[1.0] * 8], "explain": "yes"}).encode(),
        400,
        "'explain' must be true or false",
    ),
]


@pytest.mark.parametrize(("case", "body", "status", "message"), BAD_V1, ids=[c[0] for c in BAD_V1])
def test_bad_v1_input_gets_a_4xx_naming_the_problem(client, case, body, status, message):
    response = client.post(PREDICT, content=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_wrong_content_type_is_415_with_the_fix_in_the_message(client):
    form = client.post(
        PREDICT,
        content=b'{"inputs": [[1,1,1,1,1,1,1,1]]}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 415 and "-H 'Content-Type: application/json'" in form.json()["error"]
    v2 = client.post(
        f"/v2/models/{DEFAULT_MODEL}/infer", content=b"x=1", headers={"Content-Type": "text/plain"}
    )
    assert v2.status_code == 415 and "'text/plain'" in v2.json()["error"]
    charset = client.post(
        PREDICT,
        content=b'{"inputs": [[1,1,1,1,1,1,1,1]]}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert charset.status_code == 200


def test_access_log_is_json_with_the_request_id(server_factory):
    server = server_factory(DEFAULT_REPOSITORY, "--access-log")
    httpx.post(
        server.url + PREDICT, json={"inputs": [[1.0] * 8]}, headers={"X-Request-ID": "trace-42"}
    )
    httpx.get(server.url + "/v1/models", headers={"X-Request-ID": "trace-43"})
    deadline = time.monotonic() + 10
    while True:  # the line is written just after the response is sent
        lines = [
            json.loads(line[line.index("{") :])
            for line in server.log().splitlines()
            if "kanmoe.access" in line
        ]
        by_id = {entry["request_id"]: entry for entry in lines}
        if {"trace-42", "trace-43"} <= set(by_id) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert by_id["trace-42"]["status"] == 200 and by_id["trace-42"]["model"] == DEFAULT_MODEL
    assert by_id["trace-42"]["path"] == PREDICT and by_id["trace-42"]["ms"] > 0
    assert by_id["trace-43"]["status"] == 200 and by_id["trace-43"]["path"] == "/v1/models"


def test_two_workers_serve_and_drain(server_factory):
    server = server_factory(DEFAULT_REPOSITORY, "--workers", "2")
    answers = {
        httpx.post(server.url + PREDICT, json={"inputs": [[1.0] * 8]}).status_code
        for _ in range(20)
    }
    assert answers == {200}
    assert server.stop() == 0


def test_nan_literal_and_huge_row_counts_are_refused(client):
    nan = client.post(PREDICT, content=b'{"inputs": [[NaN, 1, 1, 1, 1, 1, 1, 1]]}')
    assert nan.status_code == 400 and "malformed JSON" in nan.json()["error"]
    many = client.post(PREDICT, json={"inputs": [[1.0] * 8] * 5000})
    assert many.status_code == 413 and "limit of 4096" in many.json()["error"]


def test_unknown_model_version_route_and_method(client):
    r = client.post("/v1/models/nope/predict", json={"inputs": [[1.0] * 8]})
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    r = client.post(f"/v1/models/{DEFAULT_MODEL}/versions/9/predict", json={"inputs": [[1] * 8]})
    assert r.status_code == 404 and "no version '9'" in r.json()["error"]
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get(PREDICT)
    assert r.status_code == 405 and "error" in r.json()


def test_body_over_the_limit_is_413(server_factory):
    server = server_factory(DEFAULT_REPOSITORY, "--max-body-bytes", "2048")
    big = json.dumps({"inputs": [[1.5] * 8] * 100}).encode()
    assert len(big) > 2048
    r = httpx.post(server.url + PREDICT, content=big)
    assert r.status_code == 413 and "2048 bytes" in r.json()["error"]
    small = httpx.post(server.url + PREDICT, json={"inputs": [[1.5] * 8]})
    assert small.status_code == 200


def test_request_id_is_echoed_or_made(client):
    r = client.get("/v2/health/live", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.post(PREDICT, json={"inputs": [[1.0] * 8]}, headers={"X-Request-ID": "p-9"})
    assert r.headers["x-request-id"] == "p-9"
    assert len(client.get("/v2/health/live").headers["x-request-id"]) == 16


def test_docs_examples_work_as_shown(client):
    spec = client.get("/openapi.json").json()
    assert client.get("/docs").status_code == 200
    examples = spec["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"][
        "application/json"
    ]["examples"]
    for example in examples.values():
        r = client.post(PREDICT, json=example["value"])
        assert r.status_code == 200, r.text
    v2 = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]
    for example in v2["examples"]:
        r = client.post(f"/v2/models/{DEFAULT_MODEL}/infer", json=example)
        assert r.status_code == 200, r.text


def test_bearer_token_guards_model_routes_not_health_or_metrics(server_factory):
    server = server_factory(DEFAULT_REPOSITORY, env={"KANMOE_API_TOKEN": "s3cret"})
    body = {"inputs": [[1.0] * 8]}
    r = httpx.post(server.url + PREDICT, json=body)
    assert r.status_code == 401 and "bearer token" in r.json()["error"]
    r = httpx.post(server.url + PREDICT, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.post(server.url + PREDICT, json=body, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_cors_origins_from_settings(server_factory):
    server = server_factory(DEFAULT_REPOSITORY, "--cors-origins", "http://dash.local")
    r = httpx.options(
        server.url + PREDICT,
        headers={"Origin": "http://dash.local", "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://dash.local"
    r = httpx.post(
        server.url + PREDICT,
        json={"inputs": [[1.0] * 8]},
        headers={"Origin": "http://evil.example"},
    )
    assert "access-control-allow-origin" not in r.headers


def test_gzip_request_body_is_refused_on_v1_with_a_message(client):
    # v1 is plain JSON; a compressed body must be a clean 400, never a 500.
    r = client.post(PREDICT, content=gzip.compress(b'{"inputs": [[1,1,1,1,1,1,1,1]]}'))
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]


def test_importing_the_service_does_not_import_torch():
    code = (
        "import sys, kanmoe.service, kanmoe.service.app, kanmoe.service.server, "
        "kanmoe.commands.serve; kanmoe.service.app.create_app; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
