"""Training quality on a known dataset: the shipped default config and the committed model.

Issue goal: the default KAMoE reaches test R² >= 0.85 on California Housing's reference split
(``train_test_split(test_size=0.2, random_state=42)``); the best KAMoE in the paper is 0.8008.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from kanmoe.export.verify import DEFAULT_TOLERANCE, GATE_TOLERANCE
from kanmoe.paths import CONFIGS_DIR, PROJECT_ROOT

GOAL_R2 = 0.85
DEFAULT_RUN = PROJECT_ROOT / "default_run"
DEFAULT_ONNX = PROJECT_ROOT / "model_repository" / "california_kamoe" / "1" / "model.onnx"


def _test_split():
    from kanmoe.model.config import read_yaml, validate_config
    from kanmoe.model.data import load_dataset

    cfg = validate_config(read_yaml(DEFAULT_RUN / "config.yaml"))  # the committed run's rows
    data = load_dataset(cfg.data)
    return data.x["test"], data.y["test"].astype(np.float64)


def test_default_config_trains_to_the_goal(tmp_path: Path) -> None:
    """Train configs/california_kamoe.yaml exactly as shipped (~30 s on 1 core)."""
    from kanmoe.model.config import read_yaml, validate_config
    from kanmoe.model.training import train_run

    cfg = validate_config(read_yaml(CONFIGS_DIR / "california_kamoe.yaml"))
    assert cfg.data.split == "reference" and cfg.data.test_size == 0.2
    _, metrics = train_run(cfg, tmp_path / "run", write_plots=False)
    assert metrics["test"]["r2"] >= GOAL_R2, metrics["test"]
    assert metrics["test"]["rmse"] < 0.45


def test_committed_default_run_reproduces_its_metrics() -> None:
    from kanmoe.model.run import load_run, predict_raw, regression_metrics

    recorded = json.loads((DEFAULT_RUN / "metrics.json").read_text())
    assert recorded["test"]["r2"] >= GOAL_R2
    x, y = _test_split()
    y_pred, gates = predict_raw(load_run(DEFAULT_RUN), x)
    got = regression_metrics(y, y_pred)
    assert got["r2"] == pytest.approx(recorded["test"]["r2"], abs=1e-5)
    np.testing.assert_allclose(gates["moe"].sum(-1), 1.0, atol=1e-5)


def test_committed_onnx_model_matches_the_committed_run() -> None:
    """The embedded model the service ships is the committed run, exported (no torch drift)."""
    from kanmoe.export.exporter import read_metadata
    from kanmoe.export.verify import ort_session
    from kanmoe.model.run import load_run, predict_raw

    model = onnx.load(DEFAULT_ONNX)
    meta = read_metadata(model)
    servable = load_run(DEFAULT_RUN)
    assert meta["config_hash"] == servable.config_hash
    x, y = _test_split()
    y_torch, gates = predict_raw(servable, x)
    y_ort, g_ort = ort_session(model).run(["output", "gate_weights"], {"input": x})
    np.testing.assert_allclose(y_ort, y_torch, atol=DEFAULT_TOLERANCE * np.abs(y_torch).max())
    # the GRKAN gate's LayerNorm over 3 logits amplifies float32 rounding (see verify.py)
    np.testing.assert_allclose(g_ort, gates["moe"], atol=GATE_TOLERANCE)
    r2 = 1 - ((y_ort - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert r2 >= GOAL_R2


def test_export_parity_holds_on_20000_random_rows() -> None:
    """--check's per-kind tolerances hold far beyond the rows it checks: 20,000 random rows
    around the data (and past its range) plus every real row, torch vs ORT."""
    import pandas as pd

    from kanmoe.export.verify import ort_session
    from kanmoe.model.run import load_run, predict_raw
    from kanmoe.paths import CALIFORNIA_HOUSING_CSV

    servable = load_run(DEFAULT_RUN)
    real = pd.read_csv(CALIFORNIA_HOUSING_CSV)[list(servable.feature_names)].to_numpy(np.float32)
    rng = np.random.default_rng(7)
    noise = rng.standard_normal((20_000, real.shape[1])) * real.std(0) * 1.5 + real.mean(0)
    session = ort_session(onnx.load(DEFAULT_ONNX))
    for x in (noise.astype(np.float32), real):
        y_torch, gates = predict_raw(servable, x)
        y_ort, g_ort = session.run(["output", "gate_weights"], {"input": x})
        out_err = np.abs(y_ort - y_torch).max() / max(1.0, np.abs(y_torch).max())
        assert out_err <= DEFAULT_TOLERANCE, out_err
        assert np.abs(g_ort - gates["moe"]).max() <= GATE_TOLERANCE
