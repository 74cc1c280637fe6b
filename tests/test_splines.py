"""Spline bases against independent references (scipy, numpy, explicit formulas) and gradcheck."""

import math

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline
from torch.utils._python_dispatch import TorchDispatchMode

from kanmoe.model import custom_ops  # noqa: F401  (registers torch.ops.kanmoe.*)
from kanmoe.model.splines import (
    bspline_basis,
    export_mode,
    is_exporting,
    linear_spline_lookup,
    linear_spline_lookup_reference,
    rbf_basis,
)


def _scipy_bases(x: np.ndarray, grid_size: int, order: int, lo: float, hi: float) -> np.ndarray:
    """(n,) -> (n, G+K) from scipy's basis elements on the extended uniform knot vector."""
    h = (hi - lo) / grid_size
    knots = lo + (np.arange(grid_size + 2 * order + 1) - order) * h
    cols = []
    for j in range(grid_size + order):
        element = knots[j : j + order + 2]
        col = np.nan_to_num(BSpline.basis_element(element, extrapolate=False)(x))
        # scipy closes an element's last interval on the right; the contract (Cox-de Boor,
        # B_{j,0} = 1 on [t_j, t_{j+1})) is half-open. Only order 0 is non-zero there.
        col[x == element[-1]] = 0.0
        cols.append(col)
    return np.stack(cols, axis=-1)


def _test_points(grid_size: int, order: int, lo: float, hi: float) -> np.ndarray:
    h = (hi - lo) / grid_size
    knots = lo + (np.arange(grid_size + 2 * order + 1) - order) * h
    outside = np.array([knots[0] - 0.37, knots[0] - 1e-3, knots[-1] + 1e-3, knots[-1] + 2.0])
    inside = np.random.default_rng(grid_size * 10 + order).uniform(knots[0], knots[-1], 64)
    return np.concatenate([inside, knots, outside])


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("grid_size", [1, 3, 5, 8])
@pytest.mark.parametrize("grid", [(-1.0, 1.0), (-0.7, 1.3)])
def test_bspline_equals_scipy_basis_elements(order, grid_size, grid):
    lo, hi = grid
    x = _test_points(grid_size, order, lo, hi)
    want = _scipy_bases(x, grid_size, order, lo, hi)
    got = bspline_basis(torch.tensor(x)[:, None], grid_size, order, lo, hi)[:, 0].numpy()
    assert got.shape == (len(x), grid_size + order)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_bspline_partition_of_unity_and_leading_dims():
    x = torch.rand(2, 3, 7, dtype=torch.float32) * 2 - 1
    b = bspline_basis(x, 5, 3)
    assert b.shape == (2, 3, 7, 8) and b.dtype == torch.float32
    torch.testing.assert_close(b.sum(-1), torch.ones(2, 3, 7), atol=1e-6, rtol=0)


def test_bspline_float32_matches_float64():
    x = torch.rand(100, 4, dtype=torch.float64) * 3 - 1.5
    b64 = bspline_basis(x, 7, 3, -0.7, 1.3)
    b32 = bspline_basis(x.float(), 7, 3, -0.7, 1.3)
    torch.testing.assert_close(b32.double(), b64, atol=2e-6, rtol=0)


def test_rbf_equals_formula():
    x = torch.linspace(-1.5, 1.5, 31, dtype=torch.float64)[:, None]
    got = rbf_basis(x, 6, -1.0, 1.0)[:, 0]
    sigma = 2.0 / 5
    for n, xv in enumerate(x[:, 0].tolist()):
        for i in range(6):
            mu = -1.0 + i * sigma
            assert got[n, i].item() == pytest.approx(
                math.exp(-(((xv - mu) / sigma) ** 2)), abs=1e-12
            )


