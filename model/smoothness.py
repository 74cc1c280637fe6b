"""Smoothness penalty for KAN layers: squared second differences of the spline coefficients.

A fine lookup grid (64 control points) lets every control point move on its own, so learned
curves come out jagged even where the data say nothing but "straight". The penalty

    R = mean over edges and i of (c[i+1] - 2 c[i] + c[i-1])²

is zero for straight lines (any slope, so linear parts are free) and grows with curvature
and zig-zag; for uniform B-splines and RBFs the same second differences of the coefficients
are the standard P-spline penalty (Eilers and Marx). Weighted by ``train.kan_smooth_weight``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import KANLinear


def smoothness_loss(layer: KANLinear) -> Tensor:
    """Mean squared second difference of the layer's effective coefficients along the grid."""
    coef = layer.coefficients()
    axis = 1 if layer.basis == "linear" else 2  # (in, N, out) or (out, in, M)
    n = coef.shape[axis]
    if n < 3:
        return coef.new_zeros(())
    second = (
        coef.narrow(axis, 2, n - 2) - 2 * coef.narrow(axis, 1, n - 2) + coef.narrow(axis, 0, n - 2)
    )
    return second.pow(2).mean()


def kan_smoothness(model: nn.Module) -> Tensor:
    """Sum of ``smoothness_loss`` over every KANLinear in ``model`` (0 when there is none)."""
    terms = [smoothness_loss(m) for m in model.modules() if isinstance(m, KANLinear)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


@torch.no_grad()
def roughness(model: nn.Module) -> float:
    """RMS second difference of the coefficients, averaged over the KAN layers (a report)."""
    vals = [float(smoothness_loss(m).sqrt()) for m in model.modules() if isinstance(m, KANLinear)]
    return sum(vals) / len(vals) if vals else 0.0
