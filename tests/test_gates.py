"""Gates and routing: weights, training, top-k, noise and the auxiliary losses."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from kanmoe.model.gates import (
    GRKANGate,
    GRNGate,
    LinearGate,
    Router,
    apply_gating_activation,
    build_gate,
)
from kanmoe.model.moe import MoE

GATES = ("linear", "grn", "grkan")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("gate", GATES)
def test_softmax_gate_weights_sum_to_one(gate):
    moe = MoE(nn.Linear(6, 2), n_experts=4, gate=gate)
    _, weights = moe(torch.randn(32, 6) * 3, return_gates=True)
    assert weights.shape == (32, 4)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(32))
    assert weights.std(0).max() > 0  # depends on the input, not a constant


@pytest.mark.parametrize("gate", GATES)
def test_sigmoid_gating_matches_sigmoid_of_logits(gate):
    moe = MoE(nn.Linear(6, 2), n_experts=4, gate=gate, gating_activation="sigmoid")
    x = torch.randn(16, 6)
    _, weights = moe(x, return_gates=True)
    torch.testing.assert_close(weights, torch.sigmoid(moe.gate(x)))
    assert not torch.allclose(weights.sum(-1), torch.ones(16))


def test_gate_classes_map_to_logits():
    x = torch.randn(5, 7, 3)  # any leading dims
    for gate in (LinearGate(3, 4), GRNGate(3, 4, hidden=8), GRKANGate(3, 4, hidden=8)):
        assert gate(x).shape == (5, 7, 4)


def test_grn_gate_is_the_gated_residual_formula():
    """Independent recomputation of LayerNorm(skip(h) + GLU(Linear(ELU(Linear(h)))))."""
    gate = GRNGate(3, 4, hidden=8)
    x = torch.randn(10, 3)
    h = torch.relu(x @ gate.pre.weight.T + gate.pre.bias)
    lin1, lin2 = gate.layer1[0], gate.layer2
    u = torch.nn.functional.elu(h @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
    g = (u @ gate.glu_value.weight.T + gate.glu_value.bias) * torch.sigmoid(
        u @ gate.glu_gate.weight.T + gate.glu_gate.bias
    )
    z = h @ gate.skip.weight.T + gate.skip.bias + g
    expected = (z - z.mean(-1, keepdim=True)) / torch.sqrt(
        z.var(-1, unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(gate(x), expected * gate.norm.weight + gate.norm.bias)


def test_grkan_uses_kan_layers_with_configurable_activations():
    from kanmoe.model.layers import KANLinear

    paper = GRKANGate(3, 4, hidden=8)
    keras = GRKANGate(3, 4, hidden=8, kan_activations=("elu", "relu"), kan_kwargs={"grid_size": 3})
    assert isinstance(paper.layer1, KANLinear) and isinstance(paper.layer2, KANLinear)
    x = torch.randn(6, 3)
    assert paper(x).shape == keras(x).shape == (6, 4)
    with pytest.raises(ValueError, match="kan_activations"):
        GRKANGate(3, 4, kan_activations=("silu", "nope"))


@pytest.mark.parametrize("gate", GATES)
def test_each_gate_learns_a_routing_rule(gate):
    """Route x to expert 0/1/2 by which coordinate of x is largest: NLL must fall clearly."""
    x = torch.randn(256, 3)
    label = x.argmax(-1)
    g = build_gate(gate, 3, 3, hidden=16)
    opt = torch.optim.Adam(g.parameters(), lr=0.03)

    def loss_fn():
        weights = apply_gating_activation(g(x), "softmax")
        return nn.functional.nll_loss(torch.log(weights + 1e-9), label)

    first = loss_fn().item()
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    final = loss_fn().item()
    accuracy = (g(x).argmax(-1) == label).float().mean().item()
    assert final < 0.4 * first, (first, final)
    assert accuracy > 0.9


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_routes_to_exactly_k_experts(activation, k):
    router = Router(5, 4, activation, top_k=k)
    logits = torch.randn(64, 4) * 2
    weights, _ = router(torch.randn(64, 5), logits)
    assert ((weights > 0).sum(-1) == k).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(64))
    # the kept experts are the k largest logits, weights renormalised
    top = logits.topk(k, -1).indices
    assert (weights.gather(-1, top) > 0).all()
    if activation == "softmax":
        expected = torch.zeros_like(logits).scatter(
            -1, top, torch.softmax(logits.gather(-1, top), -1)
        )
        torch.testing.assert_close(weights, expected)


def test_noisy_gating_only_in_training():
    router = Router(5, 4, top_k=2, noisy_gating=True)
    x, logits = torch.randn(32, 5), torch.randn(32, 4)
    router.train()
    a, _ = router(x, logits)
    b, _ = router(x, logits)
    assert not torch.equal(a, b)  # noise changes the routing between calls
    router.eval()
    c, aux = router(x, logits)
    d, _ = router(x, logits)
    assert torch.equal(c, d) and aux is None
    clean = torch.zeros_like(logits).scatter(-1, logits.topk(2, -1).indices, 1.0)
    assert torch.equal(c > 0, clean > 0)


def _numpy_aux(logits, k, n_experts, lb_w, z_w):
    """Reference Switch/ST-MoE aux losses in numpy."""
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    order = np.argsort(-logits, axis=-1)[:, :k]
    assign = np.zeros_like(logits)
    np.put_along_axis(assign, order, 1.0, axis=-1)
    balance = n_experts * np.sum(assign.mean(0) / k * probs.mean(0))
    lse = np.log(np.exp(logits).sum(-1))
    return lb_w * balance + z_w * np.mean(lse**2)


@pytest.mark.parametrize("k", [None, 1, 2])
def test_aux_losses_match_reference_and_are_differentiable(k):
    g = build_gate("grn", 5, 4, hidden=8)
    router = Router(5, 4, top_k=k, load_balance_weight=0.5, z_loss_weight=0.1)
    x = torch.randn(40, 5)
    logits = g(x)
    _, aux = router(x, logits)
    expected = _numpy_aux(logits.detach().double().numpy(), k or 1, 4, 0.5, 0.1)
    assert aux.dim() == 0 and math.isfinite(aux.item())
    assert aux.item() == pytest.approx(expected, rel=1e-5)
    aux.backward()
    grads = [p.grad for p in g.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum() for gr in grads) > 0


def test_balanced_routing_has_unit_load_balance_loss():
    router = Router(2, 4, top_k=1, load_balance_weight=1.0)
    logits = torch.eye(4).repeat(8, 1) * 5  # each expert wins a quarter of the tokens
    _, aux = router(torch.zeros(32, 2), logits)
    assert aux.item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.zeros(32, 4)
    collapsed[:, 0] = 5.0
    _, aux_collapsed = router(torch.zeros(32, 2), collapsed)
    assert aux_collapsed.item() > 2.5


def test_gate_errors_name_the_argument():
    with pytest.raises(ValueError, match="gate="):
        build_gate("mlp", 3, 2)
    with pytest.raises(ValueError, match="gating_activation"):
        Router(3, 2, "relu")
    with pytest.raises(ValueError, match="gating_activation"):
        apply_gating_activation(torch.zeros(2, 2), "tanh")
    with pytest.raises(ValueError, match="activation"):
        GRNGate(3, 2, activation="swish!")


# -- formulas recomputed by hand from the modules' own parameters ---------------------------


def _cox_de_boor(x: np.ndarray, lo: float, hi: float, grid_size: int, order: int) -> np.ndarray:
    """(N, P) -> (N, P, G+K) uniform B-spline bases by the plain Cox-de Boor recursion."""
    h = (hi - lo) / grid_size
    t = lo + h * np.arange(-order, grid_size + order + 1)
    xe = x[..., None]
    bases = ((xe >= t[:-1]) & (xe < t[1:])).astype(np.float64)
    for d in range(1, order + 1):
        left = (xe - t[: -(d + 1)]) / (t[d:-1] - t[: -(d + 1)]) * bases[..., :-1]
        right = (t[d + 1 :] - xe) / (t[d + 1 :] - t[1:-d]) * bases[..., 1:]
        bases = left + right
    return bases


_NP_ACTIVATIONS = {
    "silu": lambda v: v / (1.0 + np.exp(-v)),
    "elu": lambda v: np.where(v > 0, v, np.expm1(np.minimum(v, 0))),
    "relu": lambda v: np.maximum(v, 0.0),
}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _kan_by_hand(layer, x: np.ndarray, activation: str) -> np.ndarray:
    """y_q = sum_p w_base[q,p] act(x_p) + sum_p sum_i (w_spline[q,p,i] s[q,p]) B_i(x_p)."""
    bases = _cox_de_boor(x, layer.grid_lo, layer.grid_hi, layer.grid_size, layer.spline_order)
    coef = _np(layer.spline_weight) * _np(layer.spline_scaler)[..., None]  # (out, in, M)
    base = _NP_ACTIVATIONS[activation](x) @ _np(layer.base_weight).T
    return base + np.einsum("npm,qpm->nq", bases, coef)


def _linear(module: nn.Linear, x: np.ndarray) -> np.ndarray:
    return x @ _np(module.weight).T + _np(module.bias)


def _grkan_by_hand(gate: GRKANGate, x: np.ndarray, activations: tuple[str, str]) -> np.ndarray:
    """LayerNorm(skip(h) + GLU(KAN2(KAN1(h)))), h = ReLU(pre(x)), from the gate's parameters."""
    h = np.maximum(_linear(gate.pre, x), 0.0)
    u = _kan_by_hand(gate.layer2, _kan_by_hand(gate.layer1, h, activations[0]), activations[1])
    g = _linear(gate.glu_value, u) / (1.0 + np.exp(-_linear(gate.glu_gate, u)))
    z = _linear(gate.skip, h) + g
    z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
    return z * _np(gate.norm.weight) + _np(gate.norm.bias)


