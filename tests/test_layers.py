"""KANLinear / KAN: formulas against explicit loops and numpy, gradients, grid update,
pruning, locking, plotting, argument errors, torch.compile and a real fit."""

import math

import numpy as np
import pytest
import torch

from kanmoe.model import KAN, KANLinear
from kanmoe.model.splines import export_mode, use_local_bspline

BASES = ("bspline", "rbf", "linear")


@pytest.fixture
def one_thread():
    """The CI box has 2 shared cores; one intra-op thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_leading_dims_and_dtypes(basis, dtype):
    torch.manual_seed(0)
    layer = KANLinear(4, 3, basis=basis).to(dtype)
    x = torch.randn(2, 5, 4, dtype=dtype)
    y = layer(x)
    assert y.shape == (2, 5, 3) and y.dtype == dtype
    torch.testing.assert_close(y.reshape(10, 3), layer(x.reshape(10, 4)))
    assert layer(torch.randn(4, dtype=dtype)).shape == (3,)


def test_rbf_layer_equals_explicit_double_loop():
    torch.manual_seed(1)
    layer = KANLinear(3, 2, basis="rbf", grid_size=4, grid_range=(-1.5, 1.0)).double()
    x = torch.rand(6, 3, dtype=torch.float64) * 3 - 1.7
    got = layer(x)
    coef = layer.coefficients().detach()  # (out, in, M)
    w_base = layer.base_weight.detach()
    n_c = 5
    mus = [-1.5 + i * 2.5 / (n_c - 1) for i in range(n_c)]
    sigma = 2.5 / (n_c - 1)
    for b in range(6):
        for q in range(2):
            total = 0.0
            for p in range(3):
                xp = x[b, p].item()
                total += w_base[q, p].item() * xp / (1 + math.exp(-xp))  # SiLU base branch
                for i in range(n_c):
                    total += coef[q, p, i].item() * math.exp(-((abs(xp - mus[i]) / sigma) ** 2))
            assert got[b, q].item() == pytest.approx(total, abs=1e-10)


def _numpy_linear_layer(x: np.ndarray, cp: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """sum_p interp_p(x_p) with numpy.interp inside and end-segment extrapolation outside."""
    n_in, n_pts, n_out = cp.shape
    xp = np.linspace(lo, hi, n_pts)
    y = np.zeros((x.shape[0], n_out))
    for p in range(n_in):
        for q in range(n_out):
            v = np.interp(x[:, p], xp, cp[p, :, q])
            left, right = x[:, p] < lo, x[:, p] > hi
            v[left] = cp[p, 0, q] + (x[left, p] - lo) * (cp[p, 1, q] - cp[p, 0, q]) / (xp[1] - lo)
            v[right] = cp[p, -1, q] + (x[right, p] - hi) * (cp[p, -1, q] - cp[p, -2, q]) / (
                hi - xp[-2]
            )
            y[:, q] += v
    return y


@pytest.mark.parametrize("init", ["random_normal", "identity", "zero"])
def test_linear_layer_equals_numpy_interp(init):
    torch.manual_seed(2)
    layer = KANLinear(3, 3, basis="linear", init=init, num_control_points=7, spline_width=3.0)
    layer = layer.double()
    x = torch.cat([torch.rand(50, 3) * 3 - 1.5, torch.rand(20, 3) * 10 - 5]).double()
    for perturb in (False, True):
        if perturb:  # also away from the initial straight lines
            with torch.no_grad():
                layer.control_points.add_(torch.randn_like(layer.control_points))
        cp = layer.control_points.detach().numpy()
        want = _numpy_linear_layer(x.numpy(), cp, -1.5, 1.5)
        np.testing.assert_allclose(layer(x).detach().numpy(), want, atol=1e-10)


def test_linear_inits():
    x = torch.randn(64, 5) * 3  # includes extrapolation beyond [-2, 2]
    ident = KANLinear(5, 5, basis="linear", init="identity")
    torch.testing.assert_close(ident(x), x, atol=1e-5, rtol=1e-5)
    zero = KANLinear(5, 4, basis="linear", init="zero")
    assert torch.equal(zero(x), torch.zeros(64, 4))
    rnd = KANLinear(5, 4, basis="linear", init="random_normal")
    pos = torch.linspace(-2, 2, 32)
    slopes = rnd.control_points.detach()[:, -1, :] / pos[-1]  # (in, out)
    torch.testing.assert_close(rnd.control_points.detach(), slopes[:, None, :] * pos[None, :, None])
    torch.testing.assert_close(slopes.norm(dim=0), torch.ones(4))  # unit norm per output neuron


def test_bspline_identity_init_returns_input_inside_grid():
    layer = KANLinear(4, 4, init="identity").double()
    x = torch.rand(30, 4, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(layer(x), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("basis", BASES)
def test_layer_gradcheck_input_and_parameters(basis):
    torch.manual_seed(3)
    layer = KANLinear(3, 2, basis=basis, num_control_points=6).double()
    x = (torch.rand(5, 3, dtype=torch.float64) * 2.4 - 1.2).requires_grad_(True)
    params = tuple(layer.parameters())
    names = [n for n, _ in layer.named_parameters()]

    def fn(xv, *ps):
        state = dict(zip(names, ps, strict=True))
        return torch.func.functional_call(layer, state, (xv,))

    assert torch.autograd.gradcheck(fn, (x, *params))
    with export_mode():  # the custom-op autograd formulas as well
        assert torch.autograd.gradcheck(fn, (x, *params))


def test_layer_gradcheck_local_bspline_path():
    # grid 30 (33 bases per edge) takes the K+1-pieces path; its formulas must be exact too
    torch.manual_seed(3)
    layer = KANLinear(3, 2, grid_size=30).double()
    assert use_local_bspline(30, 3)
    x = (torch.rand(5, 3, dtype=torch.float64) * 2.4 - 1.2).requires_grad_(True)
    params = tuple(layer.parameters())
    names = [n for n, _ in layer.named_parameters()]

    def fn(xv, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (xv,))

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("basis", BASES)
def test_export_mode_layer_matches_fast_path(basis):
    torch.manual_seed(4)
    layer = KANLinear(6, 4, basis=basis)
    x = torch.randn(3, 7, 6)
    layer.update_grid(x.reshape(-1, 6))  # per-input normalisation runs outside the op
    fast = layer(x)
    with export_mode():
        exported = layer(x)
    torch.testing.assert_close(fast, exported, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("basis", BASES)
def test_update_grid_keeps_outputs(basis):
    torch.manual_seed(5)
    layer = KANLinear(3, 2, basis=basis, grid_size=8).double()
    x = torch.rand(400, 3, dtype=torch.float64) * 1.3 - 0.5  # inside [-0.5, 0.8]
    before = layer(x).detach()
    layer.update_grid(x, margin=0.01)
    after = layer(x).detach()
    assert not torch.allclose(layer.grid_scale, torch.ones(3, dtype=torch.float64))
    scale = before.abs().max()
    torch.testing.assert_close(after, before, atol=2e-3 * scale.item(), rtol=0)


def test_kan_update_grid_follows_activations():
    torch.manual_seed(6)
    model = KAN([2, 4, 1]).double()
    x = torch.rand(300, 2, dtype=torch.float64) * 4 - 2  # beyond the default grid
    before = model(x).detach()
    model.update_grid(x)
    inner = model.layers[0](x).detach()
    lo = (model.layers[1].grid_lo - model.layers[1].grid_shift) / model.layers[1].grid_scale
    torch.testing.assert_close(lo, inner.min(0).values - 0.01)
    assert model(x).shape == before.shape


@pytest.mark.parametrize("basis", BASES)
def test_prune_zero_activation_edge_keeps_outputs(basis):
    torch.manual_seed(7)
    layer = KANLinear(4, 3, basis=basis)
    with torch.no_grad():  # make edge (q=1, p=2) a zero function
        if basis == "linear":
            layer.control_points[2, :, 1] = 0.0
        else:
            layer.base_weight[1, 2] = 0.0
            layer.spline_weight[1, 2] = 0.0
    x = torch.randn(64, 4)
    before = layer(x)
    keep = layer.prune(threshold=1e-9, x=x)
    assert not keep[1, 2] and keep.sum() == 11
    torch.testing.assert_close(layer(x), before)
    layer.prune(threshold=1e9, x=x)  # now everything goes: outputs must change to 0
    assert torch.equal(layer(x), torch.zeros(64, 3))
    assert layer.pruned_inputs() == [0, 1, 2, 3] and layer.pruned_outputs() == [0, 1, 2]


@pytest.mark.parametrize("basis", BASES)
def test_lock_freezes_edge_during_training(basis):
    torch.manual_seed(8)
    layer = KANLinear(3, 2, basis=basis)
    grid = torch.linspace(-0.9, 0.9, 50)[:, None].expand(-1, 3)
    layer.lock(in_idx=1, out_idx=0)
    frozen = layer.edge_activations(grid)[:, 0, 1].detach().clone()
    other = layer.edge_activations(grid)[:, 1, 1].detach().clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        loss = (layer(torch.randn(32, 3)) - 1.0).pow(2).mean()
        loss.backward()
        opt.step()
    torch.testing.assert_close(layer.edge_activations(grid)[:, 0, 1].detach(), frozen)
    assert not torch.allclose(layer.edge_activations(grid)[:, 1, 1].detach(), other)
    layer.unlock(1, 0)
    assert not layer.lock_mask.any()


def test_lock_to_symbolic_function():
    layer = KANLinear(2, 2, grid_size=10).double()
    layer.lock(0, fn=torch.sin)
    x = torch.linspace(-0.95, 0.95, 40, dtype=torch.float64)[:, None].expand(-1, 2)
    acts = layer.edge_activations(x)
    torch.testing.assert_close(acts[:, 0, 0], torch.sin(x[:, 0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(acts[:, 1, 0], torch.sin(x[:, 0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("basis", BASES)
def test_regularization_loss_is_pykan_l1_plus_entropy(basis):
    torch.manual_seed(9)
    layer = KANLinear(3, 2, basis=basis)
    x = torch.randn(40, 3)
    layer.train()
    layer(x)  # the penalty reads the last training batch
    loss = layer.regularization_loss(l1=0.5, entropy=2.0)
    mag = layer.edge_activations(x).abs().mean(0)
    p = mag / mag.sum()
    want = 0.5 * mag.sum() - 2.0 * (p * torch.log(p)).sum()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    loss.backward()
    coef = layer.control_points if basis == "linear" else layer.spline_weight
    assert coef.grad is not None and coef.grad.abs().sum() > 0


def test_plot_writes_png(tmp_path):
    layer = KANLinear(2, 3)
    layer.lock(0, 1)
    layer.prune(1e-12)
    fig = layer.plot(tmp_path / "sub" / "edges.png")
    data = (tmp_path / "sub" / "edges.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert len(fig.axes) == 6
    assert not list((tmp_path / "sub").glob(".*"))  # no temp file left behind
    figs = KAN([2, 2, 1], basis="linear").plot(tmp_path / "kan")
    assert len(figs) == 2 and (tmp_path / "kan" / "layer_1.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"in_features": 0}, "in_features"),
        ({"out_features": -2}, "out_features"),
        ({"grid_size": 0}, "grid_size"),
        ({"spline_order": -1}, "spline_order"),
        ({"basis": "chebyshev"}, "basis"),
        ({"init": "identity", "out_features": 4}, "init"),
        ({"grid_range": (1.0, 1.0)}, "grid_range"),
        ({"grid_range": (2.0, -1.0)}, "grid_range"),
        ({"num_control_points": 1, "basis": "linear"}, "num_control_points"),
        ({"spline_width": 0.0, "basis": "linear"}, "spline_width"),
        ({"base_activation": "swish"}, "base_activation"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    args = {"in_features": 3, "out_features": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        KANLinear(**args)


@pytest.mark.parametrize("basis", BASES)
def test_wrong_input_width_names_in_features(basis):
    with pytest.raises(ValueError, match="in_features"):
        KANLinear(3, 2, basis=basis)(torch.randn(4, 5))


def test_kan_widths_validation():
    with pytest.raises(ValueError, match="widths"):
        KAN([4])


def test_torch_compile_forward_backward(one_thread):
    torch.manual_seed(10)
    layer = KANLinear(4, 3)
    compiled = torch.compile(layer)
    x = torch.randn(16, 4, requires_grad=True)
    y_ref = layer(x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    y = compiled(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("basis", BASES)
def test_cuda_matches_cpu(basis):
    torch.manual_seed(11)
    layer = KANLinear(5, 3, basis=basis)
    x = torch.randn(32, 5, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    layer_gpu = layer.cuda()
    xg = x.detach().cuda().requires_grad_(True)
    yg = layer_gpu(xg)
    yg.sum().backward()
    torch.testing.assert_close(yg.cpu(), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xg.grad.cpu(), x.grad, atol=1e-5, rtol=1e-5)


def test_tiny_kan_fits_sin_plus_square(one_thread):
    torch.manual_seed(0)
    x = torch.rand(256, 2) * 2 - 1
    y = torch.sin(math.pi * x[:, :1]) + x[:, 1:] ** 2
    model = KAN([2, 5, 1], grid_size=5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
    x_test = torch.rand(512, 2) * 2 - 1
    y_test = torch.sin(math.pi * x_test[:, :1]) + x_test[:, 1:] ** 2
    with torch.no_grad():
        pred = model(x_test)
    r2 = 1 - (pred - y_test).pow(2).sum() / (y_test - y_test.mean()).pow(2).sum()
    assert r2 > 0.99, float(r2)


def test_state_dict_round_trip_keeps_grid_prune_and_locks():
    torch.manual_seed(12)
    x = torch.randn(50, 3) * 2
    model = KAN([3, 4, 2])
    model.update_grid(x)
    model.layers[0].prune(0.05, x=x)
    model.layers[1].lock(1, 0)
    with torch.no_grad():
        model.layers[1].spline_weight.add_(1.0)  # the locked edge must ignore this
    fresh = KAN([3, 4, 2])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x))
    assert fresh.layers[1].lock_mask[0, 1] and fresh.layers[0].edge_mask.min() == 0


def test_update_grid_quantile_range():
    torch.manual_seed(13)
    layer = KANLinear(2, 2).double()
    x = torch.randn(1000, 2, dtype=torch.float64) * 0.3
    layer.update_grid(x, margin=0.0, quantile=0.05)
    lo = (layer.grid_lo - layer.grid_shift) / layer.grid_scale
    hi = (layer.grid_hi - layer.grid_shift) / layer.grid_scale
    torch.testing.assert_close(lo, torch.quantile(x, 0.05, dim=0))
    torch.testing.assert_close(hi, torch.quantile(x, 0.95, dim=0))
    with pytest.raises(ValueError, match="quantile"):
        layer.update_grid(x, quantile=0.5)


@pytest.mark.parametrize("basis", ["bspline", "linear"])
def test_lock_buffers_saved_only_while_an_edge_is_locked(tmp_path, basis):
    from safetensors import safe_open

    from kanmoe.model.run import load_weights, save_weights

    torch.manual_seed(14)
    x = torch.rand(20, 3) * 2 - 1
    model = KAN([3, 4, 2], basis=basis)
    save_weights(model, tmp_path / "plain.safetensors")
    with safe_open(tmp_path / "plain.safetensors", "pt") as f:
        keys = set(f.keys())
    assert not any("locked" in k for k in keys) and "layers.0.lock_mask" in keys
    fresh = KAN([3, 4, 2], basis=basis)
    load_weights(fresh, tmp_path / "plain.safetensors")
    torch.testing.assert_close(fresh(x), model(x))

    model.layers[1].lock(1, 0, fn=torch.sin)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # locked edge ignores this: its output comes from the saved buffers
    save_weights(model, tmp_path / "locked.safetensors")
    with safe_open(tmp_path / "locked.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "layers.1.locked_coef" in keys and "layers.0.locked_coef" not in keys
    fresh = KAN([3, 4, 2], basis=basis)
    load_weights(fresh, tmp_path / "locked.safetensors")
    torch.testing.assert_close(fresh(x), model(x))
    assert fresh.layers[1].lock_mask.sum() == 1
    torch.testing.assert_close(fresh.layers[1].locked_coef, model.layers[1].locked_coef)

    # the file of an unlocked layer, loaded into a layer that was locked, unlocks it
    model.layers[1].load_state_dict(KAN([3, 4, 2], basis=basis).layers[1].state_dict())
    assert not model.layers[1].lock_mask.any() and model.layers[1].locked_coef.abs().sum() == 0


def test_lock_state_without_its_buffers_is_reported_missing():
    layer = KANLinear(3, 2)
    layer.lock(0)
    state = {k: v for k, v in layer.state_dict().items() if "locked" not in k}
    with pytest.raises(RuntimeError, match="locked_coef"):
        KANLinear(3, 2).load_state_dict(state)


def test_old_run_dir_with_lock_buffers_still_loads(tmp_path):
    """Run dirs saved before the lock-buffer rule hold every layer's (unlocked) lock buffers."""
    import shutil

    from safetensors.torch import load_file, save_file

    from kanmoe.model.layers import lock_state
    from kanmoe.model.run import load_run
    from kanmoe.paths import PROJECT_ROOT

    old_dir = tmp_path / "old_run"
    shutil.copytree(PROJECT_ROOT / "default_run", old_dir, ignore=shutil.ignore_patterns("plots"))
    current = load_file(old_dir / "weights.safetensors")
    model = load_run(old_dir).model
    lock = {k: v.detach().clone().contiguous() for k, v in lock_state(model).items()}
    assert lock and not set(lock) & set(current)  # the shipped file has none: it is new
    save_file({**current, **lock}, str(old_dir / "weights.safetensors"))  # the old layout
    inner = load_run(old_dir).model.state_dict()
    assert set(inner) == set(current)  # all unlocked: left out of the state dict again
    for key, value in current.items():
        assert torch.equal(inner[key], value), key
