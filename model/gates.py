"""Gating networks and routing for mixtures of experts.

A gate maps the (transformed) input ``(..., in_features)`` to expert logits
``(..., n_experts)``; the :class:`Router` turns logits into expert weights (gating
activation, optional noisy top-k) and, in training, into the auxiliary losses that keep
sparse routing balanced. Three gates:

- :class:`LinearGate`: one ``Linear`` to the logits (classical MoE gate).
- :class:`GRNGate`: pre-projection ``Linear(in, d) + ReLU`` then the TFT gated residual
  block (``Linear + ELU``, ``Linear``, dropout, GLU, projected skip, LayerNorm).
- :class:`GRKANGate`: the same block with two ``KANLinear`` layers (the KAMoE paper,
  arXiv 2409.15161). Paper text: SiLU then ELU base activations (our default); the Keras
  reference code (kamoe 0.1.8) uses ELU then ReLU: pass ``kan_activations=("elu", "relu")``
  to reproduce it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kanmoe.model.activations import make_activation

GATE_TYPES = ("linear", "grn", "grkan")
GATING_ACTIVATIONS = ("softmax", "sigmoid")


def apply_gating_activation(logits: Tensor, activation: str) -> Tensor:
    """softmax (rows sum to one) or sigmoid (independent weights, the Keras default)."""
    if activation == "softmax":
        return torch.softmax(logits, dim=-1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"gating_activation={activation!r} is not one of {GATING_ACTIVATIONS}")


class LinearGate(nn.Module):
    """One linear map to the expert logits: ``(..., in) -> (..., n_experts)``."""

    def __init__(self, in_features: int, n_experts: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, n_experts)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class GatedResidualGate(nn.Module):
    """Pre-projection + gated residual block; ``layer1``/``layer2`` map ``d -> d``.

    ``h = ReLU(Linear(in, d)(x))``; ``skip = Linear(d, E)(h)``;
    ``u = dropout(layer2(layer1(h)))``; ``g = Linear(d, E)(u) * sigmoid(Linear(d, E)(u))``;
    logits ``= LayerNorm(skip + g)``. Shapes ``(..., in) -> (..., E)``.

    The LayerNorm over the E logits (as in the reference) fixes their mean and spread: with
    E = 2 it outputs ±1 (a step function with ~zero gradient), so ``layer_norm=False``
    replaces it by the identity for such cases.
    """

    def __init__(
        self,
        in_features: int,
        n_experts: int,
        hidden: int,
        layer1: nn.Module,
        layer2: nn.Module,
        dropout: float = 0.0,
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        self.pre = nn.Linear(in_features, hidden)
        self.skip = nn.Linear(hidden, n_experts)
        self.layer1 = layer1
        self.layer2 = layer2
        self.dropout = nn.Dropout(dropout)
        self.glu_value = nn.Linear(hidden, n_experts)
        self.glu_gate = nn.Linear(hidden, n_experts)
        self.norm = nn.LayerNorm(n_experts) if layer_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.pre(x))
        u = self.dropout(self.layer2(self.layer1(h)))
        g = self.glu_value(u) * torch.sigmoid(self.glu_gate(u))
        return self.norm(self.skip(h) + g)


class GRNGate(GatedResidualGate):
    """TFT-style gated residual network gate (``Linear + ELU``, then ``Linear``)."""

    def __init__(
        self,
        in_features: int,
        n_experts: int,
        hidden: int = 32,
        dropout: float = 0.0,
        activation: str | nn.Module = "elu",
        layer_norm: bool = True,
    ) -> None:
        layer1 = nn.Sequential(nn.Linear(hidden, hidden), make_activation(activation))
        layer2 = nn.Linear(hidden, hidden)
        super().__init__(in_features, n_experts, hidden, layer1, layer2, dropout, layer_norm)


class GRKANGate(GatedResidualGate):
    """Gated residual KAN gate of KAMoE: the GRN block with two ``KANLinear`` layers.

    ``kan_activations`` are the base activations of the two KAN layers (paper: SiLU, ELU;
    Keras reference code: ELU, ReLU). ``kan_kwargs`` go to both ``KANLinear`` layers
    (``basis``, ``grid_size``, ...).
    """

    def __init__(
        self,
        in_features: int,
        n_experts: int,
        hidden: int = 32,
        dropout: float = 0.0,
        kan_activations: tuple[str | nn.Module, str | nn.Module] = ("silu", "elu"),
        kan_kwargs: Mapping[str, Any] | None = None,
        layer_norm: bool = True,
    ) -> None:
        from kanmoe.model.layers import KANLinear

        if len(kan_activations) != 2:
            raise ValueError(f"kan_activations must name two activations, got {kan_activations!r}")
        kw = dict(kan_kwargs or {})
        if "base_activation" in kw:
            raise ValueError("kan_kwargs must not set base_activation; use kan_activations")
        for i, act in enumerate(kan_activations):
            make_activation(act, argument=f"kan_activations[{i}]")  # validate the name early
        layer1 = KANLinear(hidden, hidden, base_activation=kan_activations[0], **kw)
        layer2 = KANLinear(hidden, hidden, base_activation=kan_activations[1], **kw)
        super().__init__(in_features, n_experts, hidden, layer1, layer2, dropout, layer_norm)


def build_gate(
    gate: str,
    in_features: int,
    n_experts: int,
    hidden: int = 32,
    dropout: float = 0.0,
    **gate_kwargs: Any,
) -> nn.Module:
    """A gate module by name: ``"linear"``, ``"grn"`` or ``"grkan"``."""
    if gate == "linear":
        if gate_kwargs:
            raise ValueError(f"gate='linear' takes no gate_kwargs, got {sorted(gate_kwargs)}")
        return LinearGate(in_features, n_experts)
    if gate == "grn":
        return GRNGate(in_features, n_experts, hidden, dropout, **gate_kwargs)
    if gate == "grkan":
        return GRKANGate(in_features, n_experts, hidden, dropout, **gate_kwargs)
    raise ValueError(f"gate={gate!r} is not one of {GATE_TYPES}")


class Router(nn.Module):
    """Logits -> expert weights, plus the training-time auxiliary losses.

    - ``gating_activation``: softmax (rows sum to one) or sigmoid.
    - ``top_k``: keep the k largest weights per row and renormalise them to sum to one
      (exactly k non-zero entries per row); ``None`` routes densely.
    - ``noisy_gating``: in training only, add ``N(0, 1) * softplus(x W_noise)`` to the
      logits (Shazeer et al. 2017); ``W_noise`` starts at zero (noise std ~0.69).
    - aux loss (training only) = ``load_balance_weight * E * sum_e f_e P_e`` (Switch /
      ST-MoE; ``f_e`` share of top-k assignments, argmax for dense, ``P_e`` mean softmax
      router probability) ``+ z_loss_weight * mean(logsumexp(logits)^2)`` (ST-MoE).
    """

    def __init__(
        self,
        gate_in_features: int,
        n_experts: int,
        gating_activation: str = "softmax",
        top_k: int | None = None,
        noisy_gating: bool = False,
        load_balance_weight: float = 0.0,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if gating_activation not in GATING_ACTIVATIONS:
            raise ValueError(
                f"gating_activation={gating_activation!r} is not one of {GATING_ACTIVATIONS}"
            )
        self.n_experts = n_experts
        self.gating_activation = gating_activation
        self.top_k = top_k
        self.noisy_gating = noisy_gating
        self.load_balance_weight = float(load_balance_weight)
        self.z_loss_weight = float(z_loss_weight)
        if noisy_gating:
            self.noise_weight = nn.Parameter(torch.zeros(n_experts, gate_in_features))
        else:
            self.register_parameter("noise_weight", None)

    def reset_parameters(self) -> None:
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def forward(self, gate_x: Tensor, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """``gate_x`` (..., G), ``logits`` (..., E) -> weights (..., E), aux (scalar or None).

        The aux loss is computed only in training so eval/export graphs stay minimal.
        """
        clean_logits = logits
        if self.training and self.noise_weight is not None:
            noise_std = F.softplus(F.linear(gate_x, self.noise_weight))
            logits = logits + torch.randn_like(logits) * noise_std
        weights = apply_gating_activation(logits, self.gating_activation)
        mask = None
        if self.top_k is not None:
            top_idx = weights.topk(self.top_k, dim=-1).indices
            mask = torch.zeros_like(weights).scatter(-1, top_idx, 1.0)
            kept = weights * mask
            weights = kept / kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
        if not self.training:
            return weights, None
        return weights, self.aux_loss(clean_logits, mask)

    def aux_loss(self, logits: Tensor, mask: Tensor | None) -> Tensor:
        """Weighted load-balancing + z-loss over all tokens; a 0-dim differentiable tensor."""
        aux = logits.new_zeros(())
        flat = logits.reshape(-1, self.n_experts)
        if self.load_balance_weight > 0:
            probs = torch.softmax(flat, dim=-1)
            if mask is None:  # dense routing: count each token for its argmax expert
                assign = F.one_hot(flat.argmax(dim=-1), self.n_experts).to(flat.dtype)
                k = 1
            else:
                assign = mask.reshape(-1, self.n_experts).detach()
                k = self.top_k or 1
            share = assign.mean(dim=0) / k
            balance = self.n_experts * (share * probs.mean(dim=0)).sum()
            aux = aux + self.load_balance_weight * balance
        if self.z_loss_weight > 0:
            z = torch.logsumexp(flat, dim=-1).square().mean()
            aux = aux + self.z_loss_weight * z
        return aux

    def extra_repr(self) -> str:
        return (
            f"gating_activation={self.gating_activation!r}, top_k={self.top_k}, "
            f"noisy_gating={self.noisy_gating}, load_balance_weight={self.load_balance_weight}, "
            f"z_loss_weight={self.z_loss_weight}"
        )
