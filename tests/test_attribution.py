"""Feature attribution: pykan's edge propagation against a hand computation, permutation
scores, the issue's "2 of 6 inputs matter" check for a KAN and a KAMoE, and ``kanmoe explain``."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kanmoe.model import KAN, KANExpert, KANLinear, MoE
from kanmoe.model.attribution import feature_importance, kan_attribution, permutation_scores


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_kan_attribution_equals_hand_computation():
    # linear basis, edges set to straight lines: phi_0 = 2x, phi_1 = 0, phi_2 = -x
    layer = KANLinear(3, 1, basis="linear", num_control_points=5, spline_width=4.0, init="zero")
    pos = torch.linspace(-2, 2, 5)
    with torch.no_grad():
        layer.control_points[0, :, 0] = 2 * pos
        layer.control_points[2, :, 0] = -pos
    x = torch.rand(4000, 3) * 2 - 1  # inside the grid: the lines are exact
    s = x.std(0, unbiased=False)
    node = math.sqrt(float(4 * s[0] ** 2 + s[2] ** 2))  # independent uniform inputs
    want = torch.tensor([2 * s[0], 0.0, s[2]]) / (node + 1e-4)
    got = kan_attribution(layer, x)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert got[1] == 0
    # two layers: an identity second layer scales nothing away
    kan = KAN([3, 1], basis="linear", num_control_points=5, spline_width=4.0)
    kan.layers[0].load_state_dict(layer.state_dict())
    torch.testing.assert_close(kan_attribution(kan, x), got)


def test_permutation_scores_are_zero_for_unused_inputs():
    class FirstTwo(nn.Module):
        def forward(self, x):
            return 3 * x[:, :1] - x[:, 1:2] ** 2

    x = torch.randn(500, 4)
    scores, _ = permutation_scores(FirstTwo(), x)
    assert scores[2] == 0 and scores[3] == 0
    assert scores[0] > scores[1] > 0


def _two_of_six(n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 6, generator=gen) * 2 - 1
    y = torch.sin(2 * x[:, :1]) + x[:, 3:4] ** 2
    return x, y


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
    return float(loss.detach())


def test_kan_ranks_the_two_used_inputs_first():
    torch.manual_seed(0)
    x, y = _two_of_six()
    kan = KAN([6, 3, 1], grid_size=5)
    assert _train(kan, x, y, 200) < 1e-2
    scores = feature_importance(kan, x)["model"]
    assert scores["method"] == "kan"
    assert set(np.argsort(scores["scores"])[-2:]) == {0, 3}, scores


def test_kamoe_experts_and_model_rank_the_two_used_inputs_first():
    torch.manual_seed(0)
    x, y = _two_of_six()
    moe = MoE(KANExpert([6, 2, 1], grid_size=4), n_experts=3, gate="grkan", gate_hidden=4)
    assert _train(moe, x, y, 150) < 5e-2
    imp = feature_importance(moe, x)
    assert imp["model"]["method"] == "permutation"
    assert set(np.argsort(imp["model"]["scores"])[-2:]) == {0, 3}
    (layer,) = imp["moe"].values()
    assert [e["name"] for e in layer["experts"]] == ["expert_0", "expert_1", "expert_2"]
    for expert in layer["experts"]:
        assert set(np.argsort(expert["scores"])[-2:]) == {0, 3}, expert
        assert sum(expert["shares"]) == pytest.approx(1.0)
    assert len(layer["gate"]["scores"]) == 6


@pytest.mark.slow
def test_explain_command_writes_json_and_plot(tmp_path: Path):
    from typer.testing import CliRunner

    from kanmoe.cli import app
    from kanmoe.model.config import validate_config
    from kanmoe.model.training import train_run

    x, y = _two_of_six(1500)
    names = ["a", "b", "c", "d", "e", "f"]
    df = pd.DataFrame(x.numpy(), columns=names)
    df["y"] = y.numpy()[:, 0]
    df.to_csv(tmp_path / "data.csv", index=False)
    raw = {
        "name": "exp",
        "seed": 0,
        "data": {"kind": "tabular", "path": str(tmp_path / "data.csv"), "target": "y"},
        "model": {
            "kind": "kamoe",
            "expert": "kan",
            "hidden": [3],
            "n_experts": 3,
            "gate_hidden": 4,
            "grid_size": 5,
        },
        "train": {"epochs": 8, "batch_size": 64, "lr": 1e-2, "threads": 1, "progress": False},
    }
    _, metrics = train_run(validate_config(raw), tmp_path / "run", write_plots=False)
    assert metrics["test"]["r2"] > 0.9

    result = CliRunner().invoke(app, ["explain", str(tmp_path / "run"), "--rows", "512"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "importance.json").read_text())
    assert report["data"] == "training data" and report["rows"] == 512
    top = {r["feature"] for r in report["model"]["ranking"][:2]}
    assert top == {"a", "d"}
    layer = report["moe"]["moe"]
    assert sorted(layer["experts"]) == ["expert_0", "expert_1", "expert_2"]
    assert all(len(r) == 6 for r in [*layer["experts"].values(), layer["gate"]])
    png = (tmp_path / "run" / "plots" / "feature_importance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "moe gate:" in result.output
