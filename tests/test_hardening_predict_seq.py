"""``kanmoe predict`` on sequence runs: forecasts from every complete window of a long CSV.

Checked against independent routes: the training loader's own test windows (minmax run) and
a window and rolling median recomputed by hand with numpy (rolling-median run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kanmoe.model.config import validate_config
from kanmoe.model.data import load_dataset
from kanmoe.model.inference import predict_csv
from kanmoe.model.run import load_run, predict_raw
from kanmoe.model.training import train_run

pytestmark = pytest.mark.slow

LENGTH, LOOKBACK, HORIZON = 120, 6, 2


def _series_csv(path: Path) -> Path:
    rng = np.random.default_rng(4)
    rows = []
    for s in range(2):
        for t in range(LENGTH):
            value = 20.0 * (s + 1) * (1.5 + np.sin(t / 5.0 + s)) + rng.uniform(0, 2)
            rows.append({"time": t, "series": f"s{s}", "value": value})
    pd.DataFrame(rows).sample(frac=1.0, random_state=0).to_csv(path, index=False)  # unsorted
    return path


def _train(root: Path, normalization: str, **data: object) -> tuple[Path, dict]:
    raw = {
        "name": "seq",
        "seed": 2,
        "data": {
            "kind": "sequence",
            "path": str(_series_csv(root / "series.csv")),
            "lookback": LOOKBACK,
            "horizon": HORIZON,
            "normalization": normalization,
            **data,
        },
        "model": {"kind": "kamoe", "expert": "gru", "hidden": [4, 4], "gate_hidden": 4},
        "train": {"epochs": 1, "threads": 1, "progress": False},
    }
    train_run(validate_config(raw), root / "run", write_plots=False)
    return root / "run", raw


def test_minmax_sequence_predict_matches_the_training_windows(tmp_path: Path) -> None:
    run, raw = _train(tmp_path, "minmax")
    out_csv = tmp_path / "pred.csv"
    n = predict_csv(run, tmp_path / "series.csv", out_csv)
    out = pd.read_csv(out_csv)
    per_series = LENGTH - LOOKBACK + 1  # every complete window, the last ones forecast ahead
    assert n == len(out) == 2 * per_series
    assert list(out.columns[:4]) == ["series", "time", "value_t+1_pred", "value_t+2_pred"]
    gate_cols = [c for c in out.columns if c.startswith("gate.moe.")]
    assert len(gate_cols) == 3
    np.testing.assert_allclose(out[gate_cols].sum(axis=1), 1.0, atol=1e-5)
    # the windows the loader put in the test split are those whose first target is at or
    # after b; their forecasts must equal the model on the loader's own windows
    servable = load_run(run)
    data = load_dataset(validate_config(raw).data)
    want, _ = predict_raw(servable, data.x["test"])
    b = int(np.floor(LENGTH * 0.8))
    in_test = out[out["time"] + 1 >= b].sort_values(["series", "time"])
    in_test = in_test[in_test["time"] + HORIZON < LENGTH]  # the loader needs the targets
    got = in_test[["value_t+1_pred", "value_t+2_pred"]].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rolling_median_predict_is_in_raw_units(tmp_path: Path) -> None:
    window = 10
    run, _ = _train(tmp_path, "rolling_median", window=window)
    predict_csv(run, tmp_path / "series.csv", tmp_path / "out.csv")
    out = pd.read_csv(tmp_path / "out.csv")
    first_end = window + HORIZON - 1 + LOOKBACK - 1  # first window with every ratio defined
    assert len(out) == 2 * (LENGTH - first_end)
    assert out.groupby("series")["time"].min().tolist() == [first_end, first_end]
    # recompute one forecast by hand: ratios to the shifted median, the model, back to raw
    servable = load_run(run)
    df = pd.read_csv(tmp_path / "series.csv")
    v = df[df["series"] == "s1"].sort_values("time")["value"].to_numpy()
    e = 70
    ratio = [
        v[t] / np.median(v[t - HORIZON - window + 1 : t - HORIZON + 1])
        for t in range(e - LOOKBACK + 1, e + 1)
    ]
    y_ratio, _ = predict_raw(servable, np.asarray(ratio, np.float32).reshape(1, LOOKBACK, 1))
    med = [np.median(v[e + i - HORIZON - window + 1 : e + i - HORIZON + 1]) for i in (1, 2)]
    row = out[(out["series"] == "s1") & (out["time"] == e)]
    np.testing.assert_allclose(
        row[["value_t+1_pred", "value_t+2_pred"]].to_numpy()[0], y_ratio[0] * med, rtol=1e-5
    )
    assert min(med) > 10  # the medians are raw values, so the check above tells units apart


def test_sequence_predict_errors_are_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kanmoe.cli import app

    run, _ = _train(tmp_path, "minmax")
    df = pd.read_csv(tmp_path / "series.csv")
    cases = {
        "no_time.csv": (df.drop(columns=["time"]), "missing column(s) ['time']"),
        "short.csv": (df[df["time"] < LOOKBACK - 1], "no series has a complete window"),
        "text.csv": (
            df.assign(value=df["value"].astype(object).where(df["time"] != 7, "x")),
            "'value' is not numeric",
        ),
    }
    for name, (frame, needle) in cases.items():
        frame.to_csv(tmp_path / name, index=False)
        args = ["predict", str(run), "-i", str(tmp_path / name), "-o", str(tmp_path / "o.csv")]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (name, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (name, lines)
        assert not (tmp_path / "o.csv").exists()
