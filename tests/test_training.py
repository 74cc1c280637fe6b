"""End-to-end training: CLI run dir contents, resume after interruption, sequences, KAN grids.

Every run here is tiny (a 2,000-row California subset, a few epochs, one thread) so the
module stays fast on a busy 2-core machine.
"""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from kanmoe.model.config import validate_config
from kanmoe.model.data import load_dataset
from kanmoe.model.run import load_run
from kanmoe.model.training import predict_raw, regression_metrics, train_run

pytestmark = pytest.mark.slow


def invoke(*args: str):
    """The CLI in this process (no interpreter start-up); exit code and output as the CLI's."""
    from typer.testing import CliRunner

    from kanmoe.cli import app

    return CliRunner().invoke(app, list(args))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kanmoe.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def subset_csv(tmp_path_factory: pytest.TempPathFactory, california_csv: Path) -> Path:
    path = tmp_path_factory.mktemp("data") / "california_2000.csv"
    pd.read_csv(california_csv).sample(n=2000, random_state=0).to_csv(path, index=False)
    return path


def tiny_config(data_path: Path, **model: object) -> dict:
    return {
        "name": "tiny",
        "seed": 3,
        "data": {"kind": "tabular", "path": str(data_path), "target": "MedHouseVal"},
        "model": {
            "kind": "kamoe",
            "expert": "mlp",
            "hidden": [16],
            "n_experts": 3,
            "gate_hidden": 8,
            **model,
        },
        "train": {"epochs": 3, "batch_size": 128, "threads": 1, "progress": False},
    }


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def history_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as fh:
        return list(csv.DictReader(fh))


def test_train_cli_writes_every_file(tmp_path: Path, subset_csv: Path) -> None:
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(subset_csv))
    out = tmp_path / "run"
    result = run_cli(
        "train", "--config", str(cfg_path), "--out", str(out), "--set", "train.lr=5e-3"
    )
    assert result.returncode == 0, result.stderr
    assert "test r2=" in result.stdout
    for name in (
        "weights.safetensors",
        "config.yaml",
        "metrics.json",
        "history.csv",
        "preprocessing.json",
        "plots/learning_curves.png",
        "plots/gate_weights.png",
        "plots/gate_kan_functions.png",
    ):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob("**/*.tmp")), "temporary files left behind"
    metrics = json.loads((out / "metrics.json").read_text())
    for part in ("train", "val", "test"):
        assert set(metrics[part]) >= {"r2", "rmse", "mae"}
    assert metrics["epochs"] == 3 and len(history_rows(out)) == 3
    assert metrics["train_seconds"] > 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["lr"] == 5e-3  # --set applied and resolved config saved
    assert resolved["model"]["gate"] == "grkan"

    # load_run rebuilds the same model: its raw-unit test metrics match metrics.json
    servable = load_run(out)
    assert servable.expert_names == {"moe": ["expert_0", "expert_1", "expert_2"]}
    assert servable.feature_names == list(pd.read_csv(subset_csv).columns[:-1])
    data = load_dataset(validate_config(resolved).data)
    y_pred, gates = predict_raw(servable, data.x["test"])
    again = regression_metrics(data.y["test"].astype(np.float64), y_pred)
    for key in ("r2", "rmse", "mae"):
        assert again[key] == pytest.approx(metrics["test"][key], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(gates["moe"].sum(axis=1), 1.0, atol=1e-5)

    # `kanmoe plot RUN_DIR` redraws every plot from the saved run
    shutil.rmtree(out / "plots")
    result = invoke("plot", str(out))
    assert result.exit_code == 0, result.output
    for name in ("learning_curves.png", "gate_weights.png", "gate_kan_functions.png"):
        assert (out / "plots" / name).is_file(), name


def test_resume_continues_from_checkpoint(tmp_path: Path, subset_csv: Path) -> None:
    raw = tiny_config(subset_csv, kind="moe", gate="grn")
    raw["train"]["epochs"] = 4
    cfg = validate_config(raw)

    # reference: the same run without interruption
    _, ref_metrics = train_run(cfg, tmp_path / "ref", write_plots=False)
    ref_history = history_rows(tmp_path / "ref")

    def interrupt(epoch: int, _row: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, out, callbacks=[interrupt])
    assert (out / "checkpoint.pt").is_file()
    assert not (out / "weights.safetensors").exists()  # not finished: no final weights
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2

    result = run_cli("train", "--out", str(out), "--resume")
    assert result.returncode == 0, result.stderr
    rows = history_rows(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 4
    assert (out / "weights.safetensors").is_file()
    # resumed training is the same computation as the uninterrupted run
    for got, want in zip(rows, ref_history, strict=True):
        assert float(got["val_loss"]) == pytest.approx(float(want["val_loss"]), rel=1e-4)
    assert metrics["test"]["r2"] == pytest.approx(ref_metrics["test"]["r2"], rel=1e-4)

    # a checkpoint from another architecture is a clear error, not a traceback
    mismatch = invoke("train", "--out", str(out), "--resume", "--set", "model.hidden=[5]")
    assert mismatch.exit_code == 2 and "does not match" in mismatch.output


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"name": "x"}))
    result = invoke("train", "--out", str(tmp_path), "--resume")
    assert result.exit_code == 2
    assert "checkpoint.pt" in result.output and len(result.output.strip().splitlines()) == 1