def test_grkan_gate_is_the_gated_residual_formula_with_kan_layers():
    """Independent recomputation (numpy float64, Cox-de Boor) of the whole GRKAN gate.

    The LayerNorm's affine parameters and the KAN scalers are randomised so that none of the
    terms is an identity; changing ``kan_activations`` alone must change the output.
    """
    x = torch.randn(64, 3) * 1.5
    outputs = {}
    state = None
    for acts in (("silu", "elu"), ("elu", "relu")):
        torch.manual_seed(1)
        gate = GRKANGate(3, 4, hidden=8, kan_activations=acts)
        if state is None:
            with torch.no_grad():
                for p in gate.parameters():
                    p.add_(torch.randn_like(p) * 0.3)
            state = gate.state_dict()
        gate.load_state_dict(state)  # the same numbers, only the activations differ
        got = gate(x)
        np.testing.assert_allclose(_np(got), _grkan_by_hand(gate, _np(x), acts), atol=2e-5)
        outputs[acts] = got
    a, b = outputs.values()
    assert (a - b).abs().max() > 1e-2, "kan_activations had no effect on the gate output"


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_moe_output_is_the_gated_sum_over_the_transformed_input(activation):
    """y = sum_e a_e(x~) E_e(x~), x~ = w * x, a = softmax|sigmoid(gate(x~)), by hand.

    The input-transform weights are set away from their initial ones, so a gate or expert
    that skipped the transform would fail; the two gating activations must give different y.
    """
    torch.manual_seed(2)
    moe = MoE(nn.Linear(6, 2), n_experts=3, gate="linear", gating_activation=activation)
    moe_t = MoE(
        nn.Linear(6, 2),
        n_experts=3,
        gate="linear",
        gating_activation=activation,
        input_transform=True,
    )
    moe_t.load_state_dict(
        {**moe.state_dict(), "input_weight": torch.rand(6) * 2 - 0.5}, strict=True
    )
    x = torch.randn(20, 6)
    for module in (moe, moe_t):
        y, weights = module(x, return_gates=True)
        xt = _np(x) * (_np(module.input_weight) if module.input_weight is not None else 1.0)
        logits = _linear(module.gate.proj, xt)
        if activation == "softmax":
            e = np.exp(logits - logits.max(-1, keepdims=True))
            a = e / e.sum(-1, keepdims=True)
        else:
            a = 1.0 / (1.0 + np.exp(-logits))
        outs = np.stack([_linear(expert, xt) for expert in module.experts], axis=-1)
        np.testing.assert_allclose(_np(weights), a, atol=1e-6)
        np.testing.assert_allclose(_np(y), (outs * a[:, None, :]).sum(-1), atol=1e-5)
    assert (moe(x) - moe_t(x)).abs().max() > 1e-2, "the input transform had no effect"
    other = "sigmoid" if activation == "softmax" else "softmax"
    twin = MoE(nn.Linear(6, 2), n_experts=3, gate="linear", gating_activation=other)
    twin.load_state_dict(moe.state_dict())
    assert (moe(x) - twin(x)).abs().max() > 1e-2, "gating_activation had no effect"
