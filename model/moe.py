"""Mixture of experts over any module: ``MoE``, ``KAMoE`` and ``GatedSequential``.

``y = Σ_e a_e(x̃) · E_e(x̃)`` with ``x̃ = w ⊙ x`` (learnable, init ones, KAMoE paper eq. 1)
shared by the gate and the experts. Experts are independently initialised copies of one
module (or the results of a factory). The gate's input follows the Keras kamoe rules for
sequences ``(B, T, F)``: an expert that keeps the time axis is gated per step (weights
``(B, T, E)``); one that drops it is gated on the last step (RNN experts) or on the
flattened window. All shape decisions are made once, at construction, by running the
expert on a zero dummy input, so ``forward`` has no data-dependent Python branches and
traces/exports statically.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kanmoe.model.experts import (
    build_experts,
    first_output,
    has_rnn,
    infer_in_features,
    probe_output_shape,
)
from kanmoe.model.gates import GATE_TYPES, GATING_ACTIVATIONS, Router, build_gate

GATE_INPUTS = ("auto", "last", "flatten", "all")


class MoE(nn.Module):
    """Mixture of ``n_experts`` copies of ``expert`` combined by a learned gate.

    Args:
        expert: an ``nn.Module`` (deep-copied and re-initialised per expert) or a
            zero-argument factory returning a fresh module.
        gate: ``"grn"`` (TFT gated residual network, the reference MoE), ``"grkan"``
            (KAMoE) or ``"linear"``.
        gating_activation: ``"softmax"`` (rows sum to one) or ``"sigmoid"`` (Keras default).
        top_k: route each row to its k best experts, weights renormalised (dense compute
            plus a mask: every expert still runs, the mask zeroes the unused ones).
        noisy_gating: Gaussian noise on the logits in training (noisy top-k).
        load_balance_weight / z_loss_weight: weights of the aux losses; load balancing
            defaults to 0.01 with ``top_k`` and 0 for dense routing.
        input_transform: learnable ``x̃ = w ⊙ x`` over the last axis (init ones).
        gate_input: ``"auto"`` (Keras rules), ``"last"`` (``x[:, -1]``), ``"flatten"``
            (the whole window, needs ``seq_len``) or ``"all"`` (x as is; per-step gating).
        in_features: size of the input's last axis (inferred from the expert if omitted).
        seq_len: window length T for sequence inputs ``(B, T, F)``.
        gate_hidden: width d of the gate's pre-projection (GRN/GRKAN), default 32.
        gate_dropout: dropout inside the GRN/GRKAN block.
        gate_layer_norm: the LayerNorm over the logits of GRN/GRKAN (the reference's).
        gate_kan_kwargs: ``KANLinear`` options of the GRKAN gate (grid_size, basis...).
        kan_activations: base activations of the two GRKAN layers (paper: silu, elu).

    Shapes: ``(B, F) -> (B, O)``; ``(B, T, F) -> (B, T, O)`` or ``(B, O)``. With
    ``return_gates=True`` also the weights ``(B, E)`` or, for per-step gating, ``(B, T, E)``.
    ``aux_loss`` holds the weighted aux loss of the last training-mode forward.
    """

    def __init__(
        self,
        expert: nn.Module | Callable[[], nn.Module],
        n_experts: int = 3,
        gate: str = "grn",
        gating_activation: str = "softmax",
        top_k: int | None = None,
        noisy_gating: bool = False,
        input_transform: bool = False,
        gate_input: str = "auto",
        in_features: int | None = None,
        seq_len: int | None = None,
        gate_hidden: int | None = None,
        gate_dropout: float = 0.0,
        gate_layer_norm: bool = True,
        gate_kan_kwargs: dict[str, Any] | None = None,
        kan_activations: tuple[str, str] = ("silu", "elu"),
        load_balance_weight: float | None = None,
        z_loss_weight: float = 0.0,
        expert_names: Sequence[str] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
        if gate not in GATE_TYPES:
            raise ValueError(f"gate={gate!r} is not one of {GATE_TYPES}")
        if gating_activation not in GATING_ACTIVATIONS:
            raise ValueError(
                f"gating_activation={gating_activation!r} is not one of {GATING_ACTIVATIONS}"
            )
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts
        ):
            raise ValueError(f"top_k must be an int in [1, n_experts={n_experts}], got {top_k!r}")
        if gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input={gate_input!r} is not one of {GATE_INPUTS}")
        if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        for argument, value in (
            ("load_balance_weight", load_balance_weight),
            ("z_loss_weight", z_loss_weight),
        ):
            if value is not None and value < 0:
                raise ValueError(f"{argument} must be >= 0, got {value!r}")
        names = [f"expert_{i}" for i in range(n_experts)]
        if expert_names is not None:
            names = [str(n) for n in expert_names]
            if len(names) != n_experts or len(set(names)) != n_experts:
                raise ValueError(
                    f"expert_names must be {n_experts} unique names, got {list(expert_names)!r}"
                )

        self.experts = nn.ModuleList(build_experts(expert, n_experts))
        first = self.experts[0]
        if in_features is None:
            in_features = infer_in_features(first)
            if in_features is None:
                raise ValueError(
                    "cannot infer in_features from the expert; pass in_features= "
                    "(the size of the input's last axis)"
                )
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")

        # Keras rules, decided once from the expert's output rank on a dummy input.
        rnn_inside = has_rnn(first)
        is_sequence = seq_len is not None or rnn_inside or gate_input in ("last", "flatten")
        if gate_input == "flatten" and seq_len is None:
            raise ValueError("gate_input='flatten' needs seq_len (the window length T)")
        if is_sequence:
            out_shape = probe_output_shape(first, (2, seq_len or 2, in_features))
            keeps_time = len(out_shape) == 3
            if len(out_shape) not in (2, 3):
                raise ValueError(
                    f"expert maps (B, T, F) to rank {len(out_shape)}; expected (B, T, O) or (B, O)"
                )
        else:
            out_shape = probe_output_shape(first, (2, in_features))
            keeps_time = True
        resolved = gate_input
        if gate_input == "auto":
            resolved = "all" if keeps_time else ("last" if rnn_inside else "flatten")
        if resolved == "all" and not keeps_time:
            raise ValueError(
                "gate_input='all' cannot gate an expert that drops the time axis "
                "(weights would be per step); use 'last' or 'flatten'"
            )

        self.n_experts = n_experts
        self.in_features = in_features
        self.out_features = out_shape[-1] if len(out_shape) > 1 else 1
        self.seq_len = seq_len
        self.is_sequence = is_sequence
        self.keeps_time_axis = keeps_time
        self.gate_input = resolved
        self.gate_type = gate
        self.gating_activation = gating_activation
        self.top_k = top_k
        self.expert_names = names
        self.name = name
        gate_in = in_features * seq_len if resolved == "flatten" else in_features
        gate_kwargs: dict[str, Any] = {}
        if gate == "grkan":
            gate_kwargs = {"kan_activations": tuple(kan_activations), "kan_kwargs": gate_kan_kwargs}
        elif gate_kan_kwargs:
            raise ValueError(f"gate_kan_kwargs only applies to gate='grkan', not {gate!r}")
        if gate != "linear":
            gate_kwargs["layer_norm"] = gate_layer_norm
            if gate_layer_norm and n_experts == 2:
                warnings.warn(
                    f"gate={gate!r} with n_experts=2: the LayerNorm over two logits outputs "
                    "±1 and passes almost no gradient; use gate_layer_norm=False or 3+ experts",
                    stacklevel=2,
                )
        self.gate = build_gate(
            gate, gate_in, n_experts, gate_hidden or 32, gate_dropout, **gate_kwargs
        )
        if load_balance_weight is None:
            load_balance_weight = 0.01 if top_k is not None else 0.0
        self.router = Router(
            gate_in,
            n_experts,
            gating_activation,
            top_k,
            noisy_gating,
            load_balance_weight,
            z_loss_weight,
        )
        if input_transform:
            self.input_weight = nn.Parameter(torch.ones(in_features))
        else:
            self.register_parameter("input_weight", None)
        self.aux_loss: Tensor = torch.zeros(())

    def reset_parameters(self) -> None:
        """Reset the input transform to ones (sub-modules reset themselves)."""
        if self.input_weight is not None:
            nn.init.ones_(self.input_weight)

    def _gate_view(self, x: Tensor) -> Tensor:
        """What the gate reads: ``(B, F)``, ``(B, T, F)``, ``x[:, -1]`` or ``(B, T*F)``."""
        if self.gate_input == "all":
            return x
        if x.dim() != 3:
            raise ValueError(
                f"gate_input={self.gate_input!r} expects input (B, T, F), got {tuple(x.shape)}"
            )
        if self.gate_input == "last":
            return x[:, -1]
        return x.flatten(1)

    def forward(
        self, x: Tensor, return_gates: bool = False, return_experts: bool = False
    ) -> Tensor | tuple[Tensor, ...]:
        """``x`` (B, F) or (B, T, F) -> y, or (y, weights) with ``return_gates``.

        ``return_experts`` adds each expert's own output, ``(B, [T,] E, O)``: what an
        explanation shows next to the weights (y is their weighted sum over E).
        """
        if self.input_weight is not None:
            x = x * self.input_weight
        gate_x = self._gate_view(x)
        weights, aux = self.router(gate_x, self.gate(gate_x))
        if aux is not None:  # training only; eval/export forward mutates nothing
            self.aux_loss = aux
        outs = torch.stack([first_output(e(x)) for e in self.experts], dim=-1)  # (..., O, E)
        w = weights
        for _ in range(outs.dim() - weights.dim()):  # (B, [T,] E) -> (B, [T,] 1.., E)
            w = w.unsqueeze(-2)
        y = (outs * w).sum(dim=-1)
        if return_experts:
            return y, weights, outs.transpose(-1, -2)
        return (y, weights) if return_gates else y

    def __getstate__(self) -> dict[str, Any]:
        # aux_loss carries an autograd graph after a training forward; deepcopy/pickle of a
        # non-leaf tensor fails, so copies get the detached value.
        state = dict(super().__getstate__())
        state["aux_loss"] = state["aux_loss"].detach()
        return state

    def extra_repr(self) -> str:
        return (
            f"n_experts={self.n_experts}, gate={self.gate_type!r}, in_features="
            f"{self.in_features}, out_features={self.out_features}, gate_input="
            f"{self.gate_input!r}, input_transform={self.input_weight is not None}, "
            f"name={self.name!r}"
        )


class KAMoE(MoE):
    """The KAMoE paper's layer: ``MoE`` with the GRKAN gate and the input transform on."""

    def __init__(
        self,
        expert: nn.Module | Callable[[], nn.Module],
        n_experts: int = 3,
        gate: str = "grkan",
        input_transform: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            expert, n_experts=n_experts, gate=gate, input_transform=input_transform, **kwargs
        )


def _unique(names: Sequence[str]) -> list[str]:
    """``["moe", "moe"] -> ["moe", "moe_1"]``; never clashes with a name already taken."""
    taken: set[str] = set()
    result = []
    for base in names:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        result.append(name)
    return result


class GatedSequential(nn.Sequential):
    """``nn.Sequential`` that can also return the gate weights of its MoE children.

    ``forward(x, return_gates=True) -> (y, {name: weights})``, one entry per direct MoE
    child in model order, named after ``moe.name`` (or ``"moe"``), made unique with ``_1``,
    ``_2``... Plain tensors are passed between layers.
    """

    def gate_names(self) -> list[str]:
        return _unique([m.name or "moe" for m in self if isinstance(m, MoE)])

    def forward(  # type: ignore[override]
        self, x: Tensor, return_gates: bool = False, return_experts: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]] | tuple[Tensor, dict, dict]:
        """``return_experts`` adds ``{name: (B, [T,] E, O)}`` per-expert outputs."""
        if not (return_gates or return_experts):
            for module in self:
                x = module(x)
            return x
        names = iter(self.gate_names())
        gates: dict[str, Tensor] = {}
        experts: dict[str, Tensor] = {}
        for module in self:
            if isinstance(module, MoE):
                name = next(names)
                x, gates[name], experts[name] = module(x, return_experts=True)
            else:
                x = module(x)
        return (x, gates, experts) if return_experts else (x, gates)


def moe_layers(model: nn.Module) -> Iterator[tuple[str, MoE]]:
    """``(name, MoE)`` for each outermost MoE in ``model`` (MoEs nested inside an MoE's
    experts are skipped), named as ``GatedSequential`` names its gate outputs."""
    if isinstance(model, MoE):
        yield (model.name or "moe"), model
        return
    found: list[tuple[str, MoE]] = []
    for path, module in model.named_modules():
        if isinstance(module, MoE) and not any(path.startswith(p + ".") for p, _ in found):
            found.append((path, module))
    names = _unique([m.name or "moe" for _, m in found])
    yield from zip(names, (m for _, m in found), strict=True)


def total_aux_loss(model: nn.Module) -> Tensor:
    """Sum of ``aux_loss`` over every MoE in ``model`` (from the last training forward)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE)]
    if not losses:
        return torch.zeros(())
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total
