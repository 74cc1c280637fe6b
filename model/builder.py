"""Config -> ``nn.Module``: MLP, KAN, MoE/KAMoE over MLP/KAN experts, and sequence models.

Tabular models map (B, F) -> (B, n_targets); sequence models map (B, L, F) -> (B, horizon).
MoE models are ``GatedSequential`` containers so ``forward(x, return_gates=True)`` returns
the gate weights of every MoE layer.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

from torch import nn

from kanmoe.errors import ConfigError
from kanmoe.model.activations import make_activation
from kanmoe.model.config import ModelConfig


def kan_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The KANLinear keyword arguments the config sets, filtered to those KANLinear accepts."""
    from kanmoe.model.layers import KANLinear

    wanted = {
        "basis": cfg.basis,
        "grid_size": cfg.grid_size,
        "spline_order": cfg.spline_order,
        "grid_range": tuple(cfg.grid_range),
        "base_activation": cfg.base_activation,
        "num_control_points": cfg.num_control_points,
        "spline_width": cfg.spline_width,
    }
    accepted = inspect.signature(KANLinear.__init__).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


def _mlp(widths: list[int], cfg: ModelConfig, last_linear: bool = True) -> nn.Sequential:
    """Linear/activation stack over ``widths`` (in, h1, ..., out); no activation after the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2 or not last_linear:
            layers.append(make_activation(cfg.activation, "model.activation"))
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
    return nn.Sequential(*layers)


def _moe_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    gate = cfg.gate or ("grkan" if cfg.kind == "kamoe" else "grn")
    transform = cfg.input_transform
    if transform is None:
        transform = cfg.kind == "kamoe"
    kw: dict[str, Any] = {
        "n_experts": cfg.n_experts,
        "gate": gate,
        "gating_activation": cfg.gating_activation,
        "top_k": cfg.top_k,
        "noisy_gating": cfg.noisy_gating,
        "input_transform": transform,
        "gate_input": cfg.gate_input,
    }
    if cfg.gate_hidden is not None:
        kw["gate_hidden"] = cfg.gate_hidden
    optional = {
        "gate_dropout": cfg.gate_dropout,
        "gate_layer_norm": cfg.gate_layer_norm,
        "load_balance_weight": cfg.load_balance_weight,
        "z_loss_weight": cfg.z_loss_weight,
    }
    if gate == "grkan":
        optional["kan_activations"] = tuple(cfg.gate_kan_activations)
    return kw | optional


def _make_moe(expert: nn.Module, cfg: ModelConfig, in_features: int, name: str, **extra: Any):
    from kanmoe.model.moe import MoE

    kw = {**_moe_kwargs(cfg), **extra}
    if kw["gate"] == "grkan":
        gate_kw = kan_kwargs(cfg)
        gate_kw.pop("base_activation", None)  # the gate sets its own (gate_kan_activations)
        kw["gate_kan_kwargs"] = gate_kw
    accepted = inspect.signature(MoE.__init__).parameters
    return MoE(
        expert, in_features=in_features, name=name, **{k: v for k, v in kw.items() if k in accepted}
    )


def _kan_mlp(widths: list[int], cfg: ModelConfig) -> nn.Sequential:
    """KANLinear(in -> h1) + activation, then an MLP h1 -> ... -> out (KAN on raw inputs)."""
    from kanmoe.model.layers import KANLinear

    if len(widths) < 3:
        raise ValueError("model.hidden: kanmlp needs at least one hidden width")
    first = KANLinear(widths[0], widths[1], **kan_kwargs(cfg))
    return nn.Sequential(
        first, make_activation(cfg.activation, "model.activation"), *_mlp(widths[1:], cfg)
    )


def _network(kind: str, widths: list[int], cfg: ModelConfig) -> nn.Module:
    if kind == "kan":
        from kanmoe.model.layers import KAN

        return KAN(widths=widths, **kan_kwargs(cfg))
    if kind == "kanmlp":
        return _kan_mlp(widths, cfg)
    return _mlp(widths, cfg)


def _tabular(cfg: ModelConfig, n_in: int, n_out: int) -> nn.Module:
    widths = [n_in, *cfg.hidden, n_out]
    if cfg.kind in ("mlp", "kan", "kanmlp"):
        return _network(cfg.kind, widths, cfg)
    from kanmoe.model.moe import GatedSequential

    if cfg.placement == "whole":
        expert = _network(cfg.expert, widths, cfg)
        return GatedSequential(_make_moe(expert, cfg, n_in, "moe"))
    # per_layer: the KAMoE notebooks' Sequential([KAMoE(Dense(u)) x n, Dense(1)])
    modules: list[nn.Module] = []
    d = n_in
    for i, h in enumerate(cfg.hidden):
        if cfg.expert in ("kan", "kanmlp"):
            from kanmoe.model.layers import KANLinear

            layer: nn.Module = KANLinear(d, h, **kan_kwargs(cfg))
        else:
            layer = _mlp([d, h], cfg, last_linear=False)
        name = "moe" if len(cfg.hidden) == 1 else f"moe_{i}"
        modules.append(_make_moe(layer, cfg, d, name))
        d = h
    modules.append(nn.Linear(d, n_out))
    return GatedSequential(*modules)


def _sequence(cfg: ModelConfig, n_in: int, seq_len: int, n_out: int) -> nn.Module:
    if cfg.kind in ("mlp", "kan", "kanmlp"):
        flat = _tabular(cfg, n_in * seq_len, n_out)
        return nn.Sequential(nn.Flatten(start_dim=1), flat)
    from kanmoe.model.experts import RNNExpert
    from kanmoe.model.moe import GatedSequential

    modules: list[nn.Module] = []
    d = n_in
    for i, h in enumerate(cfg.hidden):
        keep_time = i < len(cfg.hidden) - 1
        rnn = RNNExpert(cfg.expert, d, h, return_sequences=keep_time)
        if i == 0 and cfg.kind in ("moe", "kamoe"):
            rnn = _make_moe(rnn, cfg, d, "moe", seq_len=seq_len)
        modules.append(rnn)
        d = h
    modules.append(nn.Linear(d, n_out))
    return GatedSequential(*modules)


def _rotations(cfg: ModelConfig, n_in: int, feature_names: list[str] | None) -> nn.Module:
    from kanmoe.model.features import PairRotations

    if feature_names is None:
        raise ConfigError("model.rotations: needs the feature names to find rotate_pair")
    missing = [f for f in cfg.rotate_pair if f not in feature_names]
    if missing:
        raise ConfigError(
            f"model.rotate_pair: {missing} not among the features {list(feature_names)}"
        )
    i, j = (list(feature_names).index(f) for f in cfg.rotate_pair)
    return PairRotations(n_in, (i, j), cfg.rotations)


def build_model(
    cfg: ModelConfig,
    n_features: int,
    n_targets: int,
    seq_len: int | None = None,
    feature_names: list[str] | None = None,
) -> nn.Module:
    """Build the network for ``n_features`` inputs (per step if ``seq_len``) and ``n_targets``.

    With ``model.rotations`` the network starts with a ``PairRotations`` layer (found by
    ``feature_names``); call ``kanmoe.model.features.fit_feature_layers`` on the training
    inputs before training.
    """
    if seq_len is not None:
        if cfg.rotations:
            raise ConfigError("model.rotations: only for tabular data")
        return _sequence(cfg, n_features, seq_len, n_targets)
    if not cfg.rotations:
        return _tabular(cfg, n_features, n_targets)
    expand = _rotations(cfg, n_features, feature_names)
    net = _tabular(cfg, expand.out_features, n_targets)
    if isinstance(net, nn.Sequential):  # GatedSequential stays one (gate outputs by name)
        return type(net)(expand, *net)
    return nn.Sequential(expand, net)
