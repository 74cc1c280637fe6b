"""MoE / KAMoE / GatedSequential: combination, experts, sequences, errors, gradients."""

import copy
import warnings

import pytest
import torch
from torch import nn

from kanmoe.model.experts import KANExpert, MLPExpert, RNNExpert
from kanmoe.model.layers import KANLinear
from kanmoe.model.moe import GatedSequential, KAMoE, MoE, moe_layers, total_aux_loss


@pytest.fixture(autouse=True)
def _small_and_seeded():
    """Tiny models run fastest on one thread (and do not fight other test processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _manual_mixture(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """y = Σ_e a_e · E_e(w ⊙ x), recomputed from the parts."""
    xt = x * moe.input_weight if moe.input_weight is not None else x
    _, weights = moe(x, return_gates=True)
    outs = [e(xt) for e in moe.experts]
    return sum(weights[..., i : i + 1] * out for i, out in enumerate(outs))


@pytest.mark.parametrize("gate", ["linear", "grn", "grkan"])
def test_output_is_weighted_sum_of_experts(gate):
    moe = MoE(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), n_experts=3, gate=gate)
    with torch.no_grad():
        moe.input_weight = nn.Parameter(torch.tensor([0.5, 2.0, -1.0, 1.5]))
    x = torch.randn(10, 4)
    torch.testing.assert_close(moe(x), _manual_mixture(moe, x))


def test_one_expert_softmax_moe_equals_its_expert():
    """n_experts=1 + softmax gives weight exactly 1, so y is the expert's output on x."""
    moe = MoE(nn.Sequential(nn.Linear(5, 3), nn.ReLU()), n_experts=1, gate="grkan")
    x = torch.randn(20, 5)
    y, weights = moe(x, return_gates=True)
    assert torch.equal(weights, torch.ones(20, 1))
    assert torch.equal(y, moe.experts[0](x))
    # with the input transform on, the expert sees w ⊙ x
    kamoe = KAMoE(nn.Linear(5, 3), n_experts=1)
    with torch.no_grad():
        kamoe.input_weight.copy_(torch.linspace(-1, 2, 5))
    torch.testing.assert_close(kamoe(x), kamoe.experts[0](x * kamoe.input_weight))


def test_experts_are_independent_fresh_copies():
    template = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = [p.clone() for p in template.parameters()]
    moe = MoE(template, n_experts=3)
    w = [e[0].weight for e in moe.experts]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert all(p is not q for p in template.parameters() for q in moe.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, template.parameters(), strict=True))
    assert moe.expert_names == ["expert_0", "expert_1", "expert_2"]


@pytest.mark.parametrize("basis", ["bspline", "rbf", "linear"])
def test_kan_experts_are_reinitialised(basis):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "parameters stay identical" warning
        moe = MoE(KANLinear(3, 2, basis=basis), n_experts=3)
    a, b = (dict(e.named_parameters()) for e in moe.experts[:2])
    assert all(not torch.equal(a[k], b[k]) for k in a)


def test_unknown_parameters_warn_and_factory_avoids_it():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return x * self.w

    with pytest.warns(UserWarning, match="identical"):
        MoE(Scale(), n_experts=2, in_features=3, gate="linear")
    moe = MoE(Scale, n_experts=2, in_features=3, expert_names=("low", "high"), gate="linear")
    assert not torch.equal(moe.experts[0].w, moe.experts[1].w)
    assert moe.expert_names == ["low", "high"]


def test_keras_readme_examples():
    n_ahead = 4
    x = torch.randn(8, 10)
    model = GatedSequential(
        KAMoE(nn.Sequential(nn.Linear(10, 100), nn.ReLU()), n_experts=10),
        nn.Linear(100, 100),
        nn.ReLU(),
        nn.Linear(100, n_ahead),
    )
    y, gates = model(x, return_gates=True)
    assert y.shape == (8, n_ahead) and gates["moe"].shape == (8, 10)
    assert torch.equal(model(x), y)

    base_model = nn.Sequential(
        nn.Linear(10, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 100)
    )
    model = GatedSequential(KAMoE(base_model, n_experts=10), nn.ReLU(), nn.Linear(100, n_ahead))
    assert model(x).shape == (8, n_ahead)

    # the notebooks' stacks: MoE / KAMoE over Dense(16, relu) or KANLinear(16), 2 layers
    for make in (lambda d: MLPExpert(d, hidden=(16,)), lambda d: KANLinear(d, 16)):
        for variant in (MoE, KAMoE):
            stack = GatedSequential(variant(make(10)), variant(make(16)), nn.Linear(16, 1))
            y, gates = stack(x, return_gates=True)
            assert y.shape == (8, 1) and list(gates) == ["moe", "moe_1"]


