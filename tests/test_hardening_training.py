"""Training options that no other test exercised, each checked against what it promises.

LR schedules are read back from history.csv and compared with the documented formulas
(re-derived here, not taken from torch); losses against numpy; the other options by an
effect that disappears when the option is ignored. Tiny runs: 800 rows, a few epochs.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from kanmoe.model.config import validate_config
from kanmoe.model.data import load_dataset
from kanmoe.model.run import load_run, predict_raw
from kanmoe.model.training import train_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory: pytest.TempPathFactory, california_csv: Path) -> Path:
    path = tmp_path_factory.mktemp("opts") / "california_800.csv"
    pd.read_csv(california_csv).sample(n=800, random_state=11).to_csv(path, index=False)
    return path


def config(data: Path, model: dict | None = None, **train: object) -> dict:
    return {
        "name": "opt",
        "seed": 7,
        "data": {"path": str(data), "target": "MedHouseVal"},
        "model": {"kind": "mlp", "hidden": [16], **(model or {})},
        "train": {"epochs": 6, "batch_size": 64, "threads": 1, "progress": False, **train},
    }


def run(raw: dict, out: Path):
    return train_run(validate_config(raw), out, write_plots=False)


def history(out: Path) -> dict[str, np.ndarray]:
    with open(out / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


# -- learning-rate schedules --------------------------------------------------------------


def test_cosine_schedule_follows_the_cosine(data_csv: Path, tmp_path: Path) -> None:
    """lr(e) = min_lr + (lr - min_lr) (1 + cos(pi e / epochs)) / 2, e = 0-based epoch."""
    raw = config(data_csv, scheduler="cosine", lr=0.01, min_lr=1e-4, epochs=8, patience=50)
    run(raw, tmp_path)
    e = np.arange(8)
    want = 1e-4 + (0.01 - 1e-4) * (1 + np.cos(np.pi * e / 8)) / 2
    np.testing.assert_allclose(history(tmp_path)["lr"], want, rtol=1e-6)


def _one_cycle(step: np.ndarray, max_lr: float, total: int, pct: float, min_lr: float):
    """Cosine one-cycle (Smith): max_lr/25 -> max_lr at pct of the steps -> min_lr at the end."""
    start = max_lr / 25.0
    peak = pct * total - 1
    up = step <= peak
    frac_up = step / peak
    frac_down = (step - peak) / (total - 1 - peak)

    def cos_anneal(a, b, f):
        return b + (a - b) / 2.0 * (1 + np.cos(np.pi * f))

    return np.where(up, cos_anneal(start, max_lr, frac_up), cos_anneal(max_lr, min_lr, frac_down))


def test_onecycle_schedule_warms_up_then_anneals_per_batch(data_csv: Path, tmp_path: Path) -> None:
    epochs, batch = 8, 64
    raw = config(
        data_csv,
        scheduler="onecycle",
        lr=0.02,
        min_lr=1e-4,
        epochs=epochs,
        batch_size=batch,
        onecycle_pct_start=0.3,
        patience=50,
    )
    run(raw, tmp_path)
    n_train = len(load_dataset(validate_config(raw).data).x["train"])
    steps = math.ceil(n_train / batch)
    total = epochs * steps + 1
    # the logged lr is read after each epoch's last optimiser step
    want = _one_cycle(np.arange(1, epochs + 1) * steps, 0.02, total, 0.3, 1e-4)
    lr = history(tmp_path)["lr"]
    np.testing.assert_allclose(lr, want, rtol=1e-5)
    assert lr.argmax() in (1, 2) and lr[-1] < lr[0] < lr.max()  # up, then down


def test_plateau_schedule_cuts_the_lr_after_patience_bad_epochs(
    data_csv: Path, tmp_path: Path
) -> None:
    """lr *= factor once val loss has not improved (rel. 1e-4) for more than `patience` epochs."""
    factor, patience, lr0, min_lr = 0.5, 1, 0.2, 1e-3
    raw = config(
        data_csv,
        scheduler="plateau",
        lr=lr0,
        plateau_factor=factor,
        plateau_patience=patience,
        min_lr=min_lr,
        epochs=14,
        patience=50,
        grad_clip=None,
    )
    run(raw, tmp_path)
    h = history(tmp_path)
    lr, best, bad, want = lr0, math.inf, 0, []
    for val in h["val_loss"]:
        want.append(lr)
        if val < best * (1 - 1e-4):
            best, bad = val, 0
        else:
            bad += 1
        if bad > patience:
            lr, bad = max(lr * factor, min_lr), 0
    np.testing.assert_allclose(h["lr"], want, rtol=1e-9)
    assert len(set(want)) >= 2, "no plateau in this run: the test would prove nothing"


def test_constant_lr_with_linear_warmup(data_csv: Path, tmp_path: Path) -> None:
    run(config(data_csv, scheduler="none", lr=0.01, warmup_epochs=3), tmp_path)
    np.testing.assert_allclose(
        history(tmp_path)["lr"], [0.01 / 3, 0.02 / 3, 0.01, 0.01, 0.01, 0.01], rtol=1e-9
    )


# -- losses ---------------------------------------------------------------------------------


def _val_loss_of(servable, raw: dict, how: str) -> float:
    data = load_dataset(validate_config(raw).data)
    with torch.no_grad():
        pred = servable.model(torch.from_numpy(data.prep.scale_x(data.x["val"]))).double()
    err = pred.numpy() - data.prep.scale_y(data.y["val"]).astype(np.float64)
    if how == "l1":
        return float(np.abs(err).mean())
    if how == "huber":  # delta 1: quadratic inside, linear outside
        a = np.abs(err)
        return float(np.where(a <= 1.0, 0.5 * err**2, a - 0.5).mean())
    return float((err**2).mean())


@pytest.mark.parametrize("loss", ["huber", "l1"])
def test_loss_option_is_the_loss_reported_and_minimised(
    loss: str, data_csv: Path, tmp_path: Path
) -> None:
    raw = config(data_csv, loss=loss, epochs=3)
    servable, metrics = run(raw, tmp_path)
    h = history(tmp_path)
    best = h["val_loss"][metrics["best_epoch"] - 1]
    assert _val_loss_of(servable, raw, loss) == pytest.approx(best, rel=1e-4)
    assert _val_loss_of(servable, raw, "mse") != pytest.approx(best, rel=1e-2)


# -- model options ------------------------------------------------------------------------------


def test_dropout_is_in_the_model_and_active_only_in_training(
    data_csv: Path, tmp_path: Path
) -> None:
    servable, _ = run(config(data_csv, model={"dropout": 0.5, "hidden": [16, 16]}), tmp_path / "d")
    drops = [m for m in servable.model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(m.p == 0.5 for m in drops)
    x = torch.randn(64, 8)
    servable.model.train()
    assert not torch.equal(servable.model(x), servable.model(x))
    servable.model.eval()
    assert torch.equal(servable.model(x), servable.model(x))
    run(config(data_csv, model={"hidden": [16, 16]}), tmp_path / "plain")
    assert not np.allclose(
        history(tmp_path / "d")["train_loss"], history(tmp_path / "plain")["train_loss"]
    )


def test_per_layer_placement_gates_every_hidden_layer(data_csv: Path, tmp_path: Path) -> None:
    model = {"kind": "kamoe", "placement": "per_layer", "hidden": [6, 5], "gate_hidden": 4}
    raw = config(data_csv, model=model, epochs=2)
    run(raw, tmp_path)
    servable = load_run(tmp_path)
    assert list(servable.expert_names) == ["moe_0", "moe_1"]
    data = load_dataset(validate_config(raw).data)
    y, gates = predict_raw(servable, data.x["test"])
    assert y.shape == (len(data.x["test"]), 1) and np.isfinite(y).all()
    for layer in ("moe_0", "moe_1"):
        assert gates[layer].shape == (len(y), 3)
        np.testing.assert_allclose(gates[layer].sum(-1), 1.0, atol=1e-5)
    # the experts of the first layer map 8 inputs to 6 units, of the second 6 to 5
    first, second = (m for m in servable.model.modules() if hasattr(m, "experts"))
    assert first.in_features == 8 and second.in_features == 6


def _series(path: Path) -> Path:
    t = np.arange(240)
    rows = [
        {"time": int(i), "series": f"s{s}", "value": float(10 + 5 * np.sin(i / 5 + s) + s)}
        for s in range(2)
        for i in t
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_plain_rnn_kind_trains_on_sequences(cell: str, tmp_path: Path) -> None:
    raw = {
        "name": "rnn",
        "data": {
            "kind": "sequence",
            "path": str(_series(tmp_path / "s.csv")),
            "lookback": 6,
            "horizon": 2,
        },
        "model": {"kind": "rnn", "expert": cell, "hidden": [5]},
        "train": {"epochs": 2, "threads": 1, "progress": False},
    }
    _, metrics = run(raw, tmp_path / "run")
    servable = load_run(tmp_path / "run")
    assert servable.expert_names == {}
    assert any(isinstance(m, nn.GRU if cell == "gru" else nn.LSTM) for m in servable.modules())
    y, gates = servable(torch.rand(3, 6, 1) * 10 + 5)
    assert y.shape == (3, 2) and gates == {}
    assert np.isfinite(metrics["test"]["rmse"])


def test_multi_target_tabular(data_csv: Path, tmp_path: Path) -> None:
    raw = config(data_csv, epochs=3)
    raw["data"]["target"] = ["MedHouseVal", "AveRooms"]
    servable, metrics = run(raw, tmp_path)
    assert servable.target_names == ["MedHouseVal", "AveRooms"]
    assert "AveRooms" not in servable.feature_names and servable.n_features == 7
    data = load_dataset(validate_config(raw).data)
    y, _ = predict_raw(servable, data.x["test"])
    assert y.shape == (len(data.x["test"]), 2)
    # R² is the mean of the two targets' own R² (sklearn's uniform average)
    from sklearn.metrics import r2_score

    truth = data.y["test"].astype(np.float64)
    per_target = [r2_score(truth[:, i], y[:, i]) for i in range(2)]
    assert metrics["test"]["r2"] == pytest.approx(np.mean(per_target), rel=1e-6)
    # each target has its own scaling, fitted on train
    np.testing.assert_allclose(servable.y_mean.numpy(), data.y["train"].mean(0), rtol=1e-4)


def test_loss_non_finite_from_the_first_epoch_is_a_one_line_error(
    data_csv: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from kanmoe.cli import app

    raw = config(data_csv, lr=1e6, grad_clip=None, scheduler="none", epochs=20, patience=50)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train", "-c", str(cfg), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "diverged" in lines[0] and "epoch 1" in lines[0], lines
    assert not (tmp_path / "run" / "weights.safetensors").exists()


def test_non_finite_loss_stops_training_and_keeps_the_best_epoch(data_csv: Path) -> None:
    """Weights blown up after epoch 3: epoch 4's loss is inf, training stops, epoch-3 weights."""
    from kanmoe.model.builder import build_model
    from kanmoe.model.training import Trainer

    cfg = validate_config(config(data_csv, scheduler="none", epochs=20, patience=50))
    data = load_dataset(cfg.data)
    prep = data.prep
    xt, xv = (torch.from_numpy(prep.scale_x(data.x[p])) for p in ("train", "val"))
    yt, yv = (torch.from_numpy(prep.scale_y(data.y[p])) for p in ("train", "val"))
    torch.manual_seed(0)
    model = build_model(cfg.model, 8, 1, None, prep.feature_names)
    weights_after: dict[int, dict] = {}

    def blow_up(epoch: int, _row: dict) -> None:
        weights_after[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        if epoch == 3:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1e30)

    result = Trainer(model, cfg.train, seed=0, callbacks=[blow_up]).fit(xt, yt, xv, yv)
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 4 and not math.isfinite(losses[-1])
    assert all(math.isfinite(v) for v in losses[:-1])
    assert result.stopped_early and 1 <= result.best_epoch <= 3
    for k, v in model.state_dict().items():  # the best epoch's weights, not the blown-up ones
        assert torch.equal(v, weights_after[result.best_epoch][k]), k
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_seed_changes_the_run_and_the_same_seed_reproduces_it(
    data_csv: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from kanmoe.cli import app

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config(data_csv, epochs=2)))
    weights = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / name
        args = ["train", "-c", str(cfg), "-o", str(out), "--seed", str(seed)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == seed
        weights[name] = (out / "weights.safetensors").read_bytes()
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]


def test_kan_regularisation_shrinks_edge_magnitudes(data_csv: Path, tmp_path: Path) -> None:
    """kan_reg_weight > 0 (pykan's L1 + entropy on mean |phi|) gives smaller edge functions."""
    from kanmoe.model.training import kan_layers

    model = {"kind": "kan", "hidden": [4], "grid_size": 5}
    mags = {}
    for reg in (0.0, 0.05):
        raw = config(data_csv, model=model, epochs=4, kan_reg_weight=reg, lr=0.01)
        servable, _ = run(raw, tmp_path / str(reg))
        data = load_dataset(validate_config(raw).data)
        x = torch.from_numpy(data.prep.scale_x(data.x["train"]))
        total, layers = 0.0, kan_layers(servable.model)
        with torch.no_grad():
            for layer in layers:
                total += float(layer.edge_magnitude(x).sum())
                x = layer(x)
        mags[reg] = total
    assert mags[0.05] < 0.7 * mags[0.0], mags
