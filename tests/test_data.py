"""Data: split sizes, train-only scaling, clear column errors, sequence windows without leakage."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from kanmoe.errors import DataError
from kanmoe.model.config import SequenceData, TabularData
from kanmoe.model.data import load_dataset


def test_reference_split_matches_the_kamoe_notebooks(california_csv: Path) -> None:
    data = load_dataset(TabularData(path=str(california_csv)))
    sizes = {k: len(v) for k, v in data.x.items()}
    assert sizes == {"train": 13209, "val": 3303, "test": 4128}
    df = pd.read_csv(california_csv)
    _, test = train_test_split(df, test_size=0.2, random_state=42)
    np.testing.assert_allclose(data.y["test"][:, 0], test["MedHouseVal"].to_numpy(), rtol=1e-6)
    # standardisation fitted on train only
    np.testing.assert_allclose(data.prep.x_mean, data.x["train"].mean(axis=0), rtol=1e-4)
    assert not np.allclose(data.prep.x_mean, data.x["test"].mean(axis=0), rtol=1e-4)
    assert data.prep.feature_names == list(df.columns[:-1])


def _table(tmp_path: Path, n: int = 500) -> Path:
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.uniform(size=n), "c": rng.normal(size=n)})
    df["y"] = 2 * df["a"] + df["b"]
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    return path


def test_random_split_64_16_20_disjoint(tmp_path: Path) -> None:
    path = _table(tmp_path, 1000)
    data = load_dataset(TabularData(path=str(path), target="y", split="random"))
    assert {k: len(v) for k, v in data.x.items()} == {"train": 640, "val": 160, "test": 200}
    rows = np.concatenate([data.x[k][:, 0] for k in ("train", "val", "test")])
    assert len(np.unique(rows)) == 1000


def test_log_target_transform_roundtrips(tmp_path: Path) -> None:
    path = _table(tmp_path)
    df = pd.read_csv(path)
    df["y"] = np.exp(df["a"])
    df.to_csv(path, index=False)
    data = load_dataset(TabularData(path=str(path), target="y", target_transform="log"))
    y = data.y["test"]
    z = data.prep.scale_y(y)
    assert abs(float(data.prep.scale_y(data.y["train"]).mean())) < 1e-5
    np.testing.assert_allclose(data.prep.unscale_y(z), y, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"features": ["a", "nope"]}, "'nope'|\\['nope'\\]"),
        ({"target": "missing"}, "missing"),
    ],
)
def test_missing_columns_are_named(tmp_path: Path, change: dict, message: str) -> None:
    path = _table(tmp_path)
    with pytest.raises(DataError, match=message):
        load_dataset(TabularData(path=str(path), **{"target": "y", **change}))


def test_non_numeric_and_nan_columns_are_named(tmp_path: Path) -> None:
    path = _table(tmp_path)
    df = pd.read_csv(path)
    df["b"] = df["b"].astype(object)
    df.loc[3, "b"] = "oops"
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match="column 'b' is not numeric"):
        load_dataset(TabularData(path=str(path), target="y"))
    df = pd.read_csv(_table(tmp_path))
    df.loc[7, "c"] = np.nan
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match="column 'c' has NaN"):
        load_dataset(TabularData(path=str(path), target="y"))


def _series_csv(tmp_path: Path, n_series: int = 3, length: int = 300) -> Path:
    """Long format, shuffled rows; value encodes (series, time) so windows can be traced."""
    rows = []
    for s in range(n_series):
        for t in range(length):
            rows.append({"time": t, "series": f"s{s}", "value": 1000.0 * s + t, "aux": float(t)})
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=0)
    path = tmp_path / "series.csv"
    df.to_csv(path, index=False)
    return path


def test_sequence_windows_are_chronological_without_leakage(tmp_path: Path) -> None:
    path = _series_csv(tmp_path)
    cfg = SequenceData(
        path=str(path), lookback=10, horizon=3, normalization="none", features=["value", "aux"]
    )
    data = load_dataset(cfg)
    length, h = 300, 3
    b = int(np.floor(length * 0.8))
    a = int(np.floor(b * 0.8))
    for part in ("train", "val", "test"):
        x, y = data.x[part], data.y[part]
        assert x.shape[1:] == (10, 2) and y.shape[1:] == (3,)
        t_in = x[:, :, 1]  # aux == time
        t_out = np.mod(y, 1000.0)  # time of each target step
        # inputs are consecutive steps; targets are the next h steps of the same series
        np.testing.assert_array_equal(np.diff(t_in, axis=1), 1.0)
        np.testing.assert_array_equal(t_out, t_in[:, -1:] + np.arange(1, h + 1))
        lo, hi = {"train": (0, a), "val": (a, b), "test": (b, length)}[part]
        assert t_out.min() >= lo and t_out.max() < hi
    # each series contributes windows to every split
    for part in ("train", "val", "test"):
        assert len(np.unique(np.floor(data.y[part][:, 0] / 1000))) == 3
    assert len(data.x["train"]) == 3 * (a - 10 - h + 1)


def test_sequence_minmax_fitted_on_train_period_only(tmp_path: Path) -> None:
    path = _series_csv(tmp_path, n_series=1)
    data = load_dataset(SequenceData(path=str(path), lookback=5, horizon=1, features=["aux"]))
    a = int(np.floor(int(np.floor(300 * 0.8)) * 0.8))
    assert data.prep.x_mean == [0.0] and data.prep.x_std == [float(a - 1)]
    assert data.prep.y_mean == [0.0]
    # test-period inputs scale beyond 1: the test period was not used for fitting
    assert data.prep.scale_x(data.x["test"]).max() > 1.0


def test_rolling_median_uses_only_past_values(tmp_path: Path) -> None:
    path = _series_csv(tmp_path, n_series=1)
    cfg = SequenceData(
        path=str(path), lookback=4, horizon=2, normalization="rolling_median", window=20
    )
    data = load_dataset(cfg)
    # value_t / median(value_{t-h-w+1..t-h}) for value_t = t: median = t - h - (w-1)/2
    first_t = 20 + 2 - 1  # first step with a full shifted window
    t = np.arange(first_t, 300, dtype=float)
    ratio = t / (t - 2 - 9.5)
    lo, hi = ratio.min(), ratio.max()
    all_x = np.concatenate([data.x[p] for p in ("train", "val", "test")])
    assert all_x.min() >= lo - 1e-9 and all_x.max() <= hi + 1e-9
    assert data.x["train"][0, 0, 0] == pytest.approx(ratio[0])


def test_sequence_too_short_is_a_clear_error(tmp_path: Path) -> None:
    path = _series_csv(tmp_path, n_series=1, length=30)
    with pytest.raises(DataError, match=r"no (val|test|train) windows"):
        load_dataset(SequenceData(path=str(path), lookback=20, horizon=3))
