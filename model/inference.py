"""Batch prediction from a CSV with a trained run (the role of Moe-KAN's inference.py).

Tabular runs: one output row per input row: the input columns, ``<target>_pred`` per target,
then ``gate.<layer>.<expert>`` per expert of every MoE layer.

Sequence runs read the long format they were trained on (time, series, feature columns) and
predict from every complete window: one output row per series and window end, with the
series, the time of the window's last step, ``<target>_t+i_pred`` for each horizon step in
raw units, and the gate weights (those of the last step when the gate runs per step). For
``rolling_median`` runs the model predicts ratios to the target's rolling median; the median
each step is divided by ends ``horizon`` steps earlier, inside the window, so the ratio is
turned back into raw units with values the window already holds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kanmoe.errors import DataError, first_line
from kanmoe.model.data import numeric_columns, rolling_median_ratio, series_blocks
from kanmoe.model.run import ServableModel, atomic_save, load_run, predict_raw


def predict_frame(
    servable: ServableModel, df: pd.DataFrame, keep_inputs: bool = True
) -> pd.DataFrame:
    """Predictions and gate weights for every row of ``df`` (raw feature columns by name)."""
    if servable.is_sequence:
        return predict_sequence_frame(servable, df)
    missing = [c for c in servable.feature_names if c not in df.columns]
    if missing:
        raise DataError(
            f"--input: missing feature column(s) {missing}; "
            f"the model needs {servable.feature_names}"
        )
    x = numeric_columns(df, servable.feature_names, "--input").astype(np.float32)
    y, gates = predict_raw(servable, x)
    out = df.copy() if keep_inputs else pd.DataFrame(index=df.index)
    for i, name in enumerate(servable.target_names):
        out[f"{name}_pred"] = y[:, i]
    for column, values in _gate_columns(servable, gates).items():
        out[column] = values
    return out


def _gate_columns(servable: ServableModel, gates: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    cols = {}
    for layer, w in gates.items():
        if w.ndim == 3:  # per-step gating (B, T, E): the weights at the window's last step
            w = w[:, -1]
        names = servable.expert_names.get(layer) or [f"expert_{i}" for i in range(w.shape[-1])]
        for i, expert in enumerate(names):
            cols[f"gate.{layer}.{expert}"] = w[:, i]
    return cols


def _rolling_median(values: np.ndarray, window: int) -> np.ndarray:
    """median(values[k-window+1 .. k]) at k (NaN before a full window); zero medians -> 1."""
    med = pd.Series(values).rolling(window, min_periods=window).median().to_numpy()
    return np.where(np.isfinite(med) & (np.abs(med) <= 1e-12), 1.0, med)


def predict_sequence_frame(servable: ServableModel, df: pd.DataFrame) -> pd.DataFrame:
    """Forecasts from every complete window of every series in a long-format frame."""
    from kanmoe.model.config import SequenceData

    cfg = SequenceData.model_validate(servable.config["data"])
    lookback, horizon = int(servable.seq_len), len(servable.target_names)
    features = list(servable.feature_names)
    rolling = cfg.normalization == "rolling_median"
    value_cols = sorted({*features, cfg.target} if rolling else set(features))
    keys = [c for c in (cfg.series_column, cfg.time_column) if c is not None]
    missing = [c for c in [*keys, *value_cols] if c not in df.columns]
    if missing:
        raise DataError(
            f"--input: missing column(s) {missing}; this sequence run reads {keys + value_cols} "
            "in the long format it was trained on"
        )
    numeric_columns(df, value_cols, "--input")
    xs, meds, series, times, short = [], [], [], [], []
    steps = np.arange(1, horizon + 1) - horizon  # target step e+i uses the median at e+i-h
    # the first ratio needs `window` steps of history ending `horizon` steps earlier
    need = lookback + (cfg.window + horizon - 1 if rolling else 0)
    for name, block in series_blocks(df, cfg):
        x = block[features].to_numpy(dtype=np.float64)
        n = len(x)
        if n < need:
            short.append(f"'{name}' has {n}")
            continue
        ends = np.arange(lookback - 1, n)
        med = np.ones((len(ends), horizon))
        if rolling:
            x = rolling_median_ratio(x, cfg.window, horizon)
            target_med = _rolling_median(block[cfg.target].to_numpy(np.float64), cfg.window)
            idx = ends[:, None] + steps[None, :]
            med = np.where(idx >= 0, target_med[np.clip(idx, 0, None)], np.nan)
        win = np.swapaxes(np.lib.stride_tricks.sliding_window_view(x, lookback, axis=0), 1, 2)
        ok = np.isfinite(win).all(axis=(1, 2)) & np.isfinite(med).all(axis=1)
        xs.append(win[ok])
        meds.append(med[ok])
        series += [name] * int(ok.sum())
        times.append(block[cfg.time_column].to_numpy()[ends[ok]])
    if short:
        what = f"a {lookback}-step window" + (
            f" after {cfg.window} steps of rolling-median history shifted by the horizon "
            f"({horizon})"
            if rolling
            else ""
        )
        lead = "no series has a complete window" if not series else "too little history"
        raise DataError(
            f"--input: {lead}: series {', '.join(short[:5])} row(s); {what} needs at least "
            f"{need} rows per series"
        )
    if not series:
        raise DataError("--input: no series has a complete window of finite values")
    y, gates = predict_raw(servable, np.concatenate(xs).astype(np.float32))
    y = y * np.concatenate(meds)
    out = pd.DataFrame({cfg.time_column: np.concatenate(times)})
    if cfg.series_column is not None:
        out.insert(0, cfg.series_column, series)
    for i, name in enumerate(servable.target_names):
        out[f"{name}_pred"] = y[:, i]
    for column, values in _gate_columns(servable, gates).items():
        out[column] = values
    return out


def predict_csv(run_dir: str | Path, input_csv: str | Path, output_csv: str | Path) -> int:
    """Read ``input_csv``, write predictions to ``output_csv`` atomically; returns row count."""
    servable = load_run(run_dir)
    path = Path(input_csv)
    if not path.is_file():
        raise DataError(f"--input: file not found: {path}")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"--input: cannot read {path} as CSV: {first_line(exc)}") from None
    out = predict_frame(servable, df)
    atomic_save(output_csv, lambda tmp: out.to_csv(tmp, index=False, float_format="%.9g"))
    return len(out)
