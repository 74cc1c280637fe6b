"""Run directories: atomic file writes, ``ServableModel`` and ``load_run``.

A finished run dir holds ``config.yaml`` (resolved), ``preprocessing.json``,
``weights.safetensors`` (the inner network), ``metrics.json``, ``history.csv`` and ``plots/``.
``ServableModel`` wraps the inner network with the input/target scaling as buffers, so
``forward`` (and any exported graph) takes raw feature values and returns raw targets.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kanmoe.errors import DataError, RunDirError, first_line
from kanmoe.model.data import Preprocessing

REQUIRED_FILES = ("config.yaml", "preprocessing.json", "weights.safetensors")
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "lr")


def _umask_mode() -> int:
    """0o666 minus the process umask: what ``open(path, "w")`` would have given."""
    mask = os.umask(0)  # the only way to read the umask is to set it; done once, at import
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_mode()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same directory and ``os.replace`` (never a torn file).

    ``mkstemp`` creates the temp file 0600; it gets the usual umask mode before the rename so
    a run dir written by one user stays readable by a server running as another.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save(path: str | Path, writer) -> None:
    """Call ``writer(tmp_path)`` then move the result over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(model: nn.Module, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_save(path, lambda tmp: save_file(state, tmp))


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict; RunDirError naming the file if it is broken or foreign."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise RunDirError(f"{path} is not a safetensors file ({first_line(exc)})") from None
    from kanmoe.model.layers import lock_state

    expected = model.state_dict()  # lock buffers: only in files saved with an edge locked
    expected.update({k: v for k, v in lock_state(model).items() if k in state})
    if mismatch := state_mismatch(expected, state):
        raise RunDirError(f"{path} is for another architecture than config.yaml: {mismatch}")
    model.load_state_dict(state)


def state_mismatch(expected: dict[str, Tensor], got: dict[str, Tensor]) -> str:
    """ "" when ``got`` fits ``expected`` key for key and shape for shape, else what differs."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [k for k in expected if k in got and tuple(expected[k].shape) != tuple(got[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing (first {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} of another shape (first {k!r}: {tuple(got[k].shape)} in the file, "
            f"{tuple(expected[k].shape)} in the model)"
        )
    return "; ".join(parts)


def _forward_accepts(model: nn.Module, keyword: str) -> bool:
    try:
        return keyword in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_with_gates(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """(y, {moe_layer: weights}) for any model; ``{}`` when it has no gates."""
    if not _forward_accepts(model, "return_gates"):
        return model(x), {}
    y, gates = model(x, return_gates=True)
    if isinstance(gates, dict):
        return y, gates
    return y, {str(getattr(model, "name", None) or "moe"): gates}


def forward_with_experts(
    model: nn.Module, x: Tensor
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """(y, {layer: weights}, {layer: per-expert outputs (B, [T,] E, O)}); ``{}`` without MoE."""
    from kanmoe.model.moe import MoE

    if isinstance(model, MoE):
        y, weights, outs = model(x, return_experts=True)
        name = str(model.name or "moe")
        return y, {name: weights}, {name: outs}
    if not _forward_accepts(model, "return_experts"):
        y, gates = forward_with_gates(model, x)
        return y, gates, {}
    return model(x, return_experts=True)


def final_moe_name(model: nn.Module) -> str | None:
    """The MoE layer whose weighted sum *is* the network's output, if there is one.

    Only then do per-expert outputs add up to the prediction, so only then can an
    explanation split the prediction into per-expert contributions.
    """
    from kanmoe.model.moe import GatedSequential, MoE

    if isinstance(model, MoE):
        return str(model.name or "moe")
    if isinstance(model, GatedSequential) and len(model) and isinstance(model[-1], MoE):
        return model.gate_names()[-1]
    return None


def expert_names_of(model: nn.Module) -> dict[str, list[str]]:
    try:
        from kanmoe.model.moe import moe_layers
    except ImportError:
        return {}
    return {name: list(moe.expert_names) for name, moe in moe_layers(model)}


class ServableModel(nn.Module):
    """Raw features in, raw targets and gate weights out.

    forward(x_raw (B, F) or (B, L, F)) -> (y_raw (B, n_targets), {layer: (B, E) or (B, T, E)}).
    """

    def __init__(
        self,
        model: nn.Module,
        feature_names: Sequence[str],
        target_names: Sequence[str],
        x_mean: Sequence[float] | Tensor,
        x_std: Sequence[float] | Tensor,
        y_mean: Sequence[float] | Tensor,
        y_std: Sequence[float] | Tensor,
        target_transform: str = "none",
        seq_len: int | None = None,
        metrics: dict | None = None,
        config: dict | None = None,
        config_hash: str = "",
        input_clip: float | None = None,
    ) -> None:
        super().__init__()
        if target_transform not in ("none", "standardize", "log"):
            raise ValueError(f"target_transform: unknown {target_transform!r}")
        self.model = model
        self.feature_names = list(feature_names)
        self.target_names = list(target_names)
        for name, val, n in (
            ("x_mean", x_mean, len(self.feature_names)),
            ("x_std", x_std, len(self.feature_names)),
            ("y_mean", y_mean, len(self.target_names)),
            ("y_std", y_std, len(self.target_names)),
        ):
            t = torch.as_tensor(val, dtype=torch.float32).reshape(-1)
            if t.numel() != n:
                raise ValueError(f"{name}: expected {n} values, got {t.numel()}")
            self.register_buffer(name, t)
        self.target_transform = target_transform
        self.log_target = target_transform == "log"
        self.input_clip = None if input_clip is None else float(input_clip)
        self.seq_len = seq_len
        self.is_sequence = seq_len is not None
        self.n_features = len(self.feature_names)
        self.metrics = dict(metrics or {})
        self.config = dict(config or {})
        self.config_hash = config_hash
        self.expert_names = expert_names_of(model)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out, gates = forward_with_gates(self.model, self._standardize(x))
        return self._to_raw(out), gates

    def _standardize(self, x: Tensor) -> Tensor:
        z = (x - self.x_mean) / self.x_std
        return z if self.input_clip is None else torch.clamp(z, -self.input_clip, self.input_clip)

    def _to_raw(self, out: Tensor) -> Tensor:
        y = out * self.y_std + self.y_mean
        return torch.expm1(y) if self.log_target else y

    def forward_explained(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """``forward`` plus each MoE layer's per-expert outputs ``(B, [T,] E, O)``.

        The final MoE layer's (see :func:`final_moe_name`) are mapped to raw target units
        like ``y``: each expert's own prediction. Other layers' are hidden activations.
        """
        out, gates, experts = forward_with_experts(self.model, self._standardize(x))
        final = final_moe_name(self.model)
        if final in experts and experts[final].shape[-1] == len(self.target_names):
            experts = {**experts, final: self._to_raw(experts[final])}
        return self._to_raw(out), gates, experts

    def explain_offset(self) -> list[float] | None:
        """Per-target offset with ``y = offset + sum_e gate_e * (expert_e - offset)``.

        That split is exact only when the final MoE's sum is mapped to raw units linearly;
        None otherwise (log targets, no final MoE).
        """
        if self.log_target or final_moe_name(self.model) is None:
            return None
        return [float(v) for v in self.y_mean]


def build_servable(
    model: nn.Module,
    feature_names: Sequence[str],
    target_names: Sequence[str],
    x_mean: Sequence[float] | Tensor,
    x_std: Sequence[float] | Tensor,
    y_mean: Sequence[float] | Tensor,
    y_std: Sequence[float] | Tensor,
    **kwargs: Any,
) -> ServableModel:
    """Wrap any network in a ``ServableModel`` (tests build one without training)."""
    return ServableModel(
        model, feature_names, target_names, x_mean, x_std, y_mean, y_std, **kwargs
    ).eval()


def servable_from_prep(
    model: nn.Module,
    prep: Preprocessing,
    *,
    seq_len: int | None = None,
    metrics: dict | None = None,
    config: dict | None = None,
    config_hash: str = "",
) -> ServableModel:
    return build_servable(
        model,
        prep.feature_names,
        prep.target_names,
        prep.x_mean,
        prep.x_std,
        prep.y_mean,
        prep.y_std,
        target_transform=prep.target_transform,
        input_clip=prep.input_clip,
        seq_len=seq_len,
        metrics=metrics,
        config=config,
        config_hash=config_hash,
    )


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """R² (mean over targets), RMSE and MAE over all values; y (N, n_targets)."""
    err = y_pred - y_true
    ss_res = (err**2).sum(axis=0)
    ss_tot = ((y_true - y_true.mean(axis=0)) ** 2).sum(axis=0)
    r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), 0.0)
    return {
        "r2": float(r2.mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "mae": float(np.abs(err).mean()),
    }


@torch.no_grad()
def predict_raw(servable: nn.Module, x: np.ndarray, batch_size: int = 8192) -> tuple:
    """(y (N, T) numpy, {layer: weights numpy}) for raw inputs, in batches."""
    servable.eval()
    ys, gates = [], {}
    for i in range(0, len(x), batch_size):
        y, g = servable(torch.as_tensor(x[i : i + batch_size], dtype=torch.float32))
        ys.append(y.numpy())
        for k, v in g.items():
            gates.setdefault(k, []).append(v.numpy())
    return np.concatenate(ys), {k: np.concatenate(v) for k, v in gates.items()}


def write_history(path: Path, history: list[dict]) -> None:
    cols = HISTORY_COLUMNS
    lines = [",".join(cols)] + [",".join(repr(row[c]) for c in cols) for row in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


def check_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run dir not found: {run_dir}")
    for name in REQUIRED_FILES:
        if not (run_dir / name).is_file():
            raise RunDirError(f"run dir {run_dir} is incomplete: missing {name} (not trained?)")
    return run_dir


def read_preprocessing(path: str | Path) -> Preprocessing:
    """A run's preprocessing.json; RunDirError naming the file when it is broken."""
    path = Path(path)
    try:
        return Preprocessing.from_json(path.read_text())
    except (DataError, OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path} is broken: {first_line(exc)}") from None


def read_metrics(path: str | Path) -> dict:
    """A run's metrics.json, ``{}`` when absent; RunDirError naming the file when broken."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path} is broken: {first_line(exc)}") from None
    if not isinstance(metrics, dict):
        raise RunDirError(f"{path} is broken: expected a JSON object")
    return metrics


def read_history(path: str | Path) -> list[dict]:
    """Rows of a run's history.csv (epoch int, the rest float); RunDirError when broken."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"missing {path} (not trained?)")
    lines = path.read_text().strip().splitlines()
    cols = list(HISTORY_COLUMNS)
    if not lines:
        raise RunDirError(f"{path} is empty (was the run interrupted? resume it)")
    if lines[0].split(",") != cols:
        raise RunDirError(f"{path} is broken: the first line must be {','.join(cols)}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        values = line.split(",")
        try:
            if len(values) != len(cols):
                raise ValueError(f"{len(values)} values, expected {len(cols)}")
            parsed = zip(cols, values, strict=True)
            rows.append({c: (int(v) if c == "epoch" else float(v)) for c, v in parsed})
        except ValueError as exc:
            raise RunDirError(f"{path} is broken at line {number}: {exc}") from None
    if not rows:
        raise RunDirError(f"{path} has no epochs (was the run interrupted? resume it)")
    return rows


def load_run(run_dir: str | Path) -> ServableModel:
    """Rebuild the ``ServableModel`` from config.yaml + preprocessing.json + weights.

    Every file is checked as it is read: a broken one is a ``RunDirError`` (or
    ``ConfigError`` for config.yaml) that names it, never a library traceback.
    """
    from kanmoe.model.builder import build_model
    from kanmoe.model.config import read_yaml, validate_config

    run_dir = check_run_dir(run_dir)
    config_path = run_dir / "config.yaml"
    cfg = validate_config(read_yaml(config_path), source=str(config_path))
    prep = read_preprocessing(run_dir / "preprocessing.json")
    seq_len = prep.extra.get("lookback") if cfg.data.kind == "sequence" else None
    if cfg.data.kind == "sequence" and not isinstance(seq_len, int):
        raise RunDirError(f"{run_dir / 'preprocessing.json'} is broken: no extra.lookback")
    model = build_model(
        cfg.model, len(prep.feature_names), len(prep.target_names), seq_len, prep.feature_names
    )
    load_weights(model, run_dir / "weights.safetensors")
    metrics = read_metrics(run_dir / "metrics.json")
    return servable_from_prep(
        model,
        prep,
        seq_len=seq_len,
        metrics=metrics,
        config=cfg.to_dict(),
        config_hash=cfg.config_hash(),
    )
