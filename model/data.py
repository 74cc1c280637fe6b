"""Data loading: tabular CSVs and sequence windows, splits, and the scaling stored with a model.

All scaling is fitted on the training part only. The fitted statistics live in
``Preprocessing`` and are baked into ``ServableModel`` so clients send raw values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kanmoe.errors import DataError, first_line
from kanmoe.model.config import SequenceData, TabularData
from kanmoe.paths import CALIFORNIA_HOUSING_CSV

BUILTIN = {"builtin:california_housing": CALIFORNIA_HOUSING_CSV}
MIN_ROWS = 10  # fewer leaves a split with a row or two: no spread to scale by, no R² to report


@dataclass
class Preprocessing:
    """Affine input scaling x_s = (x - x_mean) / x_std and target scaling of t(y).

    ``target_transform == "log"`` means t(y) = log1p(y); otherwise t is the identity.
    """

    feature_names: list[str]
    target_names: list[str]
    x_mean: list[float]
    x_std: list[float]
    y_mean: list[float]
    y_std: list[float]
    target_transform: str = "none"
    input_transform: str = "standardize"
    input_clip: float | None = None
    extra: dict = field(default_factory=dict)

    def scale_x(self, x: np.ndarray) -> np.ndarray:
        z = (x - np.asarray(self.x_mean)) / np.asarray(self.x_std)
        if self.input_clip is not None:
            z = np.clip(z, -self.input_clip, self.input_clip)
        return z.astype(np.float32)

    def scale_y(self, y: np.ndarray) -> np.ndarray:
        t = np.log1p(y) if self.target_transform == "log" else y
        return ((t - np.asarray(self.y_mean)) / np.asarray(self.y_std)).astype(np.float32)

    def unscale_y(self, z: np.ndarray) -> np.ndarray:
        t = z * np.asarray(self.y_std) + np.asarray(self.y_mean)
        return np.expm1(t) if self.target_transform == "log" else t

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        """Parse and check what ``to_json`` wrote; DataError (one line) for anything else."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise DataError("expected a JSON object")
        known = set(cls.__dataclass_fields__)
        required = {"feature_names", "target_names", "x_mean", "x_std", "y_mean", "y_std"}
        if missing := sorted(required - set(raw)):
            raise DataError(f"missing key(s) {missing}")
        if unknown := sorted(set(raw) - known):
            raise DataError(f"unknown key(s) {unknown}")
        prep = cls(**raw)
        pairs = (("feature_names", ("x_mean", "x_std")), ("target_names", ("y_mean", "y_std")))
        for names, stats in pairs:
            n = len(getattr(prep, names))
            for stat in stats:
                values = getattr(prep, stat)
                if not isinstance(values, list) or len(values) != n:
                    raise DataError(f"{stat} must list one number per entry of {names} ({n})")
                if not all(isinstance(v, int | float) and np.isfinite(v) for v in values):
                    raise DataError(f"{stat} must hold finite numbers")
        return prep


@dataclass
class Dataset:
    """Raw (unscaled) arrays per split: x (N, F) or (N, L, F), y (N, n_targets)."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    prep: Preprocessing
    is_sequence: bool = False

    @property
    def seq_len(self) -> int | None:
        return int(self.x["train"].shape[1]) if self.is_sequence else None

    @property
    def n_features(self) -> int:
        return int(self.x["train"].shape[-1])

    @property
    def n_targets(self) -> int:
        return int(self.y["train"].shape[-1])


def resolve_path(path: str) -> Path:
    resolved = BUILTIN.get(path, Path(path))
    if not Path(resolved).is_file():
        raise DataError(f"data.path: file not found: {path}")
    return Path(resolved)


def read_csv(path: str) -> pd.DataFrame:
    """The CSV at ``path`` (or a builtin name); DataError if unreadable or without data rows."""
    try:
        df = pd.read_csv(resolve_path(path))
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, OSError) as exc:
        raise DataError(f"data.path: cannot read {path} as CSV: {first_line(exc)}") from None
    if df.empty:
        raise DataError(f"data.path: {path} has no data rows (only a header)")
    return df


def numeric_columns(df: pd.DataFrame, columns: list[str], what: str) -> np.ndarray:
    """Columns as float64 (N, len(columns)); DataError naming a missing/non-numeric/NaN column."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{what}: column(s) {missing} not in the CSV (has {list(df.columns)})")
    for c in columns:
        if not pd.api.types.is_numeric_dtype(df[c]):  # bool counts: True/False read as 1/0
            col = df[c]
            text = pd.to_numeric(col, errors="coerce").isna() & col.notna()
            row = int(np.flatnonzero(text.to_numpy())[0]) if text.any() else 0
            raise DataError(
                f"{what}: column '{c}' is not numeric (dtype {col.dtype}; "
                f"{col.iloc[row]!r} at row {row + 1} after the header)"
            )
        bad = ~np.isfinite(df[c].to_numpy(dtype=np.float64))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{what}: column '{c}' has NaN/inf values "
                f"({int(bad.sum())} rows, first at row {row + 1} after the header)"
            )
    return df[columns].to_numpy(dtype=np.float64)