def test_early_stopping_restores_best_weights(tmp_path: Path, subset_csv: Path) -> None:
    raw = tiny_config(subset_csv, kind="mlp", hidden=[32])
    raw["train"].update(epochs=40, patience=2, lr=0.05, scheduler="none")
    servable, metrics = train_run(validate_config(raw), tmp_path / "run", write_plots=False)
    rows = history_rows(tmp_path / "run")
    val = [float(r["val_loss"]) for r in rows]
    best = int(np.argmin(val))
    assert metrics["best_epoch"] == best + 1
    assert len(rows) < 40 and len(rows) - 1 - best >= 2  # stopped after `patience` bad epochs
    data = load_dataset(validate_config(raw).data)
    z = torch.from_numpy(data.prep.scale_x(data.x["val"]))
    target = torch.from_numpy(data.prep.scale_y(data.y["val"]))
    with torch.no_grad():
        loss = torch.mean((servable.model(z) - target) ** 2)
    assert float(loss) == pytest.approx(val[best], rel=1e-5)


def test_same_seed_same_weights(tmp_path: Path, subset_csv: Path) -> None:
    cfg = validate_config(tiny_config(subset_csv, kind="moe", gate="linear"))
    a, _ = train_run(cfg, tmp_path / "a", write_plots=False)
    b, _ = train_run(cfg, tmp_path / "b", write_plots=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_kan_with_grid_update_and_regularisation(tmp_path: Path, subset_csv: Path) -> None:
    raw = tiny_config(subset_csv, kind="kan", hidden=[4], grid_size=4)
    raw["train"].update(epochs=2, grid_update_epochs=[0, 1], kan_reg_weight=1e-3)
    cfg = validate_config(raw)
    _, metrics = train_run(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "plots" / "kan_functions.png").is_file()
    assert not (tmp_path / "run" / "plots" / "gate_weights.png").exists()
    assert np.isfinite(metrics["test"]["r2"])
    servable = load_run(tmp_path / "run")
    first = servable.model.layers[0]
    # the grid was refitted to the data (and saved): the scale buffer moved off its initial ones
    assert not torch.allclose(first.grid_scale, torch.ones_like(first.grid_scale))
    assert servable.expert_names == {}


def _series_csv(path: Path, n_series: int = 2, length: int = 160) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n_series):
        level = 50.0 * (s + 1)
        for t in range(length):
            value = level * (1.5 + np.sin(t / 6.0 + s)) + rng.normal(0, 1)
            rows.append({"time": t, "series": f"asset{s}", "value": value})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_sequence_kamoe_gru_trains_end_to_end(tmp_path: Path, project_root: Path) -> None:
    data_path = _series_csv(tmp_path / "series.csv")
    out = tmp_path / "run"
    result = invoke(
        "train",
        "--config",
        str(project_root / "configs" / "sequence_kamoe_gru.yaml"),
        "--out",
        str(out),
        "--set",
        f"data.path={data_path}",
        "--set",
        "data.window=12",
        "--set",
        "data.lookback=8",
        "--set",
        "data.horizon=2",
        "--set",
        "model.hidden=[6, 6]",
        "--set",
        "train.epochs=2",
        "--set",
        "train.threads=1",
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and np.isfinite(metrics["test"]["rmse"])
    assert (out / "plots" / "gate_weights.png").is_file()
    servable = load_run(out)
    assert servable.is_sequence and servable.seq_len == 8 and servable.n_features == 1
    assert servable.target_names == ["value_t+1", "value_t+2"]
    y, gates = servable(torch.rand(5, 8, 1) + 0.5)
    assert y.shape == (5, 2)
    assert gates["moe"].shape == (5, 8, 3)  # per-step gating (expert keeps the time axis)
    torch.testing.assert_close(gates["moe"].sum(-1), torch.ones(5, 8))


def test_tune_shares_a_sqlite_study(tmp_path: Path, subset_csv: Path) -> None:
    raw = tiny_config(subset_csv, kind="mlp")
    raw["tune"] = {
        "epochs": 2,
        "params": {
            "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            "model.hidden": {"type": "categorical", "choices": [[8], [16, 8]]},
        },
    }
    cfg_path = write_config(tmp_path / "cfg.yaml", raw)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["tune", "--config", str(cfg_path), "--trials", "2", "--storage", storage]
    for _ in range(2):  # a second process joins the same study
        result = invoke(*args, "--study-name", "s")
        assert result.exit_code == 0, result.output
        assert "best trial" in result.output and "train.lr" in result.output
    import optuna

    study = optuna.load_study(study_name="s", storage=storage)
    assert len(study.trials) == 4
    assert all(1e-3 <= t.params["train.lr"] <= 1e-2 for t in study.trials)


def test_kanmlp_experts_with_expert_loss(tmp_path: Path, subset_csv: Path) -> None:
    raw = tiny_config(subset_csv, expert="kanmlp", hidden=[8, 8], grid_size=6)
    raw["data"]["input_clip"] = 3.0
    raw["train"]["epochs"] = 2
    plain, _ = train_run(validate_config(raw), tmp_path / "a", write_plots=False)
    raw["train"]["expert_loss_weight"] = 1.0
    helped, metrics = train_run(validate_config(raw), tmp_path / "b", write_plots=False)
    assert np.isfinite(metrics["test"]["r2"])
    # the per-expert loss changed training, and its hooks are gone afterwards
    first = history_rows(tmp_path / "a")[-1]["val_loss"]
    assert first != history_rows(tmp_path / "b")[-1]["val_loss"]
    for expert in helped.model[0].experts:
        assert not expert._forward_hooks
    # inputs are clipped inside the servable too: far-out values give the clipped prediction
    x = torch.zeros(2, 8)
    x[1, 0] = 1e6
    x[0, 0] = helped.x_mean[0] + 3.0 * helped.x_std[0]
    with torch.no_grad():
        y, _ = helped(x)
    assert float(y[0, 0]) == pytest.approx(float(y[1, 0]), rel=1e-6)
    assert plain.input_clip == 3.0
