"""``/metrics`` of a real server after real traffic: gate counts, routing, ranges, drift."""

from __future__ import annotations

import json

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scipy.spatial.distance import jensenshannon

from kanmoe.paths import CALIFORNIA_HOUSING_CSV
from tests.serving import DEFAULT_MODEL, DEFAULT_REPOSITORY

SIDECAR = json.loads((DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "kanmoe.json").read_text())
FEATURES = SIDECAR["feature_names"]
EXPERTS = SIDECAR["expert_names"]["moe"]
PREDICT = f"/v1/models/{DEFAULT_MODEL}/predict"


def samples(server, name: str, **labels) -> dict[tuple, float]:
    """Samples of ``name`` whose labels include ``labels``, keyed by their sorted label items."""
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(server, name: str, **labels) -> float:
    found = samples(server, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return next(iter(found.values()))


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.read_csv(CALIFORNIA_HOUSING_CSV)


@pytest.fixture(scope="module")
def gates_of():
    session = ort.InferenceSession(
        str(DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    return lambda x: session.run(["gate_weights"], {"input": x})[0]


def test_gate_counts_and_routing_equal_the_rows_served(server_factory, frame, gates_of):
    server = server_factory(DEFAULT_REPOSITORY)
    x = frame[FEATURES].to_numpy(np.float32)[:300]
    sizes = [1, 7, 64, 3, 100, 125]  # 300 rows in requests of mixed sizes
    start = 0
    for n in sizes:
        r = httpx.post(server.url + PREDICT, json={"inputs": x[start : start + n].tolist()})
        assert r.status_code == 200
        start += n
    want = gates_of(x)
    for e, expert in enumerate(EXPERTS):
        mv = {"model": DEFAULT_MODEL, "version": "1", "layer": "moe", "expert": expert}
        assert value(server, "kanmoe_expert_gate_weight_count", **mv) == 300
        assert value(server, "kanmoe_expert_gate_weight_sum", **mv) == pytest.approx(
            float(want[:, e].sum()), rel=1e-4
        )
        le_half = value(server, "kanmoe_expert_gate_weight_bucket", le="0.5", **mv)
        assert le_half == int((want[:, e] <= 0.5).sum())
        routed = value(server, "kanmoe_expert_routed_total", **mv)
        assert routed == int((want.argmax(1) == e).sum())
    total = sum(samples(server, "kanmoe_expert_routed_total", model=DEFAULT_MODEL).values())
    assert total == 300
    assert value(server, "kanmoe_gate_entropy_count", model=DEFAULT_MODEL, layer="moe") == 300
    assert value(server, "kanmoe_rows_total", model=DEFAULT_MODEL, version="1") == 300
    batches = value(server, "kanmoe_batch_size_count", model=DEFAULT_MODEL, version="1")
    assert 1 <= batches <= len(sizes)
    assert value(
        server,
        "kanmoe_request_duration_seconds_count",
        model=DEFAULT_MODEL,
        route="v1_predict",
        status="2xx",
    ) == len(sizes)
    info = samples(server, "kanmoe_model_info", model=DEFAULT_MODEL, version="1")
    assert [dict(k)["providers"] for k in info] == ["CPUExecutionProvider"]


def test_out_of_range_rows_are_counted_per_feature_and_side(server_factory):
    server = server_factory(DEFAULT_REPOSITORY)
    ranges = SIDECAR["feature_ranges"]
    inside = [(lo + hi) / 2 for lo, hi in ranges.values()]
    above = list(inside)
    above[FEATURES.index("MedInc")] = ranges["MedInc"][1] + 1.0
    below = list(inside)
    below[FEATURES.index("Latitude")] = ranges["Latitude"][0] - 0.5
    at_min = [lo for lo, _ in ranges.values()]  # the training extremes are inside, even
    at_max = [hi for _, hi in ranges.values()]  # after the float32 rounding of the request
    r = httpx.post(
        server.url + PREDICT, json={"inputs": [inside, above, above, below, at_min, at_max]}
    )
    assert r.status_code == 200  # served: out of range is a signal, not an error
    oor = "kanmoe_input_out_of_range_total"
    assert value(server, oor, feature="MedInc", side="above") == 2
    assert value(server, oor, feature="Latitude", side="below") == 1
    others = {
        k: v
        for k, v in samples(server, oor).items()
        if (dict(k)["feature"], dict(k)["side"]) not in {("MedInc", "above"), ("Latitude", "below")}
    }
    assert set(others.values()) <= {0.0}


def test_gate_drift_rises_when_traffic_goes_to_one_expert(server_factory, frame, gates_of):
    server = server_factory(DEFAULT_REPOSITORY, env={"KANMOE_DRIFT_WINDOW": "256"})
    x = frame[FEATURES].to_numpy(np.float32)
    rng = np.random.default_rng(0)
    typical = x[rng.choice(len(x), 256, replace=False)]
    httpx.post(server.url + PREDICT, json={"inputs": typical.tolist()})
    drift = "kanmoe_gate_drift"
    calm = value(server, drift, model=DEFAULT_MODEL, layer="moe")
    g = gates_of(x)
    rare = int(np.argmin(SIDECAR["gate_reference"]["moe"]["shares"]))
    focused = x[np.argsort(-g[:, rare])[:256]]  # the rows the least-used expert owns most
    httpx.post(server.url + PREDICT, json={"inputs": focused.tolist()})
    shifted = value(server, drift, model=DEFAULT_MODEL, layer="moe")
    assert calm < 0.02, calm
    reference = np.asarray(SIDECAR["gate_reference"]["moe"]["shares"])
    live = gates_of(focused).mean(0)
    want = jensenshannon(live / live.sum(), reference / reference.sum(), base=2) ** 2
    assert shifted == pytest.approx(want, rel=1e-3)  # the window now holds only these rows
    assert shifted > 10 * calm and shifted > 0.2
