"""End-to-end ONNX export: torch ServableModel -> ModelProto -> ORT / ReferenceEvaluator.

Four small models cover every basis (bspline, rbf, linear lookup), MLP and KAN experts,
linear / GRN / GRKAN gates, dense and top-k routing, two MoE layers, mixed spline orders
and a GRU/LSTM sequence KAMoE. Each is exported once per module (exports take seconds).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import inliner

from kanmoe.errors import ExportError, RunDirError
from kanmoe.export import onnx_ops
from kanmoe.export.exporter import export_model, finish_model, read_metadata
from kanmoe.export.repository import config_pbtxt, export_run, write_repository_entry
from kanmoe.export.verify import ort_session, reference_evaluator, verify_model

logging.getLogger("torch.onnx").setLevel(logging.ERROR)

F = 5
SEQ = 4
BATCHES = (1, 7, 256)


def _servable(net, seq_len=None, n_targets=1):
    from kanmoe.model.run import build_servable

    torch.manual_seed(0)
    return build_servable(
        net,
        [f"feat_{i}" for i in range(F)],
        [f"target_{i}" for i in range(n_targets)],
        x_mean=np.linspace(-3, 3, F),
        x_std=np.linspace(0.5, 4, F),
        y_mean=[2.0] * n_targets,
        y_std=[1.5] * n_targets,
        seq_len=seq_len,
        metrics={"test": {"r2": 0.5}},
        config={"name": "test"},
        config_hash="abc123",
    )


def _build(case: str):
    from kanmoe.model.experts import KANExpert, MLPExpert, RNNExpert
    from kanmoe.model.layers import KANLinear
    from kanmoe.model.moe import GatedSequential, KAMoE, MoE

    torch.manual_seed(1)
    if case == "kamoe_kan_bspline":  # GRKAN gate (K=3) + experts with K=2: mixed orders
        net = GatedSequential(
            KAMoE(lambda: KANExpert([F, 6, 1], spline_order=2), n_experts=3, in_features=F)
        )
        return _servable(net)
    if case == "moe_kan_rbf_grn_topk":
        net = GatedSequential(
            MoE(lambda: KANExpert([F, 6, 2], basis="rbf"), n_experts=4, gate="grn", top_k=2,
                in_features=F),
        )  # fmt: skip
        return _servable(net, n_targets=2)
    if case == "two_moe_mlp_linear_lookup":
        net = GatedSequential(
            MoE(lambda: MLPExpert(F, (8,), 6), n_experts=3, gate="linear", in_features=F,
                name="first"),
            MoE(lambda: KANLinear(6, 3, basis="linear", num_control_points=8), n_experts=2,
                gate="linear", top_k=1, in_features=6, name="second"),
            torch.nn.Linear(3, 1),
        )  # fmt: skip
        return _servable(net)
    if case == "seq_kamoe_gru_lstm":
        net = GatedSequential(
            KAMoE(lambda: RNNExpert("gru", F, 6, return_sequences=True), n_experts=3,
                  in_features=F, seq_len=SEQ),
            RNNExpert("lstm", 6, 5),
            torch.nn.Linear(5, 1),
        )  # fmt: skip
        return _servable(net, seq_len=SEQ)
    raise KeyError(case)


CASES = (
    "kamoe_kan_bspline",
    "moe_kan_rbf_grn_topk",
    "two_moe_mlp_linear_lookup",
    "seq_kamoe_gru_lstm",
)
EXPECTED_OPS = {
    "kamoe_kan_bspline": {"BSplineBasis"},
    "moe_kan_rbf_grn_topk": {"RBFBasis"},
    "two_moe_mlp_linear_lookup": {"LinearSplineLookup"},
    "seq_kamoe_gru_lstm": {"BSplineBasis"},
}


class _Exports:
    """Each case is built and exported at most once per test module."""

    def __init__(self) -> None:
        self._done: dict[str, tuple] = {}

    def __call__(self, case: str) -> tuple:
        if case not in self._done:
            servable = _build(case)
            self._done[case] = (case, servable, export_model(servable))
        return self._done[case]


@pytest.fixture(scope="module")
def exports() -> _Exports:
    return _Exports()


@pytest.fixture(params=CASES)
def exported(request, exports):
    return exports(request.param)


def _inputs(servable, batch, seed, seq=SEQ):
    rng = np.random.default_rng(seed)
    shape = (batch, seq, F) if servable.is_sequence else (batch, F)
    x = rng.standard_normal(shape) * servable.x_std.numpy() + servable.x_mean.numpy()
    return x.astype(np.float32)


def _torch(servable, x):
    with torch.no_grad():
        y, gates = servable(torch.from_numpy(x))
    return y.numpy(), {k: v.numpy() for k, v in gates.items()}


def _gate_names(model):
    return read_metadata(model)["gate_outputs"]


def _expert_names(model):
    return read_metadata(model)["expert_outputs"]


def test_ort_matches_torch_for_dynamic_batch(exported):
    _, servable, model = exported
    sess = ort_session(model)
    gate_names = _gate_names(model)
    assert len(gate_names) == len(servable.expert_names) >= 1
    for i, batch in enumerate(BATCHES):
        x = _inputs(servable, batch, seed=i)
        y, gates = _torch(servable, x)
        names = [o.name for o in model.graph.output]
        outs = dict(zip(names, sess.run(None, {"input": x}), strict=True))
        assert outs["output"].shape == (batch, len(servable.target_names))
        np.testing.assert_allclose(outs["output"], y, atol=1e-5 * max(1, np.abs(y).max()))
        for layer, name in gate_names.items():
            assert outs[name].shape == gates[layer].shape
            assert outs[name].shape[-1] == len(servable.expert_names[layer])
            np.testing.assert_allclose(outs[name], gates[layer], atol=1e-5)
        with torch.no_grad():
            _, _, experts = servable.forward_explained(torch.from_numpy(x))
        for layer, name in _expert_names(model).items():
            want = experts[layer].numpy()
            assert outs[name].shape == want.shape
            assert want.shape[-2] == len(servable.expert_names[layer])  # (B, [T,] E, out)
            np.testing.assert_allclose(outs[name], want, atol=1e-5 * max(1, np.abs(want).max()))


def test_reference_evaluator_matches_torch(exported):
    _, servable, model = exported
    x = _inputs(servable, 7, seed=11)
    y, gates = _torch(servable, x)
    gate_names = _gate_names(model)
    outs = reference_evaluator(model).run(None, {"input": x})
    np.testing.assert_allclose(outs[0], y, atol=1e-5 * max(1, np.abs(y).max()))
    for (layer, _), got in zip(gate_names.items(), outs[1 : 1 + len(gate_names)], strict=True):
        np.testing.assert_allclose(got, gates[layer], atol=1e-5)


def test_graph_has_kanmoe_nodes_with_bodies(exported):
    case, _, model = exported
    ops_used = {n.op_type for n in onnx_ops.kanmoe_nodes(model)}
    assert ops_used == EXPECTED_OPS[case]
    assert ops_used <= {f.name for f in model.functions if f.domain == onnx_ops.DOMAIN}
    assert model.ir_version == onnx_ops.IR_VERSION
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[onnx_ops.DOMAIN] == 1 and opsets[""] == onnx_ops.ONNX_OPSET
    onnx.checker.check_model(model, full_check=True)
    onnx_ops.check_functions(model)
    # input/outputs named per the contract, batch axis symbolic
    (inp,) = model.graph.input
    assert inp.name == "input"
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    names = [o.name for o in model.graph.output]
    assert names[0] == "output"
    assert names[1:] == [*_gate_names(model).values(), *_expert_names(model).values()]


def test_experts_sharing_an_input_get_one_merged_lookup(exports):
    """The second MoE's two KANLinear experts (3 outputs each) read one tensor: one node."""
    _, _, model = exports("two_moe_mlp_linear_lookup")
    lookups = [n for n in model.graph.node if n.op_type == onnx_ops.OP_LOOKUP]
    (merged,) = lookups
    inits = {t.name: t for t in model.graph.initializer}
    assert list(inits[merged.input[1]].dims) == [6, 8, 2 * 3]
    (split,) = [n for n in model.graph.node if n.op_type == "Split"]
    assert list(split.input) == [merged.output[0], split.input[1]] and len(split.output) == 2
    # the per-expert tables are gone; the parity tests above run this very graph
    assert not any(name.endswith("control_points") for name in inits)


