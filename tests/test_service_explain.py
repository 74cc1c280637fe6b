"""v1 ``"explain": true`` against a real server: per-expert predictions and contributions that
add up to the prediction, nothing extra without it, and clear refusals where it cannot work."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from kanmoe.paths import CALIFORNIA_HOUSING_CSV
from kanmoe.service.batcher import MicroBatcher
from tests.serving import DEFAULT_MODEL, DEFAULT_REPOSITORY, copy_repository

PREDICT = f"/v1/models/{DEFAULT_MODEL}/predict"
MODEL_FILE = DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "model.onnx"
SIDECAR = DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "kanmoe.json"


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    frame = pd.read_csv(CALIFORNIA_HOUSING_CSV, nrows=300)
    features = json.loads(SIDECAR.read_text())["feature_names"]
    return frame[features].to_numpy(np.float32)


def test_contributions_plus_offset_are_the_prediction(default_server, rows):
    r = httpx.post(
        default_server.url + PREDICT, json={"inputs": rows.tolist(), "explain": True}, timeout=30
    )
    assert r.status_code == 200, r.text
    body = r.json()
    ex = body["explanation"]
    pred = np.array(body["predictions"])
    contributions = np.array(ex["contributions"])
    experts = np.array(ex["expert_predictions"])
    weights = np.array(body["gate_weights"][ex["layer"]])
    assert contributions.shape == experts.shape == (len(rows), len(body["experts"]["moe"]))
    np.testing.assert_allclose(ex["offset"] + contributions.sum(1), pred, atol=1e-5, rtol=0)
    np.testing.assert_allclose(contributions, weights * (experts - ex["offset"]), atol=1e-9)
    # the experts' own predictions are what the ONNX file itself says, row for row
    session = ort.InferenceSession(str(MODEL_FILE), providers=["CPUExecutionProvider"])
    (want,) = session.run(["expert_outputs"], {"input": rows})
    np.testing.assert_allclose(experts, want[:, :, 0], rtol=1e-5, atol=1e-6)
    # and they differ between experts somewhere: the split says something
    assert np.ptp(experts, axis=1).max() > 1e-3


def test_without_explain_nothing_extra_is_sent(default_server, rows):
    for payload in ({"inputs": rows[:3].tolist()}, {"inputs": rows[:3].tolist(), "explain": False}):
        body = httpx.post(default_server.url + PREDICT, json=payload, timeout=30).json()
        assert "explanation" not in body and len(body["predictions"]) == 3


def test_explain_with_named_instances_and_a_bad_flag(default_server, rows):
    names = json.loads(SIDECAR.read_text())["feature_names"]
    instance = dict(zip(names, rows[0].tolist(), strict=True))
    r = httpx.post(default_server.url + PREDICT, json={"instances": [instance], "explain": True})
    assert r.status_code == 200 and len(r.json()["explanation"]["contributions"]) == 1
    ex, (pred,) = r.json()["explanation"], r.json()["predictions"]  # the few-rows code path
    assert abs(ex["offset"] + sum(ex["contributions"][0]) - pred) < 1e-5
    bad_flag = {"inputs": [rows[0].tolist()], "explain": 1}
    bad = httpx.post(default_server.url + PREDICT, json=bad_flag)
    assert bad.status_code == 400 and "'explain' must be true or false" in bad.json()["error"]


def test_explain_and_plain_requests_batched_together_each_get_their_own(server_factory, rows):
    server = server_factory(DEFAULT_REPOSITORY, "--max-delay-ms", "20")

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(PREDICT, json={"inputs": [rows[i].tolist()], "explain": i % 2 == 0})
                    for i in range(16)
                )
            )

    replies = asyncio.run(main())
    for i, r in enumerate(replies):
        assert r.status_code == 200, r.text
        assert ("explanation" in r.json()) == (i % 2 == 0)


def test_a_model_exported_without_expert_outputs_refuses_explain_clearly(tmp_path, server_factory):
    repo = copy_repository(tmp_path / "repo")
    sidecar = repo / DEFAULT_MODEL / "1" / "kanmoe.json"
    info = json.loads(sidecar.read_text())
    for key in ("expert_outputs", "explain"):
        info.pop(key)
    info["outputs"].pop("expert_outputs")
    sidecar.write_text(json.dumps(info))
    server = server_factory(repo)
    row = [8.3252, 41.0, 6.984, 1.024, 322.0, 2.556, 37.88, -122.23]
    r = httpx.post(server.url + PREDICT, json={"inputs": [row], "explain": True})
    assert r.status_code == 400
    assert "exported without per-expert outputs" in r.json()["error"]
    assert "kanmoe export" in r.json()["error"]
    assert httpx.post(server.url + PREDICT, json={"inputs": [row]}).status_code == 200


def test_a_batch_runs_the_full_graph_only_when_a_request_in_it_asks():
    calls: list[str] = []

    def run(x):
        calls.append("base")
        return {"output": x}

    def run_full(x):
        calls.append("full")
        return {"output": x, "extra": -x}

    async def main():
        b = MicroBatcher(run, run_full=run_full, max_batch_rows=64, max_delay_s=0.02)
        plain = [np.full((1, 2), i, np.float32) for i in range(3)]
        outs = await asyncio.gather(*(b.submit(x) for x in plain))
        mixed = await asyncio.gather(
            b.submit(np.ones((1, 2), np.float32)), b.submit(np.ones((1, 2), np.float32), full=True)
        )
        await b.close()
        return outs, mixed

    outs, mixed = asyncio.run(main())
    assert calls == ["base", "full"]  # one batch each: the second holds the full request
    assert all("extra" not in o for o in outs)
    assert "extra" in mixed[1] and mixed[1]["extra"].shape == (1, 2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"explain": {"layer": "nope", "output": "expert_outputs", "offset": [1.0]}}, "'explain'"),
        ({"explain": {"layer": "moe", "output": "expert_outputs", "offset": []}}, "per target"),
        ({"expert_outputs": {"other": "x"}}, "'expert_outputs'"),
    ],
)
def test_an_inconsistent_explain_sidecar_is_refused_at_load(tmp_path, change, message):
    from kanmoe.service.model_spec import ModelSpecError, load_spec

    version_dir = copy_repository(tmp_path / "repo") / DEFAULT_MODEL / "1"
    info = json.loads((version_dir / "kanmoe.json").read_text())
    assert load_spec(version_dir).explain is not None  # the shipped one is consistent
    (version_dir / "kanmoe.json").write_text(json.dumps({**info, **change}))
    with pytest.raises(ModelSpecError, match=message):
        load_spec(version_dir)