def test_gated_sequential_names_are_unique_and_match_moe_layers():
    model = GatedSequential(
        MoE(nn.Linear(3, 4), name="router"),
        MoE(nn.Linear(4, 4)),
        MoE(nn.Linear(4, 4), name="router"),
        MoE(nn.Linear(4, 2)),
    )
    _, gates = model(torch.randn(5, 3), return_gates=True)
    assert list(gates) == ["router", "moe", "router_1", "moe_1"]
    assert [name for name, _ in moe_layers(model)] == list(gates)
    assert [m for _, m in moe_layers(model)] == [m for m in model if isinstance(m, MoE)]
    assert list(moe_layers(model[0])) == [("router", model[0])]


def test_sequence_expert_keeping_time_is_gated_per_step():
    for cell in ("gru", "lstm"):
        moe = KAMoE(RNNExpert(cell, 3, 8, return_sequences=True), n_experts=4)
        y, weights = moe(torch.randn(5, 7, 3), return_gates=True)
        assert moe.gate_input == "all"
        assert y.shape == (5, 7, 8) and weights.shape == (5, 7, 4)
        torch.testing.assert_close(weights.sum(-1), torch.ones(5, 7))


def test_per_step_gating_mixes_each_step_with_its_own_weights():
    moe = KAMoE(RNNExpert("gru", 3, 5, return_sequences=True), n_experts=3)
    x = torch.randn(4, 6, 3)
    torch.testing.assert_close(moe(x), _manual_mixture(moe, x))


def test_window_gate_on_expert_keeping_time_weights_every_step_alike():
    moe = MoE(RNNExpert("lstm", 3, 5, return_sequences=True), n_experts=3, gate_input="last")
    x = torch.randn(4, 6, 3)
    y, weights = moe(x, return_gates=True)
    assert y.shape == (4, 6, 5) and weights.shape == (4, 3)
    expected = sum(weights[:, None, i : i + 1] * e(x) for i, e in enumerate(moe.experts))
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_sequence_expert_dropping_time_gates_on_last_step(cell):
    moe = MoE(RNNExpert(cell, 3, 8), n_experts=4)
    assert moe.gate_input == "last"
    x = torch.randn(5, 7, 3)
    y, weights = moe(x, return_gates=True)
    assert y.shape == (5, 8) and weights.shape == (5, 4)
    x2 = x.clone()
    x2[:, :-1] += 1.0  # earlier steps change the experts' output, not the gate
    y2, weights2 = moe(x2, return_gates=True)
    assert torch.equal(weights, weights2) and not torch.allclose(y, y2)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_sequence_flatten_gate_reads_the_whole_window(cell):
    moe = KAMoE(RNNExpert(cell, 3, 8), n_experts=4, gate_input="flatten", seq_len=7)
    assert moe.gate.pre.in_features == 21
    x = torch.randn(5, 7, 3)
    y, weights = moe(x, return_gates=True)
    assert y.shape == (5, 8) and weights.shape == (5, 4)
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert not torch.allclose(weights, moe(x2, return_gates=True)[1])


def test_flatten_expert_without_rnn_defaults_to_flatten_gate():
    moe = MoE(nn.Sequential(nn.Flatten(), nn.Linear(21, 4)), in_features=3, seq_len=7)
    assert moe.gate_input == "flatten"
    assert moe(torch.randn(2, 7, 3)).shape == (2, 4)


def test_raw_torch_rnn_expert_uses_first_output():
    moe = MoE(nn.LSTM(3, 6, batch_first=True), n_experts=3)
    y, weights = moe(torch.randn(4, 5, 3), return_gates=True)
    assert y.shape == (4, 5, 6) and weights.shape == (4, 5, 3)


