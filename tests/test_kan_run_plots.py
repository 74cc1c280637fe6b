"""Readable KAN plots of a run (every expert layer, named inputs, raw units, data range) and
the second-difference smoothness penalty."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kanmoe.model import KANLinear
from kanmoe.model.smoothness import kan_smoothness, roughness, smoothness_loss


@pytest.mark.parametrize("basis", ["linear", "bspline", "rbf"])
def test_smoothness_is_zero_for_lines_and_positive_for_zigzag(basis):
    layer = KANLinear(2, 3, basis=basis, init="zero", num_control_points=8, grid_size=6)
    with torch.no_grad():
        if basis == "linear":
            pos = torch.linspace(-1, 1, 8)
            layer.control_points.copy_(0.7 * pos[None, :, None] + 0.2)  # straight lines
        else:
            layer.spline_weight.copy_(torch.linspace(-1, 1, layer.num_bases) * 0.5 + 0.1)
    assert float(smoothness_loss(layer).detach()) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        coef = layer.control_points if basis == "linear" else layer.spline_weight
        axis = 1 if basis == "linear" else 2
        signs = torch.tensor([(-1.0) ** i for i in range(coef.shape[axis])])
        shape = [1, 1, 1]
        shape[axis] = -1
        coef.add_(0.1 * signs.reshape(shape))  # zig-zag of amplitude 0.1: second diff ±0.4
    loss = smoothness_loss(layer)
    want = 0.4**2
    if basis != "linear" and layer.enable_standalone_scale_spline:
        want = float(((0.4 * layer.spline_scaler.detach()) ** 2).mean())
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    loss.backward()  # the penalty trains the coefficients
    grad = layer.control_points.grad if basis == "linear" else layer.spline_weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert roughness(torch.nn.Sequential(layer)) == pytest.approx(
        float(loss.detach()) ** 0.5, rel=1e-5
    )
    assert float(kan_smoothness(torch.nn.Linear(2, 2))) == 0.0


@pytest.mark.slow
def test_every_expert_and_gate_kan_layer_is_plotted_in_raw_units(tmp_path: Path):
    from kanmoe.model.config import validate_config
    from kanmoe.model.kan_run_plots import raw_axis, write_kan_plots
    from kanmoe.model.run import load_run
    from kanmoe.model.run_inspect import kan_layers, probe_inputs
    from kanmoe.model.training import train_run

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"age": rng.uniform(20, 60, 400), "income": rng.uniform(1, 9, 400)})
    df["y"] = np.sin(df.age / 10) + 0.2 * df.income
    df.to_csv(tmp_path / "data.csv", index=False)
    raw = {
        "name": "plots",
        "data": {"kind": "tabular", "path": str(tmp_path / "data.csv"), "target": "y"},
        "model": {
            "kind": "kamoe",
            "expert": "kanmlp",
            "hidden": [3, 4],
            "n_experts": 3,
            "gate_hidden": 4,
            "basis": "linear",
            "num_control_points": 16,
            "spline_width": 6.0,
        },
        "train": {"epochs": 1, "batch_size": 64, "threads": 1, "progress": False},
    }
    train_run(validate_config(raw), tmp_path / "run", write_plots=False)

    servable = load_run(tmp_path / "run")
    x_raw, source = probe_inputs(servable)
    assert source == "training data"
    infos = kan_layers(servable, x_raw)
    labels = [i.label for i in infos]
    assert labels == [
        "moe.expert_0.0",
        "moe.expert_1.0",
        "moe.expert_2.0",
        "moe.gate.layer1",
        "moe.gate.layer2",
    ]
    first = infos[0]
    assert first.named_inputs and first.input_names == ["age", "income"]
    assert not infos[3].named_inputs and infos[3].input_names[:2] == ["h0", "h1"]
    # raw axis: the layer's input h maps back to the feature's raw value
    offset, factor = raw_axis(first, servable, 0)
    z = (x_raw[:, 0] - servable.x_mean[0]) / servable.x_std[0]
    h = z * first.input_scale[0]
    np.testing.assert_allclose((offset + factor * h).numpy(), x_raw[:, 0].numpy(), rtol=1e-4)

    written = write_kan_plots(tmp_path / "run", servable)
    assert [p.name for p in written] == [
        "kan_moe_expert_0_0.png",
        "kan_moe_expert_1_0.png",
        "kan_moe_expert_2_0.png",
        "kan_moe_gate_layer1.png",
        "kan_moe_gate_layer2.png",
    ]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
