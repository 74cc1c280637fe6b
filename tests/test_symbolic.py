"""Symbolic regression of KAN edges: exact forms recovered, domains respected, the issue's
sin(pi x1) + x2^2 recovery from a trained KAN, formulas, and ``kanmoe symbolic`` on a run."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sympy as sp
import torch
import yaml

from kanmoe.model import KAN, KANLinear
from kanmoe.model.symbolic import (
    DEFAULT_LIBRARY,
    SymbolicFunction,
    fit_many,
    make_library,
)


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: one intra-op thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_default_library_is_the_issues_list():
    expected = {"x", "x^2", "x^3", "x^4", "1/x", "sqrt", "exp", "log", "sin", "tan", "tanh"}
    expected |= {"abs", "sigmoid", "gaussian", "0"}
    assert set(DEFAULT_LIBRARY) == expected


@pytest.mark.parametrize(
    ("truth", "lo", "hi", "expected"),
    [
        (lambda x: 2.0 * np.sin(3.0 * x + 0.5) - 1.0, -1.0, 2.0, {"sin"}),
        (lambda x: 0.5 * np.exp(1.5 * x) + 2.0, -1.0, 1.0, {"exp"}),
        (lambda x: np.log(x + 2.0), -1.0, 1.0, {"log"}),
        (lambda x: 3.0 * (x - 0.3) ** 2 + 0.1, -1.0, 1.0, {"x^2"}),
        (lambda x: np.tanh(4.0 * x - 1.0), -1.0, 1.0, {"tanh", "sigmoid"}),
        (lambda x: 1.0 / (x + 1.5), -1.0, 1.0, {"1/x"}),
        (lambda x: np.sqrt(x + 1.2), -1.0, 1.0, {"sqrt"}),
        (lambda x: -0.7 * x + 0.2, 0.0, 5.0, {"x"}),
        (lambda x: np.exp(-((2 * x - 1) ** 2)), -1.0, 2.0, {"gaussian"}),
        (lambda x: np.abs(x - 4.0), 0.0, 10.0, {"abs"}),
    ],
)
def test_exact_forms_are_recovered(truth, lo, hi, expected):
    x = np.linspace(lo, hi, 128)
    y = truth(x)
    best = fit_many(torch.tensor(x), torch.tensor(y)[:, None])[0][0]
    assert best.name in expected, [
        (f.name, f.r2) for f in fit_many(torch.tensor(x), torch.tensor(y))[0]
    ]
    assert best.r2 > 0.99999
    fine = np.linspace(lo, hi, 1001)  # between the fitted points too
    pred = best(torch.tensor(fine)).numpy()
    assert np.abs(pred - truth(fine)).max() < 1e-2 * (1 + np.abs(truth(fine)).max())
    # the sympy form is the same function
    sx = sp.Symbol("x")
    f = sp.lambdify(sx, best.expr(sx), "numpy")
    np.testing.assert_allclose(f(fine), pred, rtol=1e-9, atol=1e-9)


def test_every_suggestion_is_finite_over_the_whole_range():
    # a wiggly target that no form fits: domain-limited forms must still stay finite
    x = torch.linspace(-1.0, 1.0, 64, dtype=torch.float64)
    y = torch.sin(7 * x) + 0.3 * x**3
    fits = fit_many(x, y[:, None])[0]
    assert {f.name for f in fits} >= {"sin", "x", "0"}
    fine = torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64)
    for f in fits:
        assert torch.isfinite(f(fine)).all(), f


def test_custom_library_entry_and_unknown_name():
    cosh = SymbolicFunction("cosh", torch.cosh, sp.cosh, complexity=2)
    x = torch.linspace(-1.0, 1.0, 100, dtype=torch.float64)
    y = 0.5 * torch.cosh(2.0 * x - 0.3) + 1.0
    fits = fit_many(x, y[:, None], library=["x", "x^2", cosh])[0]
    assert fits[0].name == "cosh" and fits[0].r2 > 0.99999
    assert sorted(f.name for f in fits) == ["cosh", "x", "x^2"]
    with pytest.raises(ValueError, match="cosine"):
        make_library(["cosine"])
    with pytest.raises(ValueError, match="search"):
        SymbolicFunction("bad", torch.sin, sp.sin, search="everything")


def test_constant_edge_is_zero():
    layer = KANLinear(2, 1, init="zero")
    fits = layer.suggest_symbolic(0, 0)
    assert fits[0].name == "0" and fits[0].r2 == 1.0
    with pytest.raises(ValueError, match="in_idx 5"):
        layer.suggest_symbolic(5, 0)
    with pytest.raises(ValueError, match="out_idx 1"):
        layer.suggest_symbolic(0, 1)


def _sin_square_kan() -> tuple[KAN, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.rand(512, 2) * 2 - 1
    y = torch.sin(math.pi * x[:, :1]) + x[:, 1:] ** 2
    model = KAN([2, 1], grid_size=10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
    return model, x, y


def test_kan_recovers_sin_pi_x1_plus_x2_squared():
    model, x, y = _sin_square_kan()
    layer = model.layers[0]
    assert layer.suggest_symbolic(0, 0)[0].name == "sin"
    assert layer.suggest_symbolic(1, 0)[0].name == "x^2"
    reports = model.auto_symbolic(r2_threshold=0.99)
    best = {r.in_idx: r for r in reports}
    assert best[0].best.name == "sin" and best[0].r2 > 0.99 and best[0].locked
    assert best[1].best.name == "x^2" and best[1].r2 > 0.99 and best[1].locked
    assert abs(abs(best[0].best.b) - math.pi) < 0.02  # sin(pi x1): the frequency is found too
    (formula,) = model.symbolic_formula(var_names=["x1", "x2"])
    x1, x2 = sp.symbols("x1 x2")
    assert formula.has(sp.sin) and formula.free_symbols == {x1, x2}
    assert sp.diff(formula, x1, x2) == 0  # additive: one term per input, as trained
    f = sp.lambdify((x1, x2), formula, "numpy")
    pred = f(x[:, 0].double().numpy(), x[:, 1].double().numpy())
    rms = float(np.sqrt(np.mean((pred - y[:, 0].double().numpy()) ** 2)))
    assert rms < 1e-2, (formula, rms)
    # the locked model still predicts the data (splines refitted to the forms)
    with torch.no_grad():
        assert float((model(x) - y).pow(2).mean().sqrt()) < 2e-2


def test_fit_over_the_data_range():
    model, x, _ = _sin_square_kan()
    reports = model.auto_symbolic(0.99, x=x * 0.5)  # data covering half the grid
    assert all(r.locked for r in reports)
    assert {r.best.name for r in reports} == {"sin", "x^2"}


def test_formula_needs_every_live_edge_and_skips_pruned_ones():
    model, _, _ = _sin_square_kan()
    with pytest.raises(ValueError, match="no symbolic form"):
        model.symbolic_formula()
    layer = model.layers[0]
    layer.auto_symbolic(0.99, inputs=[0])  # only the sin edge
    with pytest.raises(ValueError, match=r"first in 1 -> out 0"):
        model.symbolic_formula()
    layer.edge_mask[0, 1] = 0.0  # prune the x2 edge: it contributes exactly 0
    layer._flags_from_buffers()
    (formula,) = model.symbolic_formula(["a", "b"])
    assert formula.free_symbols == {sp.Symbol("a")}
    layer.unlock(0, 0)  # unlocked edges may drift: no longer symbolic
    with pytest.raises(ValueError, match="no symbolic form"):
        model.symbolic_formula()


@pytest.mark.slow
def test_symbolic_command_on_a_trained_kan_run(tmp_path: Path):
    from typer.testing import CliRunner

    from kanmoe.cli import app
    from kanmoe.model.config import validate_config
    from kanmoe.model.training import train_run

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(1500, 2))
    df = pd.DataFrame({"u": x[:, 0], "v": x[:, 1]})
    df["y"] = np.sin(np.pi * df.u) + df.v**2
    df.to_csv(tmp_path / "data.csv", index=False)
    raw = {
        "name": "sym",
        "seed": 0,
        "data": {"kind": "tabular", "path": str(tmp_path / "data.csv"), "target": "y"},
        "model": {"kind": "kan", "hidden": [], "grid_size": 10, "grid_range": [-1.8, 1.8]},
        "train": {"epochs": 40, "batch_size": 64, "lr": 1e-2, "threads": 1, "progress": False},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    _, metrics = train_run(validate_config(raw), tmp_path / "run", write_plots=False)
    assert metrics["test"]["r2"] > 0.99

    result = CliRunner().invoke(app, ["symbolic", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "symbolic.json").read_text())
    (layer,) = report["layers"]
    assert layer["inputs"] == ["u", "v"]
    forms = {e["input"]: e["best"]["name"] for e in layer["edges"]}
    assert forms == {"u": "sin", "v": "x^2"}
    (formula,) = report["formulas"]
    raw_expr = sp.sympify(formula["raw_units"]["y"])
    f = sp.lambdify(sp.symbols("u v"), raw_expr, "numpy")
    rms = float(np.sqrt(np.mean((f(df.u.values, df.v.values) - df.y.values) ** 2)))
    assert rms < 2e-2, (raw_expr, rms)
    assert "1/1 edges symbolic" not in result.output  # two edges, both symbolic:
    assert "2/2 edges symbolic" in result.output and "raw units: y =" in result.output

    bad = CliRunner().invoke(app, ["symbolic", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "run dir not found" in bad.output


def test_two_layer_formula_composes_the_recorded_forms():
    torch.manual_seed(3)
    model = KAN([2, 2, 1], grid_size=5)
    reports = model.auto_symbolic(r2_threshold=0.0)  # lock every edge to its best form
    assert len(reports) == 6 and all(r.locked for r in reports)
    (formula,) = model.symbolic_formula(simplify=False, digits=10)
    x = torch.rand(64, 2, dtype=torch.float64) * 2 - 1
    h = x
    for layer in model.layers:  # compose the fitted torch forms directly, edge by edge
        h = torch.stack(
            [
                sum(layer.symbolic_edges[(q, p)](h[:, p]) for p in range(layer.in_features))
                for q in range(layer.out_features)
            ],
            dim=1,
        )
    f = sp.lambdify(sp.symbols("x1 x2"), formula, "numpy")
    np.testing.assert_allclose(f(x[:, 0].numpy(), x[:, 1].numpy()), h[:, 0].numpy(), atol=1e-6)


@pytest.mark.slow
def test_symbolic_report_gives_each_kan_expert_a_formula_in_its_features(tmp_path: Path):
    from kanmoe.model.config import validate_config
    from kanmoe.model.symbolic_run import symbolic_report
    from kanmoe.model.training import train_run

    rng = np.random.default_rng(1)
    df = pd.DataFrame({"p": rng.uniform(-1, 1, 600), "q": rng.uniform(-1, 1, 600)})
    df["y"] = df.p - 0.5 * df.q
    df.to_csv(tmp_path / "data.csv", index=False)
    raw = {
        "name": "moe",
        "data": {"kind": "tabular", "path": str(tmp_path / "data.csv"), "target": "y"},
        "model": {
            "kind": "kamoe",
            "expert": "kan",
            "hidden": [],
            "n_experts": 3,
            "gate_hidden": 4,
            "grid_size": 4,
        },
        "train": {"epochs": 2, "batch_size": 64, "threads": 1, "progress": False},
    }
    train_run(validate_config(raw), tmp_path / "run", write_plots=False)
    library = ["0", "x", "x^2", "sin"]  # a short library keeps the test fast
    report = symbolic_report(tmp_path / "run", r2_threshold=0.0, library=library, write=False)
    labels = [layer["label"] for layer in report["layers"]]
    for index, layer in enumerate(report["layers"]):
        assert {e["layer"] for e in layer["edges"]} == {index}
    assert labels[:3] == [
        "moe.expert_0.layers.0",
        "moe.expert_1.layers.0",
        "moe.expert_2.layers.0",
    ]
    assert all(layer["inputs"] == ["p", "q"] for layer in report["layers"][:3])
    experts = [f for f in report["formulas"] if ".experts." in f["module"]]
    assert len(experts) == 3
    for f in experts:
        assert f["inputs"] == "standardised features" and "raw_units" not in f
        (expr,) = f["formula"]
        assert sp.sympify(expr).free_symbols <= {sp.Symbol("p"), sp.Symbol("q")}
