"""``torch.ops.kanmoe.*`` custom ops: one opaque node per spline call for the ONNX exporter.

Signatures are the cross-team contract (ints and Python floats become ONNX attributes):
``bspline_basis(x, grid_size, spline_order, grid_lo, grid_hi)``,
``rbf_basis(x, num_centers, grid_lo, grid_hi)``,
``linear_spline_lookup(x, control_points, grid_lo, grid_hi)``.
Each has a fake (meta) kernel and an autograd formula written in differentiable torch ops,
so a model in export mode still trains and passes ``gradcheck``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .splines import (
    _lookup_cells,
    bspline_basis_grad_x,
    bspline_basis_reference,
    linear_spline_lookup_reference,
    rbf_basis_reference,
)

# --------------------------------------------------------------------------- bspline_basis


@torch.library.custom_op("kanmoe::bspline_basis", mutates_args=())
def bspline_basis(
    x: Tensor, grid_size: int, spline_order: int, grid_lo: float, grid_hi: float
) -> Tensor:
    """(..., in) -> (..., in, grid_size + spline_order) uniform B-spline bases."""
    return bspline_basis_reference(x, grid_size, spline_order, grid_lo, grid_hi).contiguous()


@bspline_basis.register_fake
def _(x: Tensor, grid_size: int, spline_order: int, grid_lo: float, grid_hi: float) -> Tensor:
    return x.new_empty(*x.shape, grid_size + spline_order)


def _bspline_setup(ctx, inputs, output) -> None:
    x, grid_size, spline_order, grid_lo, grid_hi = inputs
    ctx.save_for_backward(x)
    ctx.args = (grid_size, spline_order, grid_lo, grid_hi)


def _bspline_backward(ctx, grad: Tensor):
    (x,) = ctx.saved_tensors
    return bspline_basis_grad_x(x, grad, *ctx.args), None, None, None, None


bspline_basis.register_autograd(_bspline_backward, setup_context=_bspline_setup)

# --------------------------------------------------------------------------- rbf_basis


@torch.library.custom_op("kanmoe::rbf_basis", mutates_args=())
def rbf_basis(x: Tensor, num_centers: int, grid_lo: float, grid_hi: float) -> Tensor:
    """(..., in) -> (..., in, num_centers) Gaussian bases."""
    return rbf_basis_reference(x, num_centers, grid_lo, grid_hi).contiguous()


@rbf_basis.register_fake
def _(x: Tensor, num_centers: int, grid_lo: float, grid_hi: float) -> Tensor:
    return x.new_empty(*x.shape, num_centers)


def _rbf_setup(ctx, inputs, output) -> None:
    x, num_centers, grid_lo, grid_hi = inputs
    ctx.save_for_backward(x)
    ctx.args = (num_centers, grid_lo, grid_hi)


def _rbf_backward(ctx, grad: Tensor):
    # d/dx exp(-z^2) = -2 z / sigma * exp(-z^2), z = (x - mu) / sigma
    (x,) = ctx.saved_tensors
    num_centers, lo, hi = ctx.args
    sigma = (hi - lo) / (num_centers - 1)
    mu = torch.linspace(lo, hi, num_centers, dtype=x.dtype, device=x.device)
    z = (x.unsqueeze(-1) - mu) / sigma
    dphi = -2.0 * z / sigma * torch.exp(-(z**2))
    return (grad * dphi).sum(-1), None, None, None


rbf_basis.register_autograd(_rbf_backward, setup_context=_rbf_setup)

# --------------------------------------------------------------------------- linear_spline_lookup


@torch.library.custom_op("kanmoe::linear_spline_lookup", mutates_args=())
def linear_spline_lookup(
    x: Tensor, control_points: Tensor, grid_lo: float, grid_hi: float
) -> Tensor:
    """x (..., in), control_points (in, N, out) -> (..., out) summed linear-spline lookups."""
    return linear_spline_lookup_reference(x, control_points, grid_lo, grid_hi).contiguous()


@linear_spline_lookup.register_fake
def _(x: Tensor, control_points: Tensor, grid_lo: float, grid_hi: float) -> Tensor:
    return x.new_empty(*x.shape[:-1], control_points.shape[-1])


def _lookup_setup(ctx, inputs, output) -> None:
    x, control_points, grid_lo, grid_hi = inputs
    ctx.save_for_backward(x, control_points)
    ctx.args = (grid_lo, grid_hi)


def _lookup_backward(ctx, grad: Tensor):
    x, cp = ctx.saved_tensors
    lo, hi = ctx.args
    n_in, n_pts, n_out = cp.shape
    h = (hi - lo) / (n_pts - 1)
    x2 = x.reshape(-1, n_in)
    g2 = grad.reshape(-1, n_out)
    cell, t = _lookup_cells(x2, n_pts, lo, hi)
    p = torch.arange(n_in, device=x.device)
    slope = (cp[p, cell + 1] - cp[p, cell]) / h  # (B, in, out)
    grad_x = (slope * g2.unsqueeze(1)).sum(-1).reshape(x.shape)
    flat = (cell + p * n_pts).reshape(-1)
    w_left = (1.0 - t).reshape(-1, 1)
    w_right = t.reshape(-1, 1)
    g_rows = g2.unsqueeze(1).expand(-1, n_in, -1).reshape(-1, n_out)
    grad_cp = torch.zeros(n_in * n_pts, n_out, dtype=cp.dtype, device=cp.device)
    grad_cp = grad_cp.index_add(0, flat, g_rows * w_left).index_add(0, flat + 1, g_rows * w_right)
    return grad_x, grad_cp.reshape(cp.shape), None, None


linear_spline_lookup.register_autograd(_lookup_backward, setup_context=_lookup_setup)