def _interp_with_extrapolation(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """numpy.interp inside [xp0, xpN]; straight continuation of the end segments outside."""
    y = np.interp(x, xp, fp)
    left, right = x < xp[0], x > xp[-1]
    y[left] = fp[0] + (x[left] - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
    y[right] = fp[-1] + (x[right] - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return y


def test_linear_lookup_equals_numpy_interp_and_extrapolates():
    rng = np.random.default_rng(1)
    n_in, n_pts, n_out, lo, hi = 3, 9, 2, -2.0, 2.0
    cp = rng.normal(size=(n_in, n_pts, n_out))
    x = np.concatenate([rng.uniform(-5, 5, (40, n_in)), np.full((1, n_in), lo)])
    x[:9, 0] = np.linspace(lo, hi, n_pts)  # exactly on control points
    got = linear_spline_lookup(torch.tensor(x), torch.tensor(cp), lo, hi).numpy()
    xp = np.linspace(lo, hi, n_pts)
    want = sum(
        np.stack([_interp_with_extrapolation(x[:, p], xp, cp[p, :, q]) for q in range(n_out)], -1)
        for p in range(n_in)
    )
    np.testing.assert_allclose(got, want, atol=1e-12)


def _gradcheck_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # keep points off the knots, where order-1 derivatives jump
    x = (torch.rand(6, 3, generator=g, dtype=torch.float64) * 2.6 - 1.3).requires_grad_(True)
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
def test_bspline_gradcheck(order):
    x = _gradcheck_inputs(order)
    assert torch.autograd.gradcheck(lambda v: bspline_basis(v, 5, order, -1.0, 1.0), (x,))
    assert torch.autograd.gradgradcheck(lambda v: bspline_basis(v, 5, order, -1.0, 1.0), (x,))


def test_rbf_and_lookup_gradcheck():
    x = _gradcheck_inputs(7)
    assert torch.autograd.gradcheck(lambda v: rbf_basis(v, 6, -1.0, 1.0), (x,))
    cp = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    xw = (x * 2).detach().requires_grad_(True)  # some points extrapolate
    assert torch.autograd.gradcheck(lambda v, c: linear_spline_lookup(v, c, -2.0, 2.0), (xw, cp))


def test_custom_ops_gradcheck_and_opcheck():
    x = _gradcheck_inputs(3)
    ops = torch.ops.kanmoe
    assert torch.autograd.gradcheck(lambda v: ops.bspline_basis(v, 5, 3, -1.0, 1.0), (x,))
    assert torch.autograd.gradcheck(lambda v: ops.rbf_basis(v, 6, -1.0, 1.0), (x,))
    cp = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    xw = (x * 2).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, c: ops.linear_spline_lookup(v, c, -2.0, 2.0), (xw, cp)
    )
    for op, args in (
        (ops.bspline_basis.default, (x, 5, 3, -1.0, 1.0)),
        (ops.rbf_basis.default, (x, 6, -1.0, 1.0)),
        (ops.linear_spline_lookup.default, (xw, cp, -2.0, 2.0)),
    ):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


class _RecordOps(TorchDispatchMode):
    """Records every op that reaches the dispatcher (custom ops included)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def _all_three(x, cp):
    return (
        bspline_basis(x, 5, 3, -1.0, 1.0),
        rbf_basis(x, 6, -1.0, 1.0),
        linear_spline_lookup(x, cp, -2.0, 2.0),
    )


def test_export_mode_routes_to_custom_ops_with_same_values():
    x = torch.rand(5, 4, 3) * 3 - 1.5
    cp = torch.randn(3, 8, 2)
    wanted = {
        "kanmoe.bspline_basis.default",
        "kanmoe.rbf_basis.default",
        "kanmoe.linear_spline_lookup.default",
    }
    with _RecordOps() as fast_ops:
        fast = _all_three(x, cp)
    assert not is_exporting()
    assert not wanted & fast_ops.names
    with export_mode(), _RecordOps() as export_ops:
        assert is_exporting()
        exported = _all_three(x, cp)
    assert not is_exporting()
    assert wanted <= export_ops.names
    for a, b in zip(fast, exported, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_linear_lookup_large_table_grouped_path_matches_reference():
    # (in, N, out) = 40 x 32 x 256 floats is larger than one cache group: inputs go in groups
    x = (torch.rand(16, 40) * 6 - 3).requires_grad_(True)
    cp = torch.randn(40, 32, 256, requires_grad=True)
    got = linear_spline_lookup(x, cp, -2.0, 2.0)
    want = linear_spline_lookup_reference(x, cp, -2.0, 2.0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, cp), g)
    grads_ref = torch.autograd.grad(want, (x, cp), g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
