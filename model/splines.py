"""Pure spline basis functions over the last axis, with fast training paths and an export switch.

Every function maps ``x`` of shape ``(..., in)`` to bases of shape ``(..., in, M)`` (or, for
the linear lookup, straight to ``(..., out)``). Outside :func:`export_mode` they run fast
pure-torch / ``autograd.Function`` code; inside it they call the ``torch.ops.kanmoe.*`` custom
ops (``model/custom_ops.py``) so the ONNX exporter sees one node per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import kernels

_EXPORT_DEPTH = 0


@contextlib.contextmanager
def export_mode() -> Iterator[None]:
    """Route the basis functions through the ``kanmoe::*`` custom ops (one ONNX node each)."""
    global _EXPORT_DEPTH
    from . import custom_ops  # noqa: F401  (registers torch.ops.kanmoe.*)

    _EXPORT_DEPTH += 1
    try:
        yield
    finally:
        _EXPORT_DEPTH -= 1


def is_exporting() -> bool:
    """True inside :func:`export_mode`."""
    return _EXPORT_DEPTH > 0


# --------------------------------------------------------------------------- B-splines


@lru_cache(maxsize=16)
def _cardinal_pieces(order: int) -> tuple[tuple[float, ...], ...]:
    """Power-basis coefficients of the uniform B-spline pieces, shape (order+1 powers, order+1).

    For u in knot cell i with t = u - i, the order+1 non-zero bases are j = i - order + s
    (s = 0..order) and B_j(u) = sum_d t**d * coef[d][s]. Built from the Cox–de Boor recursion
    of the cardinal B-spline N_k(s) = (s N_{k-1}(s) + (k+1-s) N_{k-1}(s-1)) / k, piece by piece.
    """
    pieces = [np.polynomial.Polynomial([1.0])]  # pieces[r]: N_k on [r, r+1) in local t
    t = np.polynomial.Polynomial([0.0, 1.0])
    for k in range(1, order + 1):
        new = []
        for r in range(k + 1):
            p = np.polynomial.Polynomial([0.0])
            if r < k:
                p = p + (t + r) * pieces[r]
            if r >= 1:
                p = p + (k + 1 - t - r) * pieces[r - 1]
            new.append(p / k)
        pieces = new
    coef = np.zeros((order + 1, order + 1))
    for s in range(order + 1):
        c = pieces[order - s].coef
        coef[: len(c), s] = c
    return tuple(tuple(float(v) for v in row) for row in coef)


# Precomputed so torch.compile sees plain constants instead of tracing numpy.
_PIECES = tuple(_cardinal_pieces(k) for k in range(9))


def _horner(t: Tensor, coef: Tensor) -> Tensor:
    """sum_d t**d * coef[d] for every column at once: t (...,), coef (D, C) -> (..., C)."""
    te = t.unsqueeze(-1)
    if coef.shape[0] == 1:
        return coef[0].expand(*t.shape, coef.shape[1]).clone()
    acc = torch.addcmul(coef[-2], te, coef[-1])
    for d in range(coef.shape[0] - 3, -1, -1):
        acc = torch.addcmul(coef[d], acc, te)
    return acc


_TABLES: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _bspline_tables(g: int, k: int, h: float, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Piece coefficients, derivative coefficients / h, per-cell validity and column tables.

    Table row r <-> knot cell r - 1 (cells -1 .. G+2K+1). Cached per (g, k, h, dtype, device)
    in eager mode (saves ~10 tiny ops per call); built inline while anything traces.
    """
    dtype, device = x.dtype, x.device
    key = (g, k, h, dtype, device)
    # only for plain eager tensors: tracers (dynamo, fake/functional tensors, dispatch modes)
    # must build their own tables, never see cached real ones
    compiling = (
        torch.compiler.is_compiling()
        or type(x) is not torch.Tensor
        or _get_current_dispatch_mode() is not None
    )
    if not compiling and key in _TABLES:
        return _TABLES[key]
    pieces = _PIECES[k] if k < len(_PIECES) else _cardinal_pieces(k)
    coef = torch.tensor(pieces, dtype=dtype, device=device)
    powers = torch.arange(1, k + 1, dtype=dtype, device=device)[:, None]
    dcoef = coef[1:] * powers / h
    cols = torch.arange(-1, g + 2 * k + 2, device=device)[:, None] - k
    cols = cols + torch.arange(k + 1, device=device)
    valid = ((cols >= 0) & (cols < g + k)).to(dtype)
    tables = (coef, dcoef, valid, cols.clamp(0, g + k - 1))
    if not compiling:
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = tables
    return tables