def test_lookups_with_different_inputs_stay_apart():
    from kanmoe.export.graph_passes import merge_shared_lookups

    rng = np.random.default_rng(0)
    tables = [rng.normal(size=(2, 5, 3)).astype(np.float32) for _ in range(3)]
    nodes = [
        onnx.helper.make_node(onnx_ops.OP_LOOKUP, [x, f"C{i}"], [f"Y{i}"], domain=onnx_ops.DOMAIN,
                              grid_lo=-1.0, grid_hi=1.0)
        for i, x in enumerate(["X", "X", "Z"])
    ]  # fmt: skip
    nodes.append(onnx.helper.make_node("Sum", ["Y0", "Y1", "Y2"], ["Y"]))
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        nodes, "g", [vi(n, onnx.TensorProto.FLOAT, ["B", 2]) for n in ("X", "Z")],
        [vi("Y", onnx.TensorProto.FLOAT, ["B", 3])],
        [onnx.numpy_helper.from_array(t, f"C{i}") for i, t in enumerate(tables)],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid("", onnx_ops.ONNX_OPSET),
        onnx.helper.make_opsetid(onnx_ops.DOMAIN, 1)])  # fmt: skip
    onnx_ops.attach_functions(model)
    feeds = {"X": rng.uniform(-2, 2, (9, 2)).astype(np.float32),
             "Z": rng.uniform(-2, 2, (9, 2)).astype(np.float32)}  # fmt: skip
    before = ort_session(model).run(None, feeds)[0]
    assert merge_shared_lookups(model) == 1
    ops_after = [n.op_type for n in model.graph.node]
    assert ops_after.count(onnx_ops.OP_LOOKUP) == 2 and "Split" in ops_after
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(ort_session(model).run(None, feeds)[0], before, atol=1e-6)
    assert merge_shared_lookups(model) == 0  # nothing left to merge


