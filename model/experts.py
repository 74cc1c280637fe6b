"""Experts for :class:`kanmoe.model.moe.MoE`: ready-made ones and the helpers that copy,
re-initialise and probe any module used as an expert.

Any ``nn.Module`` can be an expert; ``RNNExpert``, ``MLPExpert`` and ``KANExpert`` cover the
paper's setups (GRU/LSTM on sequences, MLP and KAN on tables) and expose ``in_features`` /
``out_features`` so the MoE can size its gate without being told.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kanmoe.model.activations import make_activation

RNN_CELLS = ("gru", "lstm")


def first_output(out: Any) -> Tensor:
    """Experts returning a tuple (``nn.GRU``, ``nn.LSTM``) contribute their first element."""
    return out[0] if isinstance(out, tuple | list) else out


def _reset(module: nn.Module) -> bool:
    """Re-run ``module``'s own initialisation; False when it has none we know of."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        return True
    from kanmoe.model.layers import KANLinear

    if isinstance(module, KANLinear) and module.basis != "linear":
        # KANLinear keeps its init private; re-run it with the constructor's default scales.
        module._reset_parameters(
            getattr(module, "scale_noise", 0.1),
            getattr(module, "scale_base", 1.0),
            getattr(module, "scale_spline", 1.0),
        )
        return True
    if isinstance(module, KANLinear):
        positions = torch.linspace(module.grid_lo, module.grid_hi, module.num_control_points)
        with torch.no_grad():
            slopes = module._initial_slopes(module.init).to(module.control_points)
            module.control_points.copy_(slopes.t()[:, None, :] * positions[None, :, None])
        return True
    return False


def reinitialise(module: nn.Module) -> None:
    """Fresh random init of every submodule (``reset_parameters()``, KANLinear's init).

    Warns when some parameters belong to modules without a known init: those stay
    identical across experts (pass a zero-argument factory instead to avoid that).
    """
    untouched = []
    for mod_name, mod in module.named_modules():
        if not _reset(mod):
            untouched += [
                f"{mod_name}.{p}".lstrip(".") for p, _ in mod.named_parameters(recurse=False)
            ]
    if untouched:
        warnings.warn(
            f"expert parameters {untouched[:5]} have no reset_parameters(); they start "
            "identical in every expert (pass a zero-argument factory to avoid this)",
            stacklevel=4,
        )


def infer_in_features(module: nn.Module) -> int | None:
    """Input width of the first submodule that declares ``in_features`` or ``input_size``."""
    for mod in module.modules():
        for attr in ("in_features", "input_size"):
            value = getattr(mod, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def has_rnn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.RNNBase) for m in module.modules())


@torch.no_grad()
def probe_output_shape(expert: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape of ``expert`` on zeros of ``shape`` (eval mode, RNG and stats untouched)."""
    param = next((p for p in expert.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    device = param.device if param is not None else None
    modes = {m: m.training for m in expert.modules()}
    expert.eval()
    try:
        out = first_output(expert(torch.zeros(shape, dtype=dtype, device=device)))
    except Exception as exc:  # any failure means we guessed the input shape wrongly
        raise ValueError(
            f"could not run the expert on a dummy input of shape {shape}: {exc}. "
            "Pass in_features (the size of the input's last axis) and, for sequence "
            "inputs (B, T, F), seq_len."
        ) from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    return tuple(out.shape)


def build_experts(expert: nn.Module | Callable[[], nn.Module], n_experts: int) -> list[nn.Module]:
    if isinstance(expert, nn.Module):
        experts = [copy.deepcopy(expert) for _ in range(n_experts)]
        for e in experts:
            reinitialise(e)
        return experts
    if callable(expert):
        experts = [expert() for _ in range(n_experts)]
        if not all(isinstance(e, nn.Module) for e in experts):
            raise ValueError("expert factory must return an nn.Module")
        return experts
    raise ValueError(
        f"expert must be an nn.Module or a zero-argument factory, got {type(expert)!r}"
    )


class RNNExpert(nn.Module):
    """GRU or LSTM over ``(B, T, input_size)`` (batch first).

    Returns the full output sequence ``(B, T, hidden_size)`` when ``return_sequences`` is
    true (Keras ``return_sequences=True``), else the last step's output ``(B, hidden_size)``.
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        return_sequences: bool = False,
        num_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        cell = cell.lower() if isinstance(cell, str) else cell
        if cell not in RNN_CELLS:
            raise ValueError(f"cell={cell!r} is not one of {RNN_CELLS}")
        for argument, value in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{argument} must be a positive int, got {value!r}")
        rnn_cls = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn_cls(
            input_size,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.cell = cell
        self.in_features = input_size
        self.out_features = hidden_size
        self.return_sequences = return_sequences

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return out if self.return_sequences else out[:, -1]

    def extra_repr(self) -> str:
        return f"return_sequences={self.return_sequences}"


class MLPExpert(nn.Module):
    """``Linear + activation`` per hidden width, then an optional linear output layer.

    ``(..., in_features) -> (..., out_features)``; with ``out_features=None`` the output is
    the last hidden layer after its activation, so ``MLPExpert(10, hidden=(100,))`` is
    Keras ``Dense(100, activation="relu")``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (64,),
        out_features: int | None = None,
        activation: str | nn.Module = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        if any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(
                f"in_features and hidden must be positive ints, got {in_features!r}, {hidden!r}"
            )
        if out_features is None and not hidden:
            raise ValueError("give out_features or at least one hidden width")
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        if out_features is not None:
            layers.append(nn.Linear(widths[-1], out_features))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = out_features if out_features is not None else widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class KANExpert(nn.Module):
    """A :class:`kanmoe.model.layers.KAN` stack ``widths[0] -> ... -> widths[-1]``.

    ``kan_kwargs`` go to every ``KANLinear`` (``basis``, ``grid_size``, ...).
    """

    def __init__(self, widths: Sequence[int], **kan_kwargs: Any) -> None:
        super().__init__()
        from kanmoe.model.layers import KAN

        widths = list(widths)
        if len(widths) < 2 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must list at least two positive ints, got {widths!r}")
        self.kan = KAN(widths, **kan_kwargs)
        self.in_features = widths[0]
        self.out_features = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.kan(x)
