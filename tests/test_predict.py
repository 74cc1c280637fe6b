"""Batch predict and ServableModel: CLI output equals model(x); scaling lives inside forward."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kanmoe.errors import RunDirError
from kanmoe.model.config import validate_config
from kanmoe.model.run import build_servable, load_run
from kanmoe.model.training import train_run


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kanmoe.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, california_csv: Path) -> tuple[Path, Path]:
    """A tiny KAMoE run (log target) and a CSV of 300 unseen-looking rows to predict."""
    root = tmp_path_factory.mktemp("predict")
    df = pd.read_csv(california_csv).sample(n=1500, random_state=1)
    df.to_csv(root / "train.csv", index=False)
    raw = {
        "name": "p",
        "data": {
            "path": str(root / "train.csv"),
            "target": "MedHouseVal",
            "target_transform": "log",
        },
        "model": {"kind": "kamoe", "hidden": [8], "gate_hidden": 8, "n_experts": 3},
        "train": {"epochs": 2, "threads": 1, "progress": False},
    }
    train_run(validate_config(raw), root / "run", write_plots=False)
    rows = pd.read_csv(california_csv).sample(n=300, random_state=2)
    rows = rows.drop(columns=["MedHouseVal"])[list(rows.columns[::-1][1:])]  # other column order
    rows.insert(0, "id", np.arange(len(rows)))
    rows.to_csv(root / "in.csv", index=False)
    return root / "run", root / "in.csv"


def test_predict_cli_matches_servable(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, in_csv = trained
    out_csv = tmp_path / "out.csv"
    result = run_cli("predict", str(run_dir), "--input", str(in_csv), "--output", str(out_csv))
    assert result.returncode == 0, result.stderr
    out = pd.read_csv(out_csv)
    servable = load_run(run_dir)
    x = torch.tensor(pd.read_csv(in_csv)[servable.feature_names].to_numpy(), dtype=torch.float32)
    with torch.no_grad():
        y, gates = servable(x)
    np.testing.assert_allclose(out["MedHouseVal_pred"], y[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    for i, expert in enumerate(servable.expert_names["moe"]):
        column = f"gate.moe.{expert}"
        np.testing.assert_allclose(out[column], gates["moe"][:, i].numpy(), rtol=1e-5, atol=1e-6)
    assert list(out["id"]) == list(range(300))  # input columns kept, rows in order
    assert (out["MedHouseVal_pred"] > -1).all()  # log target inverted inside forward


def test_predict_missing_column_is_one_line(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, in_csv = trained
    bad = tmp_path / "bad.csv"
    pd.read_csv(in_csv).drop(columns=["Latitude"]).to_csv(bad, index=False)
    result = run_cli("predict", str(run_dir), "--input", str(bad), "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Latitude" in lines[0]
    assert not (tmp_path / "o").exists()


def test_load_run_names_the_missing_file(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, _ = trained
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.yaml", "preprocessing.json"):
        (partial / name).write_bytes((run_dir / name).read_bytes())
    with pytest.raises(RunDirError, match=r"weights\.safetensors"):
        load_run(partial)


def test_servable_attributes(trained: tuple[Path, Path]) -> None:
    run_dir, _ = trained
    servable = load_run(run_dir)
    assert servable.target_names == ["MedHouseVal"] and servable.n_features == 8
    assert not servable.is_sequence and servable.seq_len is None
    assert servable.metrics == json.loads((run_dir / "metrics.json").read_text())
    assert servable.config["model"]["gate"] == "grkan" and len(servable.config_hash) == 16
    assert servable.expert_names == {"moe": ["expert_0", "expert_1", "expert_2"]}


def test_build_servable_scales_inside_forward() -> None:
    """y_raw = expm1(model((x - mean) / std) * y_std + y_mean) against a hand computation."""
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -1.0]]))
        lin.bias.fill_(0.25)
    s = build_servable(
        lin, ["a", "b"], ["y"], [1.0, -2.0], [2.0, 4.0], [0.3], [1.5], target_transform="log"
    )
    x = torch.tensor([[3.0, 2.0], [-1.0, 0.0]])
    y, gates = s(x)
    z = (x.numpy() - [1.0, -2.0]) / [2.0, 4.0]
    expected = np.expm1((z @ [[0.5], [-1.0]] + 0.25) * 1.5 + 0.3)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-6)
    assert gates == {} and s.expert_names == {}
    with pytest.raises(ValueError, match="x_std"):
        build_servable(lin, ["a", "b"], ["y"], [0.0, 0.0], [1.0], [0.0], [1.0])
