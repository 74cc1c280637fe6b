"""KAN layers: y_q = sum_p [w_base[q,p] b(x_p) + sum_i c[q,p,i] B_i(x_p)] with three bases.

``bspline`` (efficient-kan style, uniform grid), ``rbf`` (per-input Gaussians) and ``linear``
(KANditioned's C0 lookup spline; it has no base branch because a linear spline with linear
extrapolation already contains the linear part). Every basis supports ``update_grid``,
``regularization_loss``, ``lock``/``unlock``, ``prune`` and ``plot``.

Per-input grids: the basis always runs on the constructor's canonical range; after
``update_grid`` each input is first mapped affinely (buffers ``grid_scale``, ``grid_shift``)
onto that range with ordinary ops, so the uniform fast formula and the ONNX op with scalar
attributes still apply.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import custom_ops  # noqa: F401  (registers torch.ops.kanmoe.* for export_mode)
from .activations import make_activation
from .kan_edit import KANEditMixin, _ridge_fit
from .kernels import ScaleRowsFn
from .splines import (
    bspline_basis,
    bspline_local_layer,
    linear_spline_lookup,
    rbf_basis,
    use_local_bspline,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from sympy import Expr

    from .symbolic import SymbolicFit
    from .symbolic_formula import EdgeReport

BASES = ("bspline", "rbf", "linear")
INITS = ("random_normal", "identity", "zero")
_REG_ELEMENTS = 1 << 22  # rows kept for regularization_loss: rows * out * in <= this (8..256)
# Frozen copies read only for locked edges: in a state dict only while an edge is locked (they
# would double a saved model otherwise); files without them load as "nothing locked".
LOCK_STATE = ("locked_coef", "locked_base")


def _positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _refresh_flags(module: KANLinear, _incompatible_keys) -> None:
    """load_state_dict post-hook (a module-level function, so layers stay picklable)."""
    module._flags_from_buffers()


class KANLinear(KANEditMixin, nn.Module):
    """Kolmogorov-Arnold layer, (..., in_features) -> (..., out_features).

    Parameters: ``base_weight`` (out, in) (not for ``linear``); ``spline_weight`` (out, in, M)
    with M = grid_size + spline_order (bspline) or grid_size + 1 (rbf), times the optional
    ``spline_scaler`` (out, in); for ``linear``, ``control_points`` (in, N, out) at N uniform
    positions over [-spline_width/2, spline_width/2]. A B-spline layer on the local path
    (``use_local_bspline``) stores ``spline_weight`` as (in, M, out) in memory (a permuted
    view; its shape, state dict and saved files are the usual (out, in, M)).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        basis: str = "bspline",
        grid_size: int = 5,
        spline_order: int = 3,
        grid_range: Sequence[float] = (-1.0, 1.0),
        base_activation: str | nn.Module = "silu",
        scale_noise: float = 0.1,
        scale_base: float = 1.0,
        scale_spline: float = 1.0,
        enable_standalone_scale_spline: bool = True,
        num_control_points: int = 32,
        spline_width: float = 4.0,
        init: str = "random_normal",
    ) -> None:
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
        self.basis = basis
        self.grid_size = _positive_int("grid_size", grid_size)
        self.spline_order = _positive_int("spline_order", spline_order, minimum=0)
        if len(grid_range) != 2 or not float(grid_range[0]) < float(grid_range[1]):
            raise ValueError(f"grid_range must be (low, high) with low < high, got {grid_range!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if init == "identity" and in_features != out_features:
            raise ValueError(
                f"init='identity' requires in_features == out_features, got {in_features} != "
                f"{out_features}"
            )
        self.num_control_points = _positive_int("num_control_points", num_control_points, 2)
        if not spline_width > 0:
            raise ValueError(f"spline_width must be > 0, got {spline_width!r}")
        if basis == "linear":
            self.grid_lo, self.grid_hi = -spline_width / 2.0, spline_width / 2.0
        else:
            self.grid_lo, self.grid_hi = float(grid_range[0]), float(grid_range[1])
        self.spline_width = float(spline_width)
        self.init = init
        self.enable_standalone_scale_spline = enable_standalone_scale_spline and basis != "linear"

        n_in, n_out = in_features, out_features
        self.register_buffer("grid_scale", torch.ones(n_in))
        self.register_buffer("grid_shift", torch.zeros(n_in))
        self.register_buffer("edge_mask", torch.ones(n_out, n_in))
        self.register_buffer("lock_mask", torch.zeros(n_out, n_in, dtype=torch.bool))
        self._last_x: Tensor | None = None

        if basis == "linear":
            self.base_activation = None
            pos = torch.linspace(self.grid_lo, self.grid_hi, num_control_points)
            slope = self._initial_slopes(init)
            cp = (slope.t()[:, None, :] * pos[None, :, None]).contiguous()
            self.control_points = nn.Parameter(cp)
            self.register_buffer("locked_coef", torch.zeros_like(self.control_points))
        else:
            self.base_activation = make_activation(base_activation, "base_activation")
            m = self.num_bases
            self.base_weight = nn.Parameter(torch.empty(n_out, n_in))
            if basis == "bspline" and use_local_bspline(self.grid_size, self.spline_order):
                # stored (in, M, out): the local path reads (and writes the gradient of) these
                # rows in place, with no transpose copy per step; the state dict is unchanged
                self.spline_weight = nn.Parameter(torch.empty(n_in, m, n_out).permute(2, 0, 1))
            else:
                self.spline_weight = nn.Parameter(torch.empty(n_out, n_in, m))
            if self.enable_standalone_scale_spline:
                self.spline_scaler = nn.Parameter(torch.empty(n_out, n_in))
            self.register_buffer("locked_base", torch.zeros(n_out, n_in))
            self.register_buffer("locked_coef", torch.zeros(n_out, n_in, m))
            self._reset_parameters(scale_noise, scale_base, scale_spline)
        self._flags_from_buffers()
        self.register_load_state_dict_post_hook(_refresh_flags)

    # ------------------------------------------------------------------ construction helpers

    @property
    def num_bases(self) -> int:
        """M: bases per edge (G+K for bspline, G+1 for rbf, N control points for linear)."""
        if self.basis == "bspline":
            return self.grid_size + self.spline_order
        if self.basis == "rbf":
            return self.grid_size + 1
        return self.num_control_points

    def _initial_slopes(self, init: str) -> Tensor:
        """(out, in) slopes of the initial straight lines of the linear basis."""
        if init == "identity":
            return torch.eye(self.out_features, self.in_features)
        if init == "zero":
            return torch.zeros(self.out_features, self.in_features)
        slope = torch.randn(self.out_features, self.in_features)
        return slope / slope.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def _reset_parameters(self, scale_noise: float, scale_base: float, scale_spline: float) -> None:
        """efficient-kan init: kaiming base weights, spline fitted to small noise on the grid."""
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5) * scale_base)
        g = self.grid_size
        pts = torch.linspace(self.grid_lo, self.grid_hi, g + 1)[:, None].expand(
            -1, self.in_features
        )
        noise = (torch.rand(g + 1, self.in_features, self.out_features) - 0.5) * scale_noise / g
        coef = _ridge_fit(self._dense_basis(pts).transpose(0, 1), noise.transpose(0, 1))
        factor = 1.0 if self.enable_standalone_scale_spline else scale_spline
        self.spline_weight.copy_(coef.permute(2, 0, 1) * factor)
        if self.enable_standalone_scale_spline:
            nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5) * scale_spline)
        if self.init in ("identity", "zero"):
            # Base branch off, spline = x on the diagonal edges (exact inside the grid for
            # order >= 1, since B-splines reproduce straight lines), 0 elsewhere.
            self.base_weight.zero_()
            self.spline_weight.zero_()
            if self.enable_standalone_scale_spline:
                self.spline_scaler.fill_(1.0)
        if self.init == "identity":
            pts = torch.linspace(self.grid_lo, self.grid_hi, 4 * (g + self.spline_order) + 1)
            line = _ridge_fit(self._dense_basis(pts[:, None]).transpose(0, 1), pts[None, :, None])
            idx = torch.arange(self.in_features)
            self.spline_weight[idx, idx] = line[0, :, 0]

    def _flags_from_buffers(self) -> None:
        """Python flags that let the forward skip mask ops when nothing is locked or pruned."""
        self._any_locked = bool(self.lock_mask.any())
        self._grid_identity = bool((self.grid_scale == 1).all() and (self.grid_shift == 0).all())
        self._any_pruned = bool((self.edge_mask != 1).any())

    # ------------------------------------------------------------------ saving

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not bool(self.lock_mask.any()):
            for name in LOCK_STATE:
                destination.pop(prefix + name, None)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        absent = [n for n in LOCK_STATE if hasattr(self, n) and prefix + n not in state_dict]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        mask = state_dict.get(prefix + "lock_mask")
        if not absent or mask is None or bool(mask.any()):
            return  # a locked layer's buffers stay reported missing
        for name in absent:
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
            getattr(self, name).zero_()

    # ------------------------------------------------------------------ coefficients

    def coefficients(self) -> Tensor:
        """Effective per-edge coefficients (scaler, locks, prune mask applied).

        (out, in, M) for bspline/rbf, (in, N, out) for linear (the lookup's layout).
        """
        if self.basis == "linear":
            coef = self.control_points
            if self._any_locked:
                coef = torch.where(self.lock_mask.t()[:, None, :], self.locked_coef, coef)
            if self._any_pruned:
                coef = coef * self.edge_mask.t()[:, None, :]
            return coef
        coef = self.spline_weight
        if self.enable_standalone_scale_spline:
            rows = coef.permute(1, 2, 0)
            if rows.is_contiguous():  # stored (in, M, out): scale the rows (a logical (out, in,
                # M) op and its gradient's sum over M run ~10x slower on this layout)
                coef = ScaleRowsFn.apply(rows, self.spline_scaler.t()).permute(2, 0, 1)
            else:
                coef = coef * self.spline_scaler.unsqueeze(-1)
        if self._any_locked:
            coef = torch.where(self.lock_mask.unsqueeze(-1), self.locked_coef, coef)
        if self._any_pruned:
            coef = coef * self.edge_mask.unsqueeze(-1)
        return coef

    def base_weights(self) -> Tensor | None:
        """Effective (out, in) base-branch weights, None for the linear basis."""
        if self.basis == "linear":
            return None
        w = self.base_weight
        if self._any_locked:
            w = torch.where(self.lock_mask, self.locked_base, w)
        if self._any_pruned:
            w = w * self.edge_mask
        return w

    def _coef_oim(self) -> Tensor:
        coef = self.coefficients()
        return coef.permute(2, 0, 1) if self.basis == "linear" else coef

    # ------------------------------------------------------------------ evaluation

    def _normalise(self, x2: Tensor) -> Tensor:
        """Per-input affine map onto the canonical grid (skipped until update_grid moves it)."""
        if self._grid_identity:
            return x2
        return x2 * self.grid_scale + self.grid_shift

    def _dense_basis(self, xn: Tensor) -> Tensor:
        """(S, in) normalised inputs -> (S, in, M) bases, so edge(x) = bases @ coef."""
        if self.basis == "bspline":
            return bspline_basis(xn, self.grid_size, self.spline_order, self.grid_lo, self.grid_hi)
        if self.basis == "rbf":
            return rbf_basis(xn, self.grid_size + 1, self.grid_lo, self.grid_hi)
        n = self.num_control_points
        h = (self.grid_hi - self.grid_lo) / (n - 1)
        u = (xn - self.grid_lo) / h
        cell = torch.floor(u).clamp(0, n - 2)
        t = u - cell
        out = xn.new_zeros(*xn.shape, n)
        idx = cell.long().unsqueeze(-1)
        return out.scatter_add(-1, idx, (1 - t).unsqueeze(-1)).scatter_add(
            -1, idx + 1, t.unsqueeze(-1)
        )

    def _check_input(self, x: Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have last dimension in_features={self.in_features}, got shape "
                f"{tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features)."""
        self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.training and torch.is_grad_enabled():
            rows = max(8, min(256, _REG_ELEMENTS // (self.in_features * self.out_features)))
            self._last_x = x2[:rows].detach().clone()  # not a view: frees the batch
        xn = self._normalise(x2)
        if self.basis == "linear":
            y = linear_spline_lookup(xn, self.coefficients(), self.grid_lo, self.grid_hi)
        elif self.basis == "bspline" and use_local_bspline(
            self.grid_size, self.spline_order, torch.is_grad_enabled()
        ):
            grid = (self.grid_size, self.spline_order, self.grid_lo, self.grid_hi)
            y = bspline_local_layer(xn, self.coefficients(), *grid)
            y = F.linear(self.base_activation(x2), self.base_weights()) + y
        else:
            bases = self._dense_basis(xn)
            coef = self.coefficients()
            y = F.linear(self.base_activation(x2), self.base_weights())
            y = y + F.linear(bases.reshape(x2.shape[0], -1), coef.reshape(self.out_features, -1))
        return y.reshape(*lead, self.out_features)

    def edge_activations(self, x: Tensor) -> Tensor:
        """phi_{q,p}(x_p) for every edge: (S, in) -> (S, out, in). Memory S*in*out."""
        self._check_input(x)
        x2 = x.reshape(-1, self.in_features)
        acts = torch.einsum(
            "sim,oim->soi", self._dense_basis(self._normalise(x2)), self._coef_oim()
        )
        if self.basis != "linear":
            acts = acts + self.base_activation(x2).unsqueeze(1) * self.base_weights()
        return acts

    def input_domain(self, n_points: int = 200, widen: float = 0.1) -> Tensor:
        """(n_points, in) raw input values spanning each input's grid, widened by ``widen``."""
        lo, hi = self.grid_lo, self.grid_hi
        pad = widen * (hi - lo) / 2
        xn = torch.linspace(lo - pad, hi + pad, n_points, device=self.grid_scale.device)
        xn = xn.to(self.grid_scale.dtype)[:, None]
        return (xn - self.grid_shift) / self.grid_scale

    # ------------------------------------------------------------------ plotting

    def plot(self, path: str | os.PathLike[str] | None = None, **kwargs) -> Figure:
        """Figure of every learned edge function (in x out grid); saved as PNG when ``path``."""
        from .kan_plot import plot_layer

        return plot_layer(self, path, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, basis={self.basis!r}"

    # ------------------------------------------------------------------ symbolic (symbolic.py)

    def suggest_symbolic(
        self, in_idx: int, out_idx: int, library=None, top: int = 5, **kwargs
    ) -> list[SymbolicFit]:
        """Best ``a·f(b·x + c) + d`` forms for edge in_idx -> out_idx, ranked (see symbolic.py)."""
        from .symbolic_formula import suggest_symbolic

        return suggest_symbolic(self, in_idx, out_idx, library, top, **kwargs)

    def auto_symbolic(self, r2_threshold: float = 0.99, library=None, **kwargs) -> list[EdgeReport]:
        """Lock every edge whose best form reaches ``r2_threshold``; reports all edges."""
        from .symbolic_formula import auto_symbolic_layer

        return auto_symbolic_layer(self, r2_threshold, library, **kwargs)


def lock_state(model: nn.Module) -> dict[str, Tensor]:
    """Every KANLinear's lock buffers by state-dict key, whether a state dict holds them or not.

    For loaders that check a file's keys against ``model.state_dict()`` (which has them only for
    layers with a locked edge) while files from before this rule have them always.
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, KANLinear):
            for buf in LOCK_STATE:
                if hasattr(module, buf):
                    out[f"{name}.{buf}" if name else buf] = getattr(module, buf)
    return out


class KAN(nn.Module):
    """Stack of KANLinear layers: widths [d0, d1, ..., dL] -> L layers."""

    def __init__(self, widths: Sequence[int] = (8, 16, 1), **layer_kwargs) -> None:
        super().__init__()
        widths = list(widths)
        if len(widths) < 2:
            raise ValueError(f"widths needs at least 2 entries (in, out), got {widths!r}")
        self.widths = widths
        self.layers = nn.ModuleList(
            KANLinear(a, b, **layer_kwargs) for a, b in itertools.pairwise(widths)
        )

    def forward(self, x: Tensor) -> Tensor:
        """(..., widths[0]) -> (..., widths[-1])."""
        for layer in self.layers:
            x = layer(x)
        return x

    @torch.no_grad()
    def update_grid(self, x: Tensor, margin: float = 0.01) -> None:
        """Update each layer's grid on the activations that reach it."""
        for layer in self.layers:
            layer.update_grid(x, margin)
            x = layer(x)

    def regularization_loss(self, l1: float = 1.0, entropy: float = 1.0) -> Tensor:
        """Sum of the layers' penalties."""
        return sum(layer.regularization_loss(l1, entropy) for layer in self.layers)

    def plot(self, path: str | os.PathLike[str] | None = None, **kwargs) -> list[Figure]:
        """One figure per layer; with ``path`` (a directory) saved as layer_<i>.png."""
        figs = []
        for i, layer in enumerate(self.layers):
            target = None if path is None else os.path.join(path, f"layer_{i}.png")
            figs.append(layer.plot(target, **kwargs))
        return figs

    # ------------------------------------------------------------------ symbolic (symbolic.py)

    def auto_symbolic(self, r2_threshold: float = 0.99, library=None, **kwargs) -> list[EdgeReport]:
        """Lock every edge whose best form reaches ``r2_threshold`` (``x``: fit on data)."""
        from .symbolic_formula import auto_symbolic_kan

        return auto_symbolic_kan(self, r2_threshold, library, **kwargs)

    def symbolic_formula(
        self, var_names: Sequence[str] | None = None, simplify: bool = True, digits: int = 4
    ) -> list[Expr]:
        """Sympy expression of each output once every live edge is symbolic (auto_symbolic)."""
        from .symbolic_formula import symbolic_formula

        return symbolic_formula(self, var_names, simplify, digits)