def test_metadata_round_trips(exported):
    _, servable, model = exported
    meta = read_metadata(onnx.load_from_string(model.SerializeToString()))
    assert meta["feature_names"] == servable.feature_names
    assert meta["target_names"] == servable.target_names
    assert meta["expert_names"] == servable.expert_names
    assert meta["metrics"] == {"test": {"r2": 0.5}}
    assert meta["config_hash"] == "abc123"
    assert meta["seq_len"] == servable.seq_len
    from kanmoe import __version__

    assert meta["kanmoe_version"] == __version__


def test_gate_output_naming():
    from kanmoe.export.exporter import gate_output_names

    assert gate_output_names(["moe"]) == {"moe": "gate_weights"}
    assert gate_output_names(["first", "second.x"]) == {
        "first": "gate_weights_first",
        "second.x": "gate_weights_second_x",
    }


def test_two_moe_layers_named_outputs(exports):
    _, _, model = exports("two_moe_mlp_linear_lookup")
    assert [o.name for o in model.graph.output] == [
        "output",
        "gate_weights_first",
        "gate_weights_second",
        "expert_outputs_first",
        "expert_outputs_second",
    ]


def test_sequence_model_has_dynamic_seq_and_per_step_gates(exports):
    _, servable, model = exports("seq_kamoe_gru_lstm")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "seq", F]
    x = _inputs(servable, 3, seed=5, seq=SEQ + 3)  # a longer window than at export time
    y, gates = _torch(servable, x)
    out, gate = ort_session(model).run(["output", "gate_weights"], {"input": x})
    np.testing.assert_allclose(out, y, atol=1e-5 * max(1, np.abs(y).max()))
    assert gate.shape == (3, SEQ + 3, 3)
    np.testing.assert_allclose(gate, next(iter(gates.values())), atol=1e-5)


