"""Batch prediction from a CSV with a trained run (the role of Moe-KAN's inference.py).

Output columns: ``<target>_pred`` per target, then ``gate.<layer>.<expert>`` per expert of
every MoE layer. Input columns not used by the model are copied through unchanged.
Tabular runs only: sequence runs need windows, which a flat CSV does not carry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kanmoe.errors import DataError
from kanmoe.model.data import numeric_columns
from kanmoe.model.run import ServableModel, atomic_save, load_run, predict_raw


def predict_frame(
    servable: ServableModel, df: pd.DataFrame, keep_inputs: bool = True
) -> pd.DataFrame:
    """Predictions and gate weights for every row of ``df`` (raw feature columns by name)."""
    if servable.is_sequence:
        raise DataError("predict: this run is a sequence model; CSV batch predict is tabular only")
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
    for layer, w in gates.items():
        names = servable.expert_names.get(layer) or [f"expert_{i}" for i in range(w.shape[-1])]
        for i, expert in enumerate(names):
            out[f"gate.{layer}.{expert}"] = w[:, i]
    return out


def predict_csv(run_dir: str | Path, input_csv: str | Path, output_csv: str | Path) -> int:
    """Read ``input_csv``, write predictions to ``output_csv`` atomically; returns row count."""
    servable = load_run(run_dir)
    path = Path(input_csv)
    if not path.is_file():
        raise DataError(f"--input: file not found: {path}")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"--input: cannot read {path} as CSV: {exc}") from exc
    out = predict_frame(servable, df)
    atomic_save(output_csv, lambda tmp: out.to_csv(tmp, index=False, float_format="%.9g"))
    return len(out)
