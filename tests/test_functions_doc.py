"""functions.json: the sampled edge functions are the layer's own, on the right (raw) axes.

The reference for every sampled curve is the torch layer's *forward* pass (not the
``edge_activations`` the exporter calls): with every other input held fixed, the change of
output ``q`` when input ``p`` moves is exactly the change of the edge ``phi_qp``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kanmoe.export.functions import (
    FUNCTIONS_FILE,
    functions_document,
    functions_json_bytes,
    write_functions,
)
from kanmoe.model.layers import KAN
from kanmoe.model.run import build_servable, load_run
from kanmoe.model.run_inspect import capture_inputs, kan_layers, probe_inputs
from kanmoe.paths import PROJECT_ROOT

RUN = PROJECT_ROOT / "default_run"
COMMITTED = PROJECT_ROOT / "model_repository" / "california_kamoe" / "1" / FUNCTIONS_FILE


@pytest.fixture(scope="module")
def default():
    servable = load_run(RUN)
    x_raw, source = probe_inputs(servable, rows=2048)
    assert source == "training data"
    doc = functions_document(servable, x_raw=x_raw)
    return servable, x_raw, doc


def _layers_by_label(servable, x_raw):
    return {i.label: i for i in kan_layers(servable, x_raw)}


def _layer_input(inp: dict) -> np.ndarray:
    """The layer's own input values at the document's x points."""
    x = np.asarray(inp["x"], dtype=np.float64)
    if inp["to_layer"] is None:
        return x
    return (x - inp["to_layer"]["offset"]) / inp["to_layer"]["factor"]


def test_every_kan_layer_with_role_and_depth(default):
    servable, x_raw, doc = default
    labels = [i.label for i in kan_layers(servable, x_raw)]
    assert [layer["label"] for layer in doc["layers"]] == labels
    roles = {
        layer["label"]: (layer["role"], layer["moe"], layer["expert"], layer["depth"])
        for layer in doc["layers"]
    }
    assert roles == {
        "moe.expert_0.0": ("expert", "moe", 0, 0),
        "moe.expert_1.0": ("expert", "moe", 1, 0),
        "moe.expert_2.0": ("expert", "moe", 2, 0),
        "moe.gate.layer1": ("gate", "moe", None, 0),
        "moe.gate.layer2": ("gate", "moe", None, 1),
    }
    assert doc["format"] == 1 and doc["symbolic"] is None
    assert doc["features"] == servable.feature_names


def test_sampled_curves_equal_the_layers_forward(default):
    servable, x_raw, doc = default
    infos = _layers_by_label(servable, x_raw)
    checked = 0
    for entry in doc["layers"]:
        layer = infos[entry["label"]].layer
        for p, inp in enumerate(entry["inputs"]):
            h = torch.as_tensor(_layer_input(inp), dtype=torch.float32)
            base = torch.full((len(h), layer.in_features), 0.1)
            moved = base.clone()
            moved[:, p] = h
            with torch.no_grad():
                delta = (layer(moved) - layer(base)).numpy()  # (P, out): phi_qp(h) - phi_qp(.1)
            delta = delta - delta[:1]  # phi_qp(h) - phi_qp(h[0])
            for edge in (e for e in entry["edges"] if e["in"] == p):
                y = np.asarray(edge["y"])
                err = np.abs((y - y[0]) - delta[:, edge["out"]]).max()
                assert err < 2e-4 * (np.abs(y).max() + 1e-3), (entry["label"], edge, err)
                checked += 1
    assert checked == sum(len(e["edges"]) for e in doc["layers"]) > 1000


def test_edges_are_the_strongest_live_ones(default):
    servable, x_raw, doc = default
    infos = _layers_by_label(servable, x_raw)
    seen = capture_inputs(
        servable.model, [i.layer for i in infos.values()], lambda: servable(x_raw)
    )
    k = doc["edges_per_input"]
    for entry in doc["layers"]:
        spread = np.asarray(entry["spread"])
        assert spread.shape == (entry["out_features"], entry["in_features"])
        for p in range(entry["in_features"]):
            listed = [e["out"] for e in entry["edges"] if e["in"] == p]
            assert len(listed) == min(k, entry["out_features"])
            rest = np.delete(spread[:, p], listed)
            assert spread[listed, p].min() >= rest.max() - 1e-3 * spread[:, p].max()
        # spread = std of the edge's output over the data, from the forward pass
        layer = infos[entry["label"]].layer
        top = entry["edges"][0]
        h = seen[id(layer)]  # all 2048 rows, as the exporter ranks them
        moved = torch.zeros_like(h)
        moved[:, top["in"]] = h[:, top["in"]]
        with torch.no_grad():
            out = layer(moved)[:, top["out"]].double().std().item()
        assert top["spread"] == pytest.approx(out, rel=2e-3), entry["label"]


def test_raw_axis_maps_back_through_the_standardisation(default):
    servable, x_raw, doc = default
    expert = doc["layers"][0]
    info = _layers_by_label(servable, x_raw)[expert["label"]]
    h = capture_inputs(servable.model, [info.layer], lambda: servable(x_raw))[id(info.layer)]
    z = (x_raw - servable.x_mean) / servable.x_std
    inside = (z.abs() < servable.input_clip).all(1)  # clipped rows carry no raw value
    for p, name in enumerate(servable.feature_names):
        inp = expert["inputs"][p]
        assert inp["name"] == name and inp["units"] == "raw"
        back = (x_raw[inside, p].double() - inp["to_layer"]["offset"]) / inp["to_layer"]["factor"]
        np.testing.assert_allclose(back.numpy(), h[inside, p].double().numpy(), atol=1e-4)
        # the axis spans exactly the data that reach the layer (clipped at ±clip std)
        hp = h[:, p].double().numpy()
        np.testing.assert_allclose(_layer_input(inp)[[0, -1]], [hp.min(), hp.max()], atol=1e-5)
        assert len(inp["x"]) == doc["points"]
        assert sum(inp["density"]) == pytest.approx(1.0, abs=1e-3)
    assert {i["units"] for i in expert["inputs"][8:]} == {"scaled"}  # rotation projections
    assert {i["units"] for i in doc["layers"][3]["inputs"]} == {"hidden"}


def test_plain_kan_has_kan_roles_and_known_axes():
    torch.manual_seed(0)
    model = KAN([3, 4, 1], basis="linear")
    mean, std = [10.0, -2.0, 0.5], [4.0, 0.5, 2.0]
    servable = build_servable(model, ["a", "b", "c"], ["y"], mean, std, [0.0], [1.0])
    x = torch.tensor(mean) + torch.tensor(std) * torch.randn(500, 3)
    doc = functions_document(servable, x_raw=x, points=16, edges_per_input=2)
    assert [(e["role"], e["depth"], e["moe"]) for e in doc["layers"]] == [
        ("kan", 0, None),
        ("kan", 1, None),
    ]
    first = doc["layers"][0]
    for p, inp in enumerate(first["inputs"]):
        assert inp["to_layer"] == pytest.approx({"offset": mean[p], "factor": std[p]})
        assert inp["x"][0] == pytest.approx(float(x[:, p].min()), rel=1e-5)
        assert inp["x"][-1] == pytest.approx(float(x[:, p].max()), rel=1e-5)
        assert len(inp["x"]) == 16
    assert len(first["edges"]) == 3 * 2


def test_size_is_bounded(default):
    _, _, doc = default
    size = len(functions_json_bytes(doc))
    assert size < 1_000_000, size
    n_in = sum(layer["in_features"] for layer in doc["layers"])
    assert sum(len(layer["edges"]) for layer in doc["layers"]) <= n_in * doc["edges_per_input"]


def _fit(name: str, r2: float) -> dict:
    return {"name": name, "a": 0.5, "b": 1.0, "c": 0.0, "d": -0.1, "r2": r2, "complexity": 1}


def test_symbolic_included_and_written_atomically(default, tmp_path):
    servable, x_raw, doc = default
    first = doc["layers"][0]
    shown = first["edges"][0]
    # symbolic.json as ``kanmoe symbolic`` writes it: every edge's best form per layer
    edges = [
        {"layer": 0, "in": p, "out": q, "locked": False, "best": _fit("x", 0.5)}
        for p in range(first["in_features"])
        for q in range(first["out_features"])
    ]
    target = next(e for e in edges if (e["in"], e["out"]) == (shown["in"], shown["out"]))
    target["best"] = _fit("sin", 0.995)
    edges[-1]["locked"] = True
    table = {
        "threshold": 0.99,
        "fitted_over": "training data",
        "formulas": [{"module": "x", "formula": None, "why_not": "not all edges symbolic"}],
        "layers": [{"label": first["label"], "edges": edges}],
    }
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "symbolic.json").write_text(json.dumps(table))
    version = tmp_path / "repo" / "m" / "1"
    path = write_functions(version, servable, run_dir, x_raw=x_raw)
    assert path == version / FUNCTIONS_FILE
    assert [p.name for p in version.iterdir()] == [FUNCTIONS_FILE]  # no temp file left
    written = json.loads(path.read_text())
    summary = written["symbolic"]
    assert summary["threshold"] == 0.99 and summary["formulas"] == table["formulas"]
    assert summary["layers"] == [
        {"label": first["label"], "edges": len(edges), "symbolic_edges": 2}
    ]
    top = written["layers"][0]["edges"][0]
    assert (top["in"], top["out"]) == (shown["in"], shown["out"])
    assert top["symbolic"] == {
        "form": "sin",
        "a": 0.5,
        "b": 1.0,
        "c": 0.0,
        "d": -0.1,
        "r2": 0.995,
        "locked": False,
    }
    assert all(e["symbolic"]["form"] in ("x", "sin") for e in written["layers"][0]["edges"])
    assert all("symbolic" not in e for e in written["layers"][1]["edges"])  # not in the table


def test_bad_arguments_are_refused(default):
    servable, x_raw, _ = default
    with pytest.raises(ValueError, match="points"):
        functions_document(servable, x_raw=x_raw[:8], points=1)
    with pytest.raises(ValueError, match="edges_per_input"):
        functions_document(servable, x_raw=x_raw[:8], edges_per_input=0)


def test_committed_default_file_matches_the_default_run(default):
    """model_repository's functions.json is the shipped run's, not a stale one."""
    servable, x_raw, _ = default
    shipped = json.loads(COMMITTED.read_text())
    assert shipped["data"]["source"] == "training data"
    infos = _layers_by_label(servable, x_raw)
    for entry in shipped["layers"]:
        layer = infos[entry["label"]].layer
        for edge in entry["edges"][:: max(1, len(entry["edges"]) // 20)]:
            h = torch.as_tensor(_layer_input(entry["inputs"][edge["in"]]), dtype=torch.float32)
            full = torch.zeros(len(h), layer.in_features)
            full[:, edge["in"]] = h
            with torch.no_grad():
                ref = layer.edge_activations(full)[:, edge["out"], edge["in"]].numpy()
            np.testing.assert_allclose(edge["y"], ref, rtol=1e-4, atol=1e-5 + 1e-4 * abs(ref).max())
