"""Looking inside a trained run: which KAN layers it has, what reaches them, what to call it.

Shared by ``kanmoe symbolic`` and ``kanmoe explain``. A run's network sees standardised
(and clipped) inputs, optionally widened by ``PairRotations``; its KAN layers sit in the
plain stack, in MoE experts, or in a GRKAN gate behind a hidden pre-projection.

Input names are decided by data, not by position: a KAN layer's inputs are named after the
features when what reaches it is the (expanded) network input scaled per column (an MoE's
input transform ``w ⊙ x``), which is checked on a probe batch; otherwise they are hidden
units ``h0, h1, ...``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .layers import KANLinear
from .run import ServableModel


@dataclass
class KANLayerInfo:
    """One KAN layer of a run: a readable label, its module path and its input names."""

    label: str
    path: str
    layer: KANLinear
    input_names: list[str]
    named_inputs: bool  # True when the inputs are (scaled) network inputs
    input_scale: list[float] | None = None  # w with input = w ⊙ network input, when named


def probe_inputs(servable: ServableModel, rows: int = 2048, seed: int = 0) -> tuple[Tensor, str]:
    """Raw inputs to look at the model with: training rows when the run's data loads, else
    Gaussian rows with the training mean and std. Returns (x_raw (N, F), source)."""
    from kanmoe.errors import KanmoeError

    data_cfg = servable.config.get("data")
    if data_cfg:
        try:
            from .config import validate_config
            from .data import load_dataset

            cfg = validate_config(servable.config)
            x = load_dataset(cfg.data).x["train"]
            if len(x) > rows:
                x = x[np.random.default_rng(seed).choice(len(x), rows, replace=False)]
            return torch.as_tensor(np.asarray(x), dtype=torch.float32), "training data"
        except (KanmoeError, OSError, ValueError):
            pass
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, servable.n_features)
    if servable.is_sequence:
        shape = (rows, servable.seq_len, servable.n_features)
    z = torch.randn(shape, generator=gen)
    return servable.x_mean + servable.x_std * z, "Gaussian probe (training data not found)"


@torch.no_grad()
def capture_inputs(model: nn.Module, modules: list[nn.Module], run) -> dict[int, Tensor]:
    """Run ``run()`` and record what reaches each module (by id), flattened to (N, in)."""
    seen: dict[int, Tensor] = {}

    def hook(mod: nn.Module, args) -> None:
        x = args[0]
        seen[id(mod)] = x.detach().reshape(-1, x.shape[-1])

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def scaled_inputs(servable: ServableModel, x_raw: Tensor) -> Tensor:
    """What the inner network receives: standardised, clipped."""
    z = (x_raw - servable.x_mean) / servable.x_std
    if servable.input_clip is not None:
        z = z.clamp(-servable.input_clip, servable.input_clip)
    return z


def expanded_names(servable: ServableModel) -> tuple[list[str], nn.Module | None]:
    """Names of the network's input columns after an optional leading ``PairRotations``."""
    from .features import PairRotations

    rot = next((m for m in servable.model.modules() if isinstance(m, PairRotations)), None)
    names = list(servable.feature_names)
    if rot is None:
        return names, None
    i, j = rot.pair
    fi, fj = names[i], names[j]
    for r in range(rot.directions.shape[1]):
        deg = math.degrees(math.atan2(float(rot.directions[j, r]), float(rot.directions[i, r])))
        names.append(f"rot{deg:.0f}({fi},{fj})")
    return names, rot


def _column_scale(h: Tensor, z: Tensor, tol: float = 1e-4) -> list[float] | None:
    """w with h == z * w per column (least squares through the origin), None if no such w."""
    if h.shape != z.shape:
        return None
    h, z = h.double(), z.double()
    w = (h * z).sum(0) / (z * z).sum(0).clamp_min(1e-12)
    err = (h - z * w).norm() / h.norm().clamp_min(1e-12)
    return w.tolist() if bool(err < tol) else None


def _label(path: str, moe_paths: dict[str, str]) -> str:
    for prefix, name in moe_paths.items():
        if path.startswith(prefix + ".") or prefix == "":
            rest = path[len(prefix) + 1 :] if prefix else path
            parts = rest.split(".")
            if len(parts) >= 2 and parts[0] == "experts":
                parts = [f"expert_{parts[1]}", *parts[2:]]
            return ".".join([name, *parts])
    return path or "kan"


def kan_layers(servable: ServableModel, x_raw: Tensor | None = None) -> list[KANLayerInfo]:
    """Every KANLinear of the run, labelled (``moe.expert_0.0``, ``moe.gate.layer1``, ...)."""
    from .moe import MoE, moe_layers

    model = servable.model
    paths = {id(m): p for p, m in model.named_modules()}
    moe_paths = {paths[id(m)]: name for name, m in moe_layers(model) if isinstance(m, MoE)}
    found = [(p, m) for p, m in model.named_modules() if isinstance(m, KANLinear)]
    if not found:
        return []
    names, rot = expanded_names(servable)
    if x_raw is None:
        x_raw, _ = probe_inputs(servable, rows=64)
    z = scaled_inputs(servable, x_raw[:256])
    z_exp = rot(z) if rot is not None else z
    seen = capture_inputs(model, [m for _, m in found], lambda: servable(x_raw[:256]))
    infos = []
    for path, layer in found:
        h = seen.get(id(layer))
        scale = None if h is None else _column_scale(h, z_exp.reshape(-1, z_exp.shape[-1]))
        named = scale is not None
        inputs = names if named else [f"h{p}" for p in range(layer.in_features)]
        infos.append(KANLayerInfo(_label(path, moe_paths), path, layer, inputs, named, scale))
    return infos