def test_mixed_spline_orders_use_overloads(exports):
    _, _, model = exports("kamoe_kan_bspline")
    assert {f.overload for f in model.functions} == {"k2", "k3"}
    # the inlined model (what the ReferenceEvaluator runs) has no custom nodes left
    assert not onnx_ops.kanmoe_nodes(inliner.inline_local_functions(model))


def test_verify_model_reports_and_fails_on_mismatch(exported):
    _, servable, model = exported
    report = verify_model(servable, model, batch_sizes=(1, 7))
    assert report.ok and report.max_error < 1e-5
    assert {c.runtime for c in report.cases} == {"ort", "ref"}
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    with torch.no_grad():  # perturb torch side: the ONNX file no longer matches
        servable.y_mean += 0.01
        try:
            with pytest.raises(ExportError, match="differs from torch"):
                verify_model(servable, broken, batch_sizes=(1,), reference=False)
        finally:
            servable.y_mean -= 0.01


def test_repository_entry_layout(tmp_path, exports):
    _, servable, model = exports("two_moe_mlp_linear_lookup")
    written = write_repository_entry(model, tmp_path, "demo", version=None)
    assert written.version == 1
    (tmp_path.parent / f"{tmp_path.name}_plain").mkdir()  # what a plain mkdir gives here
    plain_mode = (tmp_path.parent / f"{tmp_path.name}_plain").stat().st_mode & 0o777
    assert (tmp_path / "demo").stat().st_mode & 0o777 == plain_mode  # not mkdtemp's 0700
    cfg = (tmp_path / "demo" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in cfg and "max_batch_size: 1024" in cfg
    assert 'name: "input"' in cfg and "dims: [ 5 ]" in cfg and "TYPE_FP32" in cfg
    assert 'name: "gate_weights_second"' in cfg and "dynamic_batching" in cfg
    info = json.loads((written.version_dir / "kanmoe.json").read_text())
    assert info["feature_names"] == servable.feature_names
    assert info["expert_names"] == servable.expert_names
    assert info["outputs"]["gate_weights_first"] == [3]
    x = _inputs(servable, 4, seed=3)
    loaded = onnx.load(written.onnx_path)
    np.testing.assert_allclose(
        ort_session(loaded).run(None, {"input": x})[0], _torch(servable, x)[0], atol=1e-4
    )
    assert write_repository_entry(model, tmp_path, "demo").version == 2  # next free version
    with pytest.raises(ExportError, match="already exists"):
        write_repository_entry(model, tmp_path, "demo", version=1)
    write_repository_entry(model, tmp_path, "demo", version=1, force=True)
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["1", "2", "config.pbtxt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp dirs left


def test_sequence_config_has_dynamic_dims(exports):
    _, _, model = exports("seq_kamoe_gru_lstm")
    text = config_pbtxt(model, "seq", 64)
    assert "dims: [ -1, 5 ]" in text and "dims: [ -1, 3 ]" in text


def test_failed_write_leaves_nothing(tmp_path, exports):
    _, _, model = exports("kamoe_kan_bspline")
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    with pytest.raises(ExportError, match="not float32"):
        write_repository_entry(bad, tmp_path / "repo", "demo")
    assert list((tmp_path / "repo").iterdir()) == []
    with pytest.raises(ExportError, match="--name"):
        write_repository_entry(model, tmp_path / "repo2", "../escape")
    assert not (tmp_path / "repo2").exists()


def test_missing_function_body_is_an_export_error(exports):
    _, servable, model = exports("moe_kan_rbf_grn_topk")
    from kanmoe.export.exporter import metadata_of

    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.functions[:]
    onnx_ops.check_functions(model)
    with pytest.raises(ValueError, match="no FunctionProto"):
        onnx_ops.check_functions(stripped)
    # finish_model re-attaches bodies, so a proto straight from torch always gets them
    finish_model(stripped, metadata_of(servable, {"moe": "gate_weights"}))
    onnx_ops.check_functions(stripped)


@pytest.mark.parametrize("files", [(), ("config.yaml",), ("config.yaml", "preprocessing.json")])
def test_untrained_run_dir_is_a_clear_error_and_writes_nothing(tmp_path, files):
    run = tmp_path / "run"
    run.mkdir()
    for name in files:
        (run / name).write_text("{}\n")
    repo = tmp_path / "repo"
    with pytest.raises(RunDirError, match="missing"):
        export_run(run, repo, "m", version=1, check=True)
    assert not repo.exists()


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(RunDirError, match="not found"):
        export_run(tmp_path / "nope", tmp_path / "repo", "m")
    assert not (tmp_path / "repo").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real (1-epoch, tiny) California Housing KAMoE run dir written by the trainer."""
    from kanmoe.model.config import apply_overrides, read_yaml, validate_config
    from kanmoe.model.training import train_run
    from kanmoe.paths import CONFIGS_DIR

    raw = apply_overrides(
        read_yaml(CONFIGS_DIR / "california_kamoe.yaml"),
        ["train.epochs=1", "data.max_rows=2000", "model.hidden=[8]", "model.gate_hidden=8"],
    )
    run = tmp_path_factory.mktemp("runs") / "tiny_kamoe"
    train_run(validate_config(raw), run, write_plots=False)
    return run


def test_cli_export_with_check(tmp_path, trained_run):
    from typer.testing import CliRunner

    from kanmoe.cli import app

    repo = tmp_path / "repo"
    args = ["export", str(trained_run), "--repository", str(repo), "--name", "ca", "--check"]
    result = CliRunner().invoke(app, [*args, "--version", "3"])
    assert result.exit_code == 0, result.output
    assert "max scaled error" in result.output and "real" in result.output
    model = onnx.load(repo / "ca" / "3" / "model.onnx")
    meta = read_metadata(model)
    assert meta["feature_names"][0] == "MedInc" and meta["target_names"] == ["MedHouseVal"]
    assert "test" in meta["metrics"] and meta["config_hash"]
    assert json.loads((repo / "ca" / "3" / "kanmoe.json").read_text())["version"] == 3
    # the same version again without --force: one-line error, exit 2, old files kept
    again = CliRunner().invoke(app, [*args, "--version", "3"])
    assert again.exit_code == 2 and "already exists" in again.output
    assert (repo / "ca" / "3" / "model.onnx").is_file()


def test_cli_export_of_untrained_dir_exits_2(tmp_path):
    from typer.testing import CliRunner

    from kanmoe.cli import app

    (tmp_path / "run").mkdir()
    repo = tmp_path / "repo"
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--repository", str(repo)])
    assert result.exit_code == 2
    assert "error:" in result.output and "missing config.yaml" in result.output
    assert not repo.exists()


def test_plain_kan_has_no_gate_outputs():
    from kanmoe.model.layers import KAN

    torch.manual_seed(2)
    servable = _servable(KAN([F, 4, 1], grid_size=4, spline_order=3))
    model = export_model(servable)
    assert [o.name for o in model.graph.output] == ["output"]
    assert read_metadata(model)["gate_outputs"] == {}
    assert {n.op_type for n in onnx_ops.kanmoe_nodes(model)} == {"BSplineBasis"}
    report = verify_model(servable, model, batch_sizes=(1, 7, 256))
    assert report.ok
    assert "gate_weights" not in config_pbtxt(model, "kan", 8)