def test_paper_sequence_model_shapes():
    """KAMoE(GRU(100, return_sequences=True)) -> GRU(100) -> Linear(h), smaller."""
    model = GatedSequential(
        KAMoE(RNNExpert("gru", 4, 12, return_sequences=True), n_experts=3),
        RNNExpert("gru", 12, 12),
        nn.Linear(12, 6),
    )
    y, gates = model(torch.randn(3, 9, 4), return_gates=True)
    assert y.shape == (3, 6) and gates["moe"].shape == (3, 9, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_experts": 0}, "n_experts"),
        ({"gate": "attention"}, "gate="),
        ({"top_k": 4}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"gating_activation": "relu"}, "gating_activation"),
        ({"gate_input": "first"}, "gate_input"),
        ({"gate_input": "flatten"}, "seq_len"),
        ({"expert_names": ["a", "a", "b"]}, "expert_names"),
        ({"z_loss_weight": -1.0}, "z_loss_weight"),
        ({"gate": "grn", "gate_kan_kwargs": {"grid_size": 3}}, "gate_kan_kwargs"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(nn.Linear(3, 2), **{"n_experts": 3, **kwargs})


def test_constructor_errors_for_shapes():
    class NoWidth(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="in_features"):
        MoE(NoWidth())
    with pytest.raises(ValueError, match="in_features"):
        MoE(nn.Linear(3, 2), in_features=4)  # dummy probe fails: wrong width
    with pytest.raises(ValueError, match="gate_input='all'"):
        MoE(RNNExpert("gru", 3, 4), gate_input="all")
    with pytest.raises(ValueError, match="expert"):
        MoE("not a module")
    with pytest.raises(ValueError, match="expects input"):
        MoE(RNNExpert("gru", 3, 4))(torch.randn(2, 3))


@pytest.mark.parametrize("gate", ["linear", "grn", "grkan"])
def test_gradients_reach_gate_experts_and_input_transform(gate):
    moe = KAMoE(MLPExpert(4, hidden=(8,), out_features=1), n_experts=3, gate=gate)
    moe(torch.randn(16, 4)).square().mean().backward()
    for name, p in moe.named_parameters():
        if name.startswith("router"):
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for part in (moe.gate, *moe.experts):
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0
    assert moe.input_weight.grad.abs().sum() > 0


def test_top_k_moe_aux_loss_training_only_and_copyable():
    model = GatedSequential(
        MoE(nn.Linear(4, 6), n_experts=4, top_k=2, noisy_gating=True, z_loss_weight=1e-3),
        nn.ReLU(),
        MoE(nn.Linear(6, 1), n_experts=4, top_k=1, name="head"),
    )
    model.train()
    y, gates = model(torch.randn(32, 4), return_gates=True)
    for weights, k in zip(gates.values(), (2, 1), strict=True):
        assert ((weights > 0).sum(-1) == k).all()
    aux = total_aux_loss(model)
    assert aux.requires_grad and torch.isfinite(aux) and aux > 0
    torch.testing.assert_close(aux, model[0].aux_loss + model[2].aux_loss)
    (y.square().mean() + aux).backward()
    gate_grads = [p.grad for p in model[0].gate.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in gate_grads)
    copy.deepcopy(model)  # aux_loss holds a graph; copies must still work
    model.eval()
    before = model[0].aux_loss
    model(torch.randn(8, 4))
    assert model[0].aux_loss is before  # eval forward mutates nothing


def test_two_expert_layer_norm_gate_warns_and_can_be_switched_off():
    x = torch.randn(64, 3)
    with pytest.warns(UserWarning, match="gate_layer_norm"):
        moe = MoE(nn.Linear(3, 1), n_experts=2, gate="grn")
    logits = moe.gate(x).detach()  # LayerNorm of two numbers is ±1: a step function
    assert ((logits.abs() - 1).abs() < 0.05).float().mean() > 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moe = MoE(nn.Linear(3, 1), n_experts=2, gate="grn", gate_layer_norm=False)
    logits = moe.gate(x).detach()
    assert ((logits.abs() - 1).abs() < 0.05).float().mean() < 0.5


def test_dense_moe_has_zero_aux_loss():
    moe = MoE(nn.Linear(4, 2), n_experts=3)
    moe(torch.randn(8, 4))
    assert total_aux_loss(moe).item() == 0.0
    assert total_aux_loss(nn.Linear(2, 2)).item() == 0.0


def test_kamoe_of_kan_experts_in_float64():
    moe = KAMoE(KANExpert([3, 4, 2], grid_size=3), n_experts=3, gate_hidden=4).double()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y, weights = moe(x, return_gates=True)
    assert y.dtype == weights.dtype == torch.float64 and y.shape == (6, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(6, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda t: moe(t), (x,), eps=1e-6, atol=1e-5)


def test_each_moe_gate_trains_end_to_end():
    """Piecewise-linear target (two regimes): no single linear map fits it, so the loss can
    only fall far below the best linear fit if the gate learns to route."""
    x = torch.rand(256, 2) * 2 - 1
    y = torch.where(x[:, :1] > 0, 2 * x[:, 1:], -x[:, 1:] + 0.5)
    design = torch.cat([x, torch.ones(256, 1)], 1).double()
    best_linear = (design @ torch.linalg.lstsq(design, y.double()).solution - y).square().mean()
    for gate in ("linear", "grn", "grkan"):
        torch.manual_seed(1)
        moe = MoE(nn.Linear(2, 1), n_experts=3, gate=gate, input_transform=True)
        opt = torch.optim.Adam(moe.parameters(), lr=0.03)
        first = nn.functional.mse_loss(moe(x), y).item()
        for _ in range(150):
            opt.zero_grad()
            loss = nn.functional.mse_loss(moe(x), y)
            loss.backward()
            opt.step()
        assert loss.item() < 0.1 * first, (gate, first, loss.item())
        assert loss.item() < 0.2 * best_linear.item(), (gate, best_linear.item(), loss.item())


def test_forward_exports_with_dynamic_batch():
    """No data-dependent Python in forward: torch.export traces it with a symbolic batch."""
    model = GatedSequential(
        MoE(nn.Linear(4, 6), n_experts=3, top_k=2), nn.ReLU(), nn.Linear(6, 1)
    ).eval()

    class WithGates(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x, return_gates=True)

    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(WithGates(), (torch.randn(5, 4),), dynamic_shapes=({0: batch},))
    x = torch.randn(9, 4)
    y, gates = exported.module()(x)
    y_ref, gates_ref = model(x, return_gates=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gates["moe"], gates_ref["moe"])
