"""Training-data statistics that ``kanmoe export`` records in ``kanmoe.json`` for monitoring.

- ``feature_ranges``: ``{feature: [min, max]}`` over the TRAIN split, in the units the model
  takes as input (``input_units``). The service counts inputs outside them: that is where
  the splines extrapolate and the model's answers deserve less trust.
- ``gate_reference``: ``{layer: {"shares", "top1_shares", "rows", "split": "test"}}``, the
  mean gate weight per expert and the fraction of rows each expert wins (argmax), from the
  servable run on the TEST split (a gate with a time axis: its last step). The service's
  gate drift is the Jensen-Shannon divergence of live traffic against ``shares``.

The one decision that matters: the data are *rebuilt* from the run's ``config.yaml`` with the
training loaders and split seeds, then the scaling fitted on the rebuilt train split must
equal the run's ``preprocessing.json``; only then do the statistics describe the rows the
model was trained and tested on. If the data cannot be rebuilt (file moved or changed), the
export goes on without these keys and :func:`run_stats` says why; it never fails an export.

Precision: tabular ranges are the exact float64 values of the CSV. Sequence ranges are
float32 window values (what the model saw), written as the shortest decimal that reads back
as the same float32. A consumer comparing float32 inputs should cast the bounds to float32
too: rounding to float32 is monotone, so every training value then lies inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kanmoe.errors import KanmoeError

STATS_KEYS = ("input_units", "feature_ranges", "gate_reference")
REFERENCE_SPLIT = "test"
RANGE_SPLIT = "train"


class DataMismatch(KanmoeError):
    """The run's data cannot be rebuilt as it was at training time; the message says how."""


@dataclass(frozen=True)
class RunStats:
    """What goes into ``kanmoe.json`` (``values``; empty when skipped) and why it was skipped."""

    values: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and np.allclose(a, b, rtol=1e-9, atol=1e-12)


def _check_prep(rebuilt: Any, stored: Any, servable: Any) -> None:
    """Raise :class:`DataMismatch` unless the rebuilt scaling is the one the run was fitted with."""
    if list(rebuilt.feature_names) != list(stored.feature_names) or list(
        rebuilt.target_names
    ) != list(stored.target_names):
        raise DataMismatch("its feature/target columns differ from the run's preprocessing.json")
    if list(servable.feature_names) != list(stored.feature_names):
        raise DataMismatch("the loaded model's feature names differ from preprocessing.json")
    for key in ("x_mean", "x_std", "y_mean", "y_std"):
        if not _same(getattr(rebuilt, key), getattr(stored, key)):
            raise DataMismatch(f"its train split gives a different {key} than preprocessing.json")


def rebuild_dataset(run_dir: str | Path, servable: Any) -> tuple[Any, Any]:
    """(data config, :class:`kanmoe.model.data.Dataset`) exactly as the run was trained on.

    Raises a :class:`KanmoeError` (``DataError`` from the loaders or :class:`DataMismatch`)
    when the data file is gone or no longer gives the run's fitted scaling.
    """
    from kanmoe.model.config import read_yaml, validate_config
    from kanmoe.model.data import Preprocessing, load_dataset

    run_dir = Path(run_dir)
    cfg = validate_config(read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    stored = Preprocessing.from_json((run_dir / "preprocessing.json").read_text())
    data = load_dataset(cfg.data)
    _check_prep(data.prep, stored, servable)
    if data.is_sequence and data.seq_len != servable.seq_len:
        raise DataMismatch(f"its windows have {data.seq_len} steps, the model {servable.seq_len}")
    return cfg.data, data


def input_units(data_cfg: Any) -> str:
    """Human-readable units of the model's input (what ``feature_ranges`` is measured in)."""
    if data_cfg.kind != "sequence" or data_cfg.normalization != "rolling_median":
        return "raw"
    w, h = data_cfg.window, data_cfg.horizon
    return (
        f"normalised: each value of a series divided by the rolling median of its {w} steps "
        f"ending {h} step(s) earlier (median of t-{h}-{w - 1} .. t-{h}), before windowing"
    )


def _tabular_train_rows(data_cfg: Any, features: list[str]) -> np.ndarray:
    """Train-split feature rows as float64 from the CSV (the loader keeps float32 only)."""
    from kanmoe.model.data import numeric_columns, read_csv, split_indices

    df = read_csv(data_cfg.path)
    if data_cfg.max_rows is not None:
        df = df.iloc[: data_cfg.max_rows]
    x = numeric_columns(df, features, "data.features")
    return x[split_indices(len(df), data_cfg)[RANGE_SPLIT]]


def feature_ranges(values: np.ndarray, names: list[str]) -> dict[str, list[float]]:
    """``{name: [min, max]}`` over every axis but the last of ``values`` (N, F) or (N, L, F).

    float32 input gives bounds as the shortest decimals that read back as the same float32.
    """
    flat = values.reshape(-1, values.shape[-1])
    if flat.shape[0] == 0 or flat.shape[1] != len(names):
        raise ValueError(f"values: expected (rows > 0, {len(names)}), got {values.shape}")
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    as_float = (lambda v: float(str(v))) if flat.dtype == np.float32 else float
    return {n: [as_float(a), as_float(b)] for n, a, b in zip(names, lo, hi, strict=True)}


def gate_reference(servable: Any, x: np.ndarray) -> dict[str, dict[str, Any]]:
    """Mean gate weight and argmax share per expert for every MoE layer, over the rows of ``x``.

    ``x`` is raw model input (N, F) or (N, L, F). Gate weights with a time axis (N, T, E)
    are read at the last step, the one that decides the prediction.
    """
    from kanmoe.model.run import predict_raw

    if len(x) == 0:
        raise ValueError("x: no rows to compute the gate reference on")
    _, gates = predict_raw(servable, x)
    out: dict[str, dict[str, Any]] = {}
    for layer, w in gates.items():
        w = np.asarray(w, dtype=np.float64)
        if w.ndim == 3:
            w = w[:, -1]
        n_experts = w.shape[-1]
        top1 = np.bincount(w.argmax(axis=-1), minlength=n_experts) / len(w)
        out[layer] = {
            "shares": [float(v) for v in w.mean(axis=0)],
            "top1_shares": [float(v) for v in top1],
            "rows": len(w),
            "split": REFERENCE_SPLIT,
        }
    return out


def run_stats(run_dir: str | Path, servable: Any) -> RunStats:
    """The monitoring statistics of a trained run, or the reason they cannot be computed."""
    try:
        data_cfg, data = rebuild_dataset(run_dir, servable)
        names = list(data.prep.feature_names)
        train = data.x[RANGE_SPLIT] if data.is_sequence else _tabular_train_rows(data_cfg, names)
    except (KanmoeError, OSError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return RunStats(skipped=f"training data not rebuilt ({message})")
    values: dict[str, Any] = {
        "input_units": input_units(data_cfg),
        "feature_ranges": feature_ranges(train, names),
    }
    gates = gate_reference(servable, data.x[REFERENCE_SPLIT])
    if gates:
        values["gate_reference"] = gates
    return RunStats(values=values)
