"""Local-row kernels (model/kernels.py) against explicit gathers, scipy and gradcheck."""

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline

from kanmoe.model import KANLinear, kernels, splines
from kanmoe.model.splines import (
    bspline_local_layer,
    export_mode,
    linear_spline_lookup,
    linear_spline_lookup_reference,
    use_local_bspline,
)


def _problem(n_b, n_in, n_rows, n_out, n_s, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, n_rows - n_s + 1, (n_b, n_in), generator=g)
    w = torch.randn(n_b, n_in, n_s, generator=g, dtype=torch.float64)
    table = torch.randn(n_in, n_rows, n_out, generator=g, dtype=torch.float64)
    grad = torch.randn(n_b, n_out, generator=g, dtype=torch.float64)
    return base, w, table, grad


def _gather_reference(base, w, table):
    p = torch.arange(base.shape[1])
    return sum(w[:, :, s, None] * table[p, base + s] for s in range(w.shape[-1])).sum(1)


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Force every chunked code path: one input per forward/sort/slope group, one sample per
    backward block."""
    monkeypatch.setattr(kernels, "FORWARD_GROUP_BYTES", 1)
    monkeypatch.setattr(kernels, "FORWARD_MAX_GROUPS", 10**6)
    monkeypatch.setattr(kernels, "_INT16_KEYS", 12)
    monkeypatch.setattr(kernels, "INT16_MAX_GROUPS", 10**6)  # int16 groups, not one int32 sort
    monkeypatch.setattr(kernels, "SLOPE_GROUP_BYTES", 1)
    monkeypatch.setattr(kernels, "BACKWARD_G_BYTES", 1)  # one sample per backward block
    monkeypatch.setattr(kernels, "BACKWARD_ADD_RATIO", float("inf"))


@pytest.mark.parametrize("int64", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("n_s", [1, 2, 4])
def test_rows_forward_and_gradient_pieces_equal_gathers(n_s, merged, chunked, int64, request):
    if chunked:
        request.getfixturevalue("tiny_blocks")
    if int64:  # indices past int32 (huge tables) take int64 through every kernel
        request.getfixturevalue("monkeypatch").setattr(kernels, "_INT32_MAX", 0)
    base, w, table, grad = _problem(37, 5, 9, 3, n_s)
    table.requires_grad_(True)
    w.requires_grad_(True)
    want = _gather_reference(base, w, table)
    torch.testing.assert_close(kernels.rows_forward(base, w.detach(), table.detach()), want)
    grad_table, grad_w = torch.autograd.grad(want, (table, w), grad)

    rows = kernels.sort_rows(base, 9)
    keys = (base + torch.arange(5) * 9).reshape(-1)
    assert torch.equal(rows.row, keys[rows.order])  # sorted by key ...
    assert bool((rows.row[1:] >= rows.row[:-1]).all())
    same = rows.row[1:] == rows.row[:-1]
    assert bool((rows.order[1:][same] > rows.order[:-1][same]).all())  # ... stably
    ws = [w.detach()[:, :, s].reshape(-1)[rows.order] for s in range(n_s)]
    got = kernels.segment_sums(rows, grad, ws, merged=merged).reshape(table.shape)
    torch.testing.assert_close(got, grad_table)
    flat = table.detach().reshape(-1, 3)
    for s in range(n_s):
        dots = kernels.unsort(rows, kernels.sampled_dots(rows, flat, grad, s), (37, 5))
        torch.testing.assert_close(dots, grad_w[:, :, s])


@pytest.mark.parametrize("chunked", [False, True])
def test_slope_dots_take_the_difference_first(chunked, request):
    if chunked:
        request.getfixturevalue("tiny_blocks")
    base, _, table, grad = _problem(29, 6, 7, 3, 2, seed=1)
    rows = kernels.sort_rows(base, 7)
    got = kernels.unsort(rows, kernels.slope_dots(rows, table, grad), (29, 6))
    p = torch.arange(6)
    want = ((table[p, base + 1] - table[p, base]) * grad[:, None, :]).sum(-1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("n_pts", [2, 9, 1000])
def test_linear_lookup_values_and_grads_equal_reference(n_pts, tiny_blocks):
    g = torch.Generator().manual_seed(n_pts)
    x = (torch.rand(23, 4, generator=g, dtype=torch.float64) * 6 - 3).requires_grad_(True)
    cp = torch.randn(4, n_pts, 2, generator=g, dtype=torch.float64, requires_grad=True)
    got = linear_spline_lookup(x, cp, -2.0, 2.0)
    want = linear_spline_lookup_reference(x, cp, -2.0, 2.0)
    torch.testing.assert_close(got, want)
    grad = torch.randn(23, 2, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad(got, (x, cp), grad),
        torch.autograd.grad(want, (x, cp), grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_linear_lookup_gradcheck_through_chunked_paths(tiny_blocks):
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(6, 3, generator=g, dtype=torch.float64) * 5 - 2.5).requires_grad_(True)
    cp = torch.randn(3, 7, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, c: linear_spline_lookup(v, c, -2.0, 2.0), (x, cp))


def _scipy_layer(x: np.ndarray, coef: np.ndarray, grid_size, order, lo, hi) -> np.ndarray:
    """sum_p sum_j coef[q, p, j] * scipy basis element j (on its knots, zero outside)."""
    h = (hi - lo) / grid_size
    knots = lo + (np.arange(grid_size + 2 * order + 1) - order) * h
    bases = []
    for j in range(grid_size + order):
        element = BSpline.basis_element(knots[j : j + order + 2], extrapolate=False)
        bases.append(np.nan_to_num(element(x)))  # (S, in) each
    return np.einsum("spj,qpj->sq", np.stack(bases, axis=-1), coef)


@pytest.mark.parametrize(("grid_size", "order"), [(1, 1), (7, 2), (24, 3), (40, 4)])
def test_local_bspline_layer_equals_scipy(grid_size, order):
    lo, hi = -0.7, 1.3
    g = torch.Generator().manual_seed(grid_size)
    x = torch.rand(50, 3, generator=g, dtype=torch.float64) * 3.4 - 1.9  # also off the knots
    coef = torch.randn(2, 3, grid_size + order, generator=g, dtype=torch.float64)
    got = bspline_local_layer(x, coef, grid_size, order, lo, hi).numpy()
    want = _scipy_layer(x.numpy(), coef.numpy(), grid_size, order, lo, hi)
    np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_local_bspline_layer_gradcheck(order, tiny_blocks):
    g = torch.Generator().manual_seed(order)
    x = (torch.rand(6, 3, generator=g, dtype=torch.float64) * 2.6 - 1.3).requires_grad_(True)
    coef = torch.randn(2, 3, 9 + order, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, c: bspline_local_layer(v, c, 9, order, -1.0, 1.0), (x, coef)
    )


def test_path_choice_by_size():
    assert not use_local_bspline(5, 3)  # the default layer keeps the dense matmul
    assert use_local_bspline(64, 3)
    assert use_local_bspline(16, 3, with_grad=False) and not use_local_bspline(16, 3)
    assert not use_local_bspline(100, 0)  # order 0 has no local form here
    with export_mode():
        assert not use_local_bspline(64, 3)  # export keeps the dense custom op


@pytest.mark.parametrize("with_grad", [True, False])
def test_layer_local_path_equals_dense_path(monkeypatch, with_grad):
    torch.manual_seed(7)
    layer = KANLinear(5, 4, grid_size=30).double()
    with torch.no_grad():
        layer.spline_weight.normal_()
    x = (torch.randn(40, 5, dtype=torch.float64) * 1.2).requires_grad_(with_grad)
    layer.update_grid(x.detach())
    layer.lock(0, 1)  # the locked-coefficient and edge-mask paths feed the table too
    layer.edge_mask[2, 3] = 0.0
    layer._flags_from_buffers()

    def run():
        y = layer(x)
        if not with_grad:
            return (y,)
        return (y, *torch.autograd.grad(y.square().sum(), (x, *layer.parameters())))

    assert use_local_bspline(30, 3, with_grad)
    local = run()
    monkeypatch.setattr(splines, "LOCAL_MIN_BASES_PER_PIECE", (10**6, 10**6))
    dense = run()
    for a, b in zip(local, dense, strict=True):
        torch.testing.assert_close(a, b)
    with export_mode():  # the custom op (dense) gives the same layer output
        torch.testing.assert_close(layer(x), local[0])


@pytest.mark.parametrize("kwargs", [{"basis": "linear"}, {"grid_size": 40}])
def test_empty_batch_forward_and_backward(kwargs):
    layer = KANLinear(3, 2, **kwargs)
    x = torch.zeros(0, 3, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 2)
    y.sum().backward()
    assert x.grad.shape == (0, 3)
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())


def test_sort_rows_one_int32_sort_equals_int16_groups(monkeypatch):
    base, _, _, _ = _problem(41, 7, 9, 1, 2, seed=3)
    monkeypatch.setattr(kernels, "_INT16_KEYS", 12)  # one input per int16 group: 7 groups
    monkeypatch.setattr(kernels, "INT16_MAX_GROUPS", 10**6)
    grouped = kernels.sort_rows(base, 9)
    monkeypatch.setattr(kernels, "INT16_MAX_GROUPS", 2)  # too many groups: one int32 sort
    single = kernels.sort_rows(base, 9)
    for a, b in zip(grouped, single, strict=True):
        assert torch.equal(a, b)


def test_bspline_rows_near_and_past_the_grid_ends_equal_dense_basis():
    """Pairs within K cells of either end are shifted so first + K stays a real column."""
    grid_size, k, lo, hi = 6, 3, -1.0, 1.0
    h = (hi - lo) / grid_size
    x = torch.linspace(lo - (k + 1.5) * h, hi + (k + 1.5) * h, 301, dtype=torch.float64)
    x = x.reshape(-1, 1).expand(-1, 2).contiguous()
    vals, dvals, first = splines._bspline_rows(x, grid_size, k, lo, hi, derivative=True)
    assert int(first.min()) == 0 and int(first.max()) == grid_size - 1
    cols = first.unsqueeze(-1) + torch.arange(k + 1)
    dense = splines.bspline_basis_reference(x, grid_size, k, lo, hi)
    torch.testing.assert_close(vals, dense.gather(-1, cols), atol=1e-12, rtol=0)
    # every non-zero basis is among the K + 1 picked: nothing is dropped at the ends
    torch.testing.assert_close(vals.sum(-1), dense.sum(-1), atol=1e-12, rtol=0)
    xg = x.clone().requires_grad_(True)
    want = torch.autograd.grad(
        splines.bspline_basis_reference(xg, grid_size, k, lo, hi),
        xg,
        torch.zeros_like(dense).scatter_(-1, cols, 1.0),
    )[0]
    torch.testing.assert_close(dvals.sum(-1), want, atol=1e-10, rtol=0)


def test_local_bspline_gradcheck_with_coefficients_stored_as_rows():
    """(in, M, out)-stored coefficients (a local-path layer's layout) get their gradient back
    as a view of the row gradient, not a transposed copy."""
    g = torch.Generator().manual_seed(11)
    x = (torch.rand(6, 3, generator=g, dtype=torch.float64) * 2.8 - 1.4).requires_grad_(True)
    rows = torch.randn(3, 12, 2, generator=g, dtype=torch.float64)
    coef = rows.permute(2, 0, 1).requires_grad_(True)  # (out, in, M), stored (in, M, out)
    assert kernels.coef_rows(coef).data_ptr() == coef.data_ptr()  # no copy
    fn = lambda v, c: bspline_local_layer(v, c, 9, 3, -1.0, 1.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, coef))
    grad = torch.autograd.grad(fn(x, coef).sum(), coef)[0]
    assert grad.permute(1, 2, 0).is_contiguous()


def test_local_path_layer_stores_rows_and_saves_the_usual_layout(tmp_path):
    from kanmoe.model.run import load_weights, save_weights

    torch.manual_seed(3)
    layer = KANLinear(4, 3, grid_size=40)
    assert use_local_bspline(40, 3) and layer.spline_weight.permute(1, 2, 0).is_contiguous()
    assert KANLinear(4, 3, grid_size=5).spline_weight.is_contiguous()  # dense path: as before
    x = torch.rand(30, 4) * 2 - 1
    y = layer(x)
    y.square().sum().backward()
    assert layer.spline_weight.grad.permute(1, 2, 0).is_contiguous()  # stolen, not copied
    save_weights(layer, tmp_path / "w.safetensors")
    fresh = KANLinear(4, 3, grid_size=40)
    load_weights(fresh, tmp_path / "w.safetensors")
    assert fresh.spline_weight.permute(1, 2, 0).is_contiguous()  # load copies into the layout
    torch.testing.assert_close(fresh(x), y)
    state = {k: v.contiguous() for k, v in layer.state_dict().items()}  # the usual layout
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), y)
    assert fresh.double().spline_weight.permute(1, 2, 0).is_contiguous()


def test_scale_rows_gradcheck_through_chunks(monkeypatch):
    monkeypatch.setattr(kernels, "SCALE_GROUP_BYTES", 1)  # one input per chunk
    g = torch.Generator().manual_seed(8)
    rows = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(kernels.ScaleRowsFn.apply(rows, scale), rows * scale[:, None])
    assert torch.autograd.gradcheck(kernels.ScaleRowsFn.apply, (rows, scale))
