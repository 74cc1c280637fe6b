"""``kanmoe predict`` on a raw long CSV for a rolling-median run: a series with too little
history for the median window is named in a one-line error, with the rows it needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kanmoe.errors import DataError
from kanmoe.model.config import validate_config
from kanmoe.model.inference import predict_csv
from kanmoe.model.training import train_run

LOOKBACK, HORIZON, WINDOW = 5, 2, 8
NEED = WINDOW + HORIZON - 1 + LOOKBACK  # rows before the first complete window, inclusive


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("seqpred")
    t = np.arange(80)
    df = pd.concat(
        pd.DataFrame({"time": t, "series": s, "value": 10 + k + np.sin(t / 4 + k)})
        for k, s in enumerate(("a", "b"))
    )
    df.to_csv(root / "train.csv", index=False)
    raw = {
        "data": {
            "kind": "sequence",
            "path": str(root / "train.csv"),
            "lookback": LOOKBACK,
            "horizon": HORIZON,
            "normalization": "rolling_median",
            "window": WINDOW,
        },
        "model": {"kind": "rnn", "expert": "gru", "hidden": [4]},
        "train": {"epochs": 1, "threads": 1, "progress": False},
    }
    train_run(validate_config(raw), root / "run", write_plots=False)
    return root, df


def test_exactly_enough_history_predicts_one_window(run: tuple[Path, pd.DataFrame]) -> None:
    root, df = run
    df[df["time"] < NEED].to_csv(root / "enough.csv", index=False)
    assert predict_csv(root / "run", root / "enough.csv", root / "out.csv") == 2
    out = pd.read_csv(root / "out.csv")
    assert out["time"].tolist() == [NEED - 1, NEED - 1]


def test_a_short_series_is_named_with_the_rows_it_needs(run: tuple[Path, pd.DataFrame]) -> None:
    root, df = run
    short = df[(df["series"] == "a") | (df["time"] < NEED - 1)]  # b lacks one row
    short.to_csv(root / "short.csv", index=False)
    with pytest.raises(DataError) as err:
        predict_csv(root / "run", root / "short.csv", root / "o.csv")
    msg = str(err.value)
    assert "\n" not in msg and "too little history" in msg
    assert f"'b' has {NEED - 1}" in msg and f"at least {NEED} rows" in msg
    assert f"{WINDOW} steps of rolling-median history" in msg
    df[df["time"] < 3].to_csv(root / "tiny.csv", index=False)
    with pytest.raises(DataError, match="no series has a complete window"):
        predict_csv(root / "run", root / "tiny.csv", root / "o.csv")
