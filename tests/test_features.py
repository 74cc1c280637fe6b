"""PairRotations: the fixed (lat, lon)-plane projections in front of the default model."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kanmoe.errors import ConfigError
from kanmoe.model.config import ModelConfig
from kanmoe.model.features import PairRotations, fit_feature_layers

logging.getLogger("torch.onnx").setLevel(logging.ERROR)

NAMES = ["a", "Latitude", "b", "Longitude"]


def test_projections_match_the_rotation_formula(rng) -> None:
    layer = PairRotations(4, (1, 3), count=8)
    x = torch.from_numpy(rng.standard_normal((50, 4)))
    y = layer.to(torch.float64)(x)
    # 8 directions over 180 degrees, 0 and 90 left out (they are the inputs themselves)
    angles = [math.pi * k / 8 for k in (1, 2, 3, 5, 6, 7)]
    assert layer.out_features == y.shape[1] == 4 + len(angles)
    torch.testing.assert_close(y[:, :4], x)
    for r, a in enumerate(angles):
        expected = x[:, 1] * math.cos(a) + x[:, 3] * math.sin(a)
        torch.testing.assert_close(y[:, 4 + r], expected)


def test_fit_gives_unit_std_and_survives_a_state_dict_round_trip(rng) -> None:
    # strongly correlated coordinates, as latitude and longitude are (r = -0.92)
    lat = rng.standard_normal(2000)
    lon = -0.92 * lat + math.sqrt(1 - 0.92**2) * rng.standard_normal(2000)
    x = torch.tensor(np.column_stack([rng.standard_normal(2000), lat, lon]), dtype=torch.float32)
    layer = PairRotations(3, (1, 2), count=4)
    assert fit_feature_layers(torch.nn.Sequential(layer), x) == 1
    proj = layer(x)[:, 3:]
    torch.testing.assert_close(proj.std(0), torch.ones(2), atol=1e-4, rtol=0)
    # unit-variance coordinates with correlation r: var(x cos a + y sin a) = 1 + r sin 2a
    expected = torch.tensor([1 / math.sqrt(1 - 0.92), 1 / math.sqrt(1 + 0.92)])
    torch.testing.assert_close(layer.scale, expected, rtol=0.05, atol=0)
    fresh = PairRotations(3, (1, 2), count=4)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), layer(x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pair": (1, 1), "count": 8}, "pair"),
        ({"pair": (0, 4), "count": 8}, "pair"),
        ({"pair": (0, 1), "count": 2}, "count"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        PairRotations(4, **kwargs)


def _cfg(**kw) -> ModelConfig:
    base = {"kind": "kamoe", "expert": "kanmlp", "hidden": [8, 8], "basis": "linear"}
    return ModelConfig(**(base | kw))


def test_builder_puts_the_layer_first_and_keeps_gate_outputs() -> None:
    from kanmoe.model.builder import build_model
    from kanmoe.model.moe import GatedSequential

    net = build_model(_cfg(rotations=16), 4, 1, feature_names=NAMES)
    assert isinstance(net, GatedSequential) and isinstance(net[0], PairRotations)
    assert net[0].pair == (1, 3) and net[0].out_features == 4 + 14
    y, gates = net(torch.randn(5, 4), return_gates=True)
    assert y.shape == (5, 1) and gates["moe"].shape == (5, 3)
    plain = build_model(_cfg(kind="kanmlp", rotations=4), 4, 1, feature_names=NAMES)
    assert isinstance(plain[0], PairRotations) and plain(torch.randn(2, 4)).shape == (2, 1)


def test_builder_errors_are_config_errors() -> None:
    from kanmoe.model.builder import build_model

    with pytest.raises(ConfigError, match=r"model\.rotate_pair: \['Latitude'\] not among"):
        build_model(_cfg(rotations=8), 4, 1, feature_names=["a", "b", "c", "Longitude"])
    with pytest.raises(ConfigError, match="only for tabular"):
        build_model(_cfg(rotations=8), 4, 1, seq_len=5, feature_names=NAMES)
    with pytest.raises(ValueError, match="rotations must be 0"):
        _cfg(rotations=2)


def test_train_export_and_reload_with_rotations(tmp_path: Path, california_csv: Path) -> None:
    """A trained run with rotations reloads exactly and exports with ORT parity."""
    from kanmoe.export.exporter import export_model
    from kanmoe.export.verify import ort_session
    from kanmoe.model.config import validate_config
    from kanmoe.model.run import load_run, predict_raw
    from kanmoe.model.training import train_run

    data = tmp_path / "ca.csv"
    pd.read_csv(california_csv).sample(n=1500, random_state=1).to_csv(data, index=False)
    raw = {
        "name": "rot",
        "data": {"path": str(data), "input_clip": 3.0},
        "model": {"kind": "kamoe", "expert": "kanmlp", "hidden": [8, 8], "gate_hidden": 8,
                  "basis": "linear", "num_control_points": 16, "spline_width": 6.0,
                  "rotations": 8},
        "train": {"epochs": 2, "threads": 1, "progress": False},
    }  # fmt: skip
    servable, _ = train_run(validate_config(raw), tmp_path / "run", write_plots=False)
    rot = servable.model[0]
    assert isinstance(rot, PairRotations) and not torch.allclose(rot.scale, torch.ones(6))
    reloaded = load_run(tmp_path / "run")
    x = pd.read_csv(data).drop(columns=["MedHouseVal"]).to_numpy(np.float32)[:300]
    y_a, g_a = predict_raw(servable, x)
    y_b, g_b = predict_raw(reloaded, x)
    np.testing.assert_array_equal(y_a, y_b)
    np.testing.assert_array_equal(g_a["moe"], g_b["moe"])
    model = export_model(reloaded)
    out_y, out_g = ort_session(model).run(["output", "gate_weights"], {"input": x})
    np.testing.assert_allclose(out_y, y_a, atol=1e-5 * np.abs(y_a).max())
    np.testing.assert_allclose(out_g, g_a["moe"], atol=1e-5)
