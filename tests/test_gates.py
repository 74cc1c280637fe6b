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