def _fit_scaling(values: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per last-axis column; ``how`` in standardize/minmax/none."""
    flat = values.reshape(-1, values.shape[-1])
    if how == "standardize":
        mean, std = flat.mean(axis=0), flat.std(axis=0)
    elif how == "minmax":
        mean, std = flat.min(axis=0), flat.max(axis=0) - flat.min(axis=0)
    else:
        mean, std = np.zeros(flat.shape[1]), np.ones(flat.shape[1])
    std = np.where(std > 1e-12, std, 1.0)
    return mean, std


def split_indices(n: int, cfg: TabularData) -> dict[str, np.ndarray]:
    """Row indices for train/val/test. ``reference`` = the KAMoE notebooks' sklearn split."""
    idx = np.arange(n)
    if cfg.split == "reference":
        from sklearn.model_selection import train_test_split

        train_val, test = train_test_split(
            idx, test_size=cfg.test_size, random_state=cfg.split_seed
        )
        train, val = train_test_split(
            train_val, test_size=cfg.val_size, random_state=cfg.split_seed
        )
    else:
        perm = np.random.default_rng(cfg.split_seed).permutation(n)
        n_test = round(n * cfg.test_size)
        n_val = round((n - n_test) * cfg.val_size)
        test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return {"train": np.asarray(train), "val": np.asarray(val), "test": np.asarray(test)}


def load_tabular(cfg: TabularData) -> Dataset:
    df = read_csv(cfg.path)
    if cfg.max_rows is not None:
        df = df.iloc[: cfg.max_rows]
    targets = list(cfg.target)
    features = list(cfg.features) if cfg.features else [c for c in df.columns if c not in targets]
    overlap = set(features) & set(targets)
    if overlap:
        raise DataError(f"data.features: {sorted(overlap)} are also targets")
    if not features:
        raise DataError("data.features: no feature columns left")
    x = numeric_columns(df, features, "data.features")
    y = numeric_columns(df, targets, "data.target")
    if cfg.target_transform == "log" and (y <= -1).any():
        row, col = (int(i[0]) for i in np.nonzero(y <= -1))
        raise DataError(
            f"data.target_transform: log needs every target > -1 (log1p); column "
            f"'{targets[col]}' has {y[row, col]:g} at row {row + 1} after the header"
        )
    if len(df) < MIN_ROWS:
        raise DataError(f"data: {len(df)} rows are too few (at least {MIN_ROWS} are needed)")
    parts = split_indices(len(df), cfg)
    if min(len(p) for p in parts.values()) == 0:
        raise DataError(f"data: {len(df)} rows are too few for a train/val/test split")
    xs = {k: x[v].astype(np.float32) for k, v in parts.items()}
    ys = {k: y[v].astype(np.float32) for k, v in parts.items()}
    x_mean, x_std = _fit_scaling(x[parts["train"]], cfg.input_transform)
    y_train = y[parts["train"]]
    if cfg.target_transform == "log":
        y_train = np.log1p(y_train)
    y_how = "none" if cfg.target_transform == "none" else "standardize"
    y_mean, y_std = _fit_scaling(y_train, y_how)
    prep = Preprocessing(
        feature_names=features,
        target_names=targets,
        x_mean=x_mean.tolist(),
        x_std=x_std.tolist(),
        y_mean=y_mean.tolist(),
        y_std=y_std.tolist(),
        target_transform=cfg.target_transform,
        input_transform=cfg.input_transform,
        input_clip=cfg.input_clip,
    )
    return Dataset(x=xs, y=ys, prep=prep)


def rolling_median_ratio(values: np.ndarray, window: int, horizon: int) -> np.ndarray:
    """values[t] / median(values[t-h-window+1 .. t-h]) per column; NaN where undefined."""
    frame = pd.DataFrame(values)
    med = frame.rolling(window, min_periods=window).median().shift(horizon).to_numpy()
    med = np.where(np.isfinite(med) & (np.abs(med) <= 1e-12), 1.0, med)  # zero median: unscaled
    return values / med


def series_blocks(df: pd.DataFrame, cfg: SequenceData) -> list[tuple[str, pd.DataFrame]]:
    """(series name, its rows sorted by time) per series; ("all", every row) without one."""
    if cfg.time_column not in df.columns:
        raise DataError(f"data.time_column: column '{cfg.time_column}' not in the CSV")
    if cfg.series_column is None:
        return [("all", df.sort_values(cfg.time_column, kind="stable"))]
    if cfg.series_column not in df.columns:
        raise DataError(f"data.series_column: column '{cfg.series_column}' not in the CSV")
    ordered = df.sort_values([cfg.series_column, cfg.time_column], kind="stable")
    return [(str(k), g) for k, g in ordered.groupby(cfg.series_column, sort=True)]


def load_sequence(cfg: SequenceData) -> Dataset:
    """Windows of ``lookback`` steps -> next ``horizon`` target values, split in time per series.

    Boundaries per series: train period [0, a), val [a, b), test [b, n). A window belongs to
    a split only if all its target steps lie inside that split's period, so no train window
    sees a val/test target. Scaling (MinMax) is fitted on train-period rows only.
    """
    df = read_csv(cfg.path)
    features = cfg.feature_columns
    numeric_columns(df, sorted({*features, cfg.target}), "data.features")
    lookback, h = cfg.lookback_steps, cfg.horizon
    if lookback < 1:
        raise DataError("data.lookback must be >= 1")
    tgt_col = features.index(cfg.target) if cfg.target in features else None
    wins: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    tgts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    train_rows, train_targets = [], []
    for _, block in series_blocks(df, cfg):
        x = block[features].to_numpy(dtype=np.float64)
        t = block[[cfg.target]].to_numpy(dtype=np.float64)
        if cfg.normalization == "rolling_median":
            x = rolling_median_ratio(x, cfg.window, h)
            t = x[:, [tgt_col]] if tgt_col is not None else rolling_median_ratio(t, cfg.window, h)
            keep = np.isfinite(x).all(axis=1) & np.isfinite(t).all(axis=1)
            first = int(np.argmax(keep)) if keep.any() else len(keep)
            x, t = x[first:], t[first:]
        n = len(x)
        b = int(np.floor(n * (1 - cfg.test_size)))
        a = int(np.floor(b * (1 - cfg.val_size)))
        train_rows.append(x[:a])
        train_targets.append(t[:a])
        # window ending at step e (inclusive) predicts t[e+1 .. e+h]
        ends = np.arange(lookback - 1, n - h)
        if len(ends) == 0:
            continue
        first_t, last_t = ends + 1, ends + h
        masks = {
            "train": last_t < a,
            "val": (first_t >= a) & (last_t < b),
            "test": first_t >= b,
        }
        x_win = np.lib.stride_tricks.sliding_window_view(x, lookback, axis=0)  # (n-L+1, F, L)
        t_win = np.lib.stride_tricks.sliding_window_view(t[:, 0], h)  # (n-h+1, h)
        for part, mask in masks.items():
            e = ends[mask]
            wins[part].append(np.swapaxes(x_win[e - lookback + 1], 1, 2))
            tgts[part].append(t_win[e + 1])
    for part in wins:
        if sum(len(w) for w in wins[part]) == 0:
            raise DataError(
                f"data: no {part} windows (lookback {lookback}, horizon {h}); "
                "the series are too short for this split"
            )
    xs = {k: np.concatenate(v).astype(np.float32) for k, v in wins.items()}
    ys = {k: np.concatenate(v).astype(np.float32) for k, v in tgts.items()}
    how = "none" if cfg.normalization == "none" else "minmax"
    x_mean, x_std = _fit_scaling(np.concatenate(train_rows), how)
    if tgt_col is not None:
        y_mean, y_std = np.full(h, x_mean[tgt_col]), np.full(h, x_std[tgt_col])
    else:
        m, s = _fit_scaling(np.concatenate(train_targets), how)
        y_mean, y_std = np.full(h, m[0]), np.full(h, s[0])
    prep = Preprocessing(
        feature_names=features,
        target_names=[f"{cfg.target}_t+{i + 1}" for i in range(h)],
        x_mean=x_mean.tolist(),
        x_std=x_std.tolist(),
        y_mean=y_mean.tolist(),
        y_std=y_std.tolist(),
        target_transform="none",
        input_transform=how,
        extra={"lookback": lookback, "horizon": h, "normalization": cfg.normalization},
    )
    return Dataset(x=xs, y=ys, prep=prep, is_sequence=True)


def load_dataset(cfg: TabularData | SequenceData) -> Dataset:
    return load_sequence(cfg) if cfg.kind == "sequence" else load_tabular(cfg)