def _local_bspline(
    x: Tensor,
    grid_size: int,
    spline_order: int,
    grid_lo: float,
    grid_hi: float,
    value: bool = True,
    derivative: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """The K+1 non-zero bases and/or their x-derivatives, and their column indices (K >= 1).

    Returns ``vals``, ``dvals`` (..., in, K+1) (zero where the column does not exist, None
    when not asked for) and ``cols`` (..., in, K+1) int64 indices into the G+K bases (clamped
    to a valid column). Per-cell tables turn the edge handling into two small gathers.
    """
    g, k = grid_size, spline_order
    h = (grid_hi - grid_lo) / g
    n_cells = g + 2 * k
    coef, dcoef, valid, col_table = _bspline_tables(g, k, h, x)
    u = torch.clamp(x * (1.0 / h) + (k - grid_lo / h), -1.0, n_cells + 1.0)
    cell = torch.floor(u)
    t = u - cell
    idx = (cell + 1).long()
    mask = F.embedding(idx, valid)
    vals = _horner(t, coef) * mask if value else None
    dvals = _horner(t, dcoef) * mask if derivative else None
    return vals, dvals, F.embedding(idx, col_table)


def _bspline_rows(
    x: Tensor, grid_size: int, spline_order: int, grid_lo: float, grid_hi: float, derivative: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The local layer's K+1 non-zero bases, their x-derivatives, and their first column.

    ``vals``/``dvals`` (..., in, K+1), ``first`` (..., in) int64 in [0, G): bases s = 0..K of
    x multiply columns first + s of the G+K coefficients. Inside the grid the pieces are one
    small matmul of the powers [1, t, .., t^K] (mask folded in) with the piece table: the
    same polynomials as ``_local_bspline`` without its (..., K+1)-broadcast ops (~10x
    faster). Within K cells of either end some pieces fall off the coefficients; those few
    pairs are redone from the dense basis, shifted so that ``first`` stays in range.
    """
    g, k = grid_size, spline_order
    h = (grid_hi - grid_lo) / g
    n_cells = g + 2 * k
    coef, dcoef, _, _ = _bspline_tables(g, k, h, x)  # (K+1, K+1) and (K, K+1)
    u = torch.clamp(x * (1.0 / h) + (k - grid_lo / h), -1.0, n_cells + 1.0)
    cell = torch.floor(u)
    inside = (cell >= 0) & (cell < n_cells)
    edge = torch.nonzero((inside & ((cell < k) | (cell >= g + k))).reshape(-1))[:, 0]
    mask = inside.to(x.dtype)
    t = u.sub_(cell).reshape(-1)
    powers = x.new_empty(t.numel(), k + 1)  # off-grid rows are all 0
    powers[:, 0] = mask.reshape(-1)
    torch.mul(t, powers[:, 0], out=powers[:, 1])
    for d in range(2, k + 1):
        torch.mul(powers[:, d - 1], t, out=powers[:, d])
    vals = torch.mm(powers, coef)
    dvals = torch.mm(powers[:, :k], dcoef) if derivative else None
    first = cell.sub_(k).long().clamp_(0, g - 1)  # long first: a NaN x still indexes in range
    if edge.numel():  # x within K cells past the grid's range: rare
        flat = first.reshape(-1)[edge]
        _edge_pieces(x.reshape(-1)[edge], flat, edge, vals, dvals, g, k, grid_lo, grid_hi)
    shape = (*x.shape, k + 1)
    return vals.view(shape), None if dvals is None else dvals.view(shape), first


def _edge_pieces(
    x: Tensor,
    first: Tensor,
    at: Tensor,
    vals: Tensor,
    dvals: Tensor | None,
    grid_size: int,
    k: int,
    grid_lo: float,
    grid_hi: float,
) -> None:
    """Overwrite rows ``at`` of vals/dvals with the bases of columns first .. first + K."""
    m = grid_size + k
    cols = first[:, None] + torch.arange(k + 1, device=x.device)
    v, dv, c = _local_bspline(x, grid_size, k, grid_lo, grid_hi, derivative=dvals is not None)
    assert v is not None
    vals[at] = x.new_zeros(x.numel(), m).scatter_add_(1, c, v).gather(1, cols)
    if dvals is not None and dv is not None:
        dvals[at] = x.new_zeros(x.numel(), m).scatter_add_(1, c, dv).gather(1, cols)


def _bspline_order0(x: Tensor, grid_size: int, grid_lo: float, grid_hi: float) -> Tensor:
    """Order-0 bases by exact knot comparison (the indicator is discontinuous at knots)."""
    h = (grid_hi - grid_lo) / grid_size
    knots = grid_lo + torch.arange(grid_size + 1, dtype=x.dtype, device=x.device) * h
    xe = x.unsqueeze(-1)
    return ((xe >= knots[:-1]) & (xe < knots[1:])).to(x.dtype)


def bspline_basis_reference(
    x: Tensor, grid_size: int, spline_order: int, grid_lo: float = -1.0, grid_hi: float = 1.0
) -> Tensor:
    """Dense uniform B-spline bases, (..., in) -> (..., in, G+K), by the plain torch ops.

    Differentiable through ordinary autograd; used by the custom op and as the slow path.
    """
    if spline_order == 0:
        return _bspline_order0(x, grid_size, grid_lo, grid_hi)
    vals, _, cols = _local_bspline(x, grid_size, spline_order, grid_lo, grid_hi)
    out = x.new_zeros(*x.shape, grid_size + spline_order)
    return out.scatter_add(-1, cols, vals)


def bspline_basis_grad_x(
    x: Tensor,
    grad: Tensor,
    grid_size: int,
    spline_order: int,
    grid_lo: float = -1.0,
    grid_hi: float = 1.0,
) -> Tensor:
    """Vector-Jacobian product d(bases)/dx for ``grad`` (..., in, G+K) -> (..., in).

    Uses dB_{j,K}/dx = (B_{j,K-1} - B_{j+1,K-1}) / h in its polynomial form; differentiable.
    """
    if spline_order == 0:
        return torch.zeros_like(x)
    _, dvals, cols = _local_bspline(
        x, grid_size, spline_order, grid_lo, grid_hi, value=False, derivative=True
    )
    return (grad.gather(-1, cols) * dvals).sum(-1)


class _BSplineFn(torch.autograd.Function):
    """Forward without a recursion graph; saves the K+1 local derivatives for the backward.

    First-order backward is one gather; under ``create_graph`` it recomputes the derivative
    from x with differentiable ops (so double backward works too).
    """

    @staticmethod
    def forward(ctx, x: Tensor, grid_size: int, spline_order: int, lo: float, hi: float):  # type: ignore[override]
        ctx.args = (grid_size, spline_order, lo, hi)
        if spline_order == 0:
            ctx.save_for_backward(x)
            return _bspline_order0(x, grid_size, lo, hi)
        need_grad = ctx.needs_input_grad[0]
        vals, dvals, cols = _local_bspline(
            x, grid_size, spline_order, lo, hi, value=True, derivative=need_grad
        )
        out = x.new_zeros(*x.shape, grid_size + spline_order).scatter_add_(-1, cols, vals)
        if need_grad:
            ctx.save_for_backward(x, cols, dvals)
        else:
            ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        if len(saved) == 1 or torch.is_grad_enabled():
            return bspline_basis_grad_x(saved[0], grad, *ctx.args), None, None, None, None
        _, cols, dvals = saved
        return (grad.gather(-1, cols) * dvals).sum(-1), None, None, None, None


def bspline_basis(
    x: Tensor, grid_size: int, spline_order: int, grid_lo: float = -1.0, grid_hi: float = 1.0
) -> Tensor:
    """Uniform B-spline bases of order K on G intervals over [lo, hi], extended by K knots.

    Knots t_j = lo + (j - K) h, j = 0..G+2K, h = (hi - lo) / G. Shape (..., in) ->
    (..., in, G+K); zero outside [t_0, t_{G+2K}). Same values as efficient-kan's ``b_splines``.
    """
    grid_lo, grid_hi = float(grid_lo), float(grid_hi)
    if is_exporting():
        return torch.ops.kanmoe.bspline_basis(x, grid_size, spline_order, grid_lo, grid_hi)
    return _BSplineFn.apply(x, grid_size, spline_order, grid_lo, grid_hi)


# Local B-spline path once G + K >= this * (K + 1): forward only / with gradients. Measured
# (256 -> 256, batch 1024, K = 3, CPU, 1 thread, dense vs local in turns): the dense matmul costs
# G + K bases per edge at GEMM speed, the local path K + 1 rows at gather speed, and its
# backward 2(K + 1). Forward: even at G = 5 (ratio 2), local ahead from G = 8 (2.75, 37 vs 42
# ms); fwd+bwd: dense ahead at G = 16 (4.75, 137 vs 152 ms), local from G = 24 (6.75, 157 vs 175).
LOCAL_MIN_BASES_PER_PIECE = (2.5, 6.0)


def use_local_bspline(grid_size: int, spline_order: int, with_grad: bool = True) -> bool:
    """Whether a layer evaluates only the K+1 non-zero pieces instead of a dense matmul."""
    k = spline_order
    ratio = LOCAL_MIN_BASES_PER_PIECE[1 if with_grad else 0]
    return k >= 1 and grid_size + k >= ratio * (k + 1) and not is_exporting()


def bspline_local_layer(
    x: Tensor, coef: Tensor, grid_size: int, spline_order: int, grid_lo: float, grid_hi: float
) -> Tensor:
    """sum_p sum_i coef[q, p, i] B_i(x_p) from the K+1 non-zero bases only: (B, in) -> (B, out).

    coef (out, in, G+K). Same values as ``bspline_basis(x) @ coef`` (float rounding aside),
    cost independent of the grid size; first-order gradients only (``once_differentiable``).
    """
    k = spline_order
    need_dx = torch.is_grad_enabled() and x.requires_grad
    with torch.no_grad():
        vals, dvals, first = _bspline_rows(x.detach(), grid_size, k, grid_lo, grid_hi, need_dx)
    rows = kernels.coef_rows(coef)  # (in, G+K, out): a view when coef is stored that way
    return kernels.LocalRowsFn.apply(x, coef, first, vals, dvals, 1.0, True, rows)


# --------------------------------------------------------------------------- RBF


def rbf_basis_reference(
    x: Tensor, num_centers: int, grid_lo: float = -1.0, grid_hi: float = 1.0
) -> Tensor:
    """Gaussian bases exp(-((x - mu_i) / sigma)^2), (..., in) -> (..., in, num_centers)."""
    sigma = (grid_hi - grid_lo) / (num_centers - 1)
    mu = torch.linspace(grid_lo, grid_hi, num_centers, dtype=x.dtype, device=x.device)
    return torch.exp(-(((x.unsqueeze(-1) - mu) / sigma) ** 2))


def rbf_basis(x: Tensor, num_centers: int, grid_lo: float = -1.0, grid_hi: float = 1.0) -> Tensor:
    """Per-input Gaussian radial bases; mu = linspace(lo, hi, n), sigma = (hi - lo) / (n - 1)."""
    grid_lo, grid_hi = float(grid_lo), float(grid_hi)
    if is_exporting():
        return torch.ops.kanmoe.rbf_basis(x, num_centers, grid_lo, grid_hi)
    return rbf_basis_reference(x, num_centers, grid_lo, grid_hi)


# --------------------------------------------------------------------------- linear lookup


def _lookup_cells(
    x: Tensor, n_points: int, grid_lo: float, grid_hi: float
) -> tuple[Tensor, Tensor]:
    """Left control-point index (clamped to the first/last segment) and the offset t in it.

    t is not clamped, so t < 0 or t > 1 extrapolates linearly along the end segments.
    """
    h = (grid_hi - grid_lo) / (n_points - 1)
    u = (x - grid_lo) / h
    cell = torch.floor(u.detach()).clamp(0, n_points - 2)
    return cell.long(), u - cell


def linear_spline_lookup_reference(
    x: Tensor, control_points: Tensor, grid_lo: float, grid_hi: float
) -> Tensor:
    """Gather-and-interpolate reference: (..., in) with (in, N, out) -> (..., out)."""
    n_in, n_pts, _ = control_points.shape
    cell, t = _lookup_cells(x, n_pts, grid_lo, grid_hi)
    p = torch.arange(n_in, device=x.device)
    left = control_points[p, cell]  # (..., in, out)
    right = control_points[p, cell + 1]
    return (left + t.unsqueeze(-1) * (right - left)).sum(-2)


def linear_spline_lookup(
    x: Tensor, control_points: Tensor, grid_lo: float, grid_hi: float
) -> Tensor:
    """Uniform linear (C0) spline per edge by index lookup, summed over inputs.

    x (..., in), control_points (in, N, out) at N uniform positions lo..hi -> (..., out).
    Constant work per input: one cell index, two gathered rows, one interpolation (done as an
    ``embedding_bag`` with per-sample weights (1 - t, t) over the flattened (in*N, out) table).
    """
    grid_lo, grid_hi = float(grid_lo), float(grid_hi)
    if is_exporting():
        return torch.ops.kanmoe.linear_spline_lookup(x, control_points, grid_lo, grid_hi)
    n_in, n_pts, n_out = control_points.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in)
    with torch.no_grad():
        cell, t = _lookup_cells(x2, n_pts, grid_lo, grid_hi)
        weights = torch.stack((1.0 - t, t), dim=-1)
    scale = (n_pts - 1) / (grid_hi - grid_lo)
    y = kernels.LocalRowsFn.apply(x2, control_points, cell, weights, None, scale, False, None)
    return y.reshape(*lead, n_out)


def uniform_positions(n: int, lo: float, hi: float) -> list[float]:
    """n evenly spaced floats from lo to hi (Python floats, for plots and tests)."""
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)] if n > 1 else [lo]


__all__ = [
    "bspline_basis",
    "bspline_basis_grad_x",
    "bspline_basis_reference",
    "bspline_local_layer",
    "export_mode",
    "is_exporting",
    "linear_spline_lookup",
    "linear_spline_lookup_reference",
    "rbf_basis",
    "rbf_basis_reference",
    "use_local_bspline",
]
