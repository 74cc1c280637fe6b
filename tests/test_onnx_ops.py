"""The ai.kanmoe function bodies against independent references (scipy BSpline, numpy).

Each model is built by hand: one ai.kanmoe node plus its FunctionProto, IR 10, and run in
ONNX Runtime and in onnx's ReferenceEvaluator.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, inliner
from onnx.reference import ReferenceEvaluator
from scipy.interpolate import BSpline

from kanmoe.export import onnx_ops as ops


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_ref(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ReferenceEvaluator(model).run(None, feeds)


def bspline_ref(x: np.ndarray, g: int, k: int, lo: float, hi: float) -> np.ndarray:
    """Cox–de Boor bases from scipy: uniform knots t_j = lo + (j - K) h, zero outside."""
    h = (hi - lo) / g
    t = lo + (np.arange(g + 2 * k + 1) - k) * h
    x64 = x.astype(np.float64)
    cols = [BSpline.basis_element(t[j : j + k + 2], extrapolate=False)(x64) for j in range(g + k)]
    out = np.nan_to_num(np.stack(cols, axis=-1))
    if k == 0:  # basis_element includes the right end of the last interval; B_{j,0} does not
        out[x64 >= t[-1]] = 0.0
    return out


def lookup_ref(x: np.ndarray, c: np.ndarray, lo: float, hi: float) -> np.ndarray:
    n_in, n_pts, n_out = c.shape
    pos = np.linspace(lo, hi, n_pts)
    x2 = x.reshape(-1, n_in).astype(np.float64)
    y = np.zeros((x2.shape[0], n_out))
    for p in range(n_in):
        for q in range(n_out):
            cp, xp = c[p, :, q].astype(np.float64), x2[:, p]
            v = np.interp(xp, pos, cp)
            step = pos[1] - pos[0]
            v = np.where(xp < lo, cp[0] + (xp - lo) * (cp[1] - cp[0]) / step, v)
            v = np.where(xp > hi, cp[-1] + (xp - hi) * (cp[-1] - cp[-2]) / step, v)
            y[:, q] += v
    return y.reshape(*x.shape[:-1], n_out)


def f32(v: float) -> float:
    """ONNX FLOAT attributes hold float32: references use the same grid ends."""
    return float(np.float32(v))


def _dtype_args(dtype):
    if dtype == np.float64:
        return TensorProto.DOUBLE, 1e-12
    return TensorProto.FLOAT, 2e-6


@pytest.mark.parametrize("layout", ops.BSPLINE_LAYOUTS)
@pytest.mark.parametrize(
    ("g", "k", "lo", "hi"),
    [(5, 3, -1.0, 1.0), (7, 2, -0.7, 1.3), (3, 1, 0.0, 4.0), (4, 0, -2.0, 2.0), (10, 4, -1.0, 1.0)],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bspline_matches_scipy(layout, g, k, lo, hi, dtype):
    elem, tol = _dtype_args(dtype)
    attrs = dict(grid_size=g, spline_order=k, grid_lo=lo, grid_hi=hi)
    model = ops.single_op_model(ops.OP_BSPLINE, attrs, ("B", 5), elem_type=elem, layout=layout)
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(g * 10 + k)
    span = hi - lo
    x = rng.uniform(lo - 0.6 * span, hi + 0.6 * span, (64, 5)).astype(dtype)
    ref = bspline_ref(x, g, k, f32(lo), f32(hi))
    for got in (run_ort(model, {"X": x})[0], run_ref(model, {"X": x})[0]):
        assert got.shape == (64, 5, g + k)
        assert got.dtype == dtype
        np.testing.assert_allclose(got, ref, atol=tol, rtol=0)
    # partition of unity inside the grid (a property scipy's reference does not rely on)
    inside = (x > lo) & (x < hi)
    got = run_ort(model, {"X": x})[0]
    np.testing.assert_allclose(got.sum(-1)[inside], 1.0, atol=10 * tol)


def test_bspline_on_knots_and_any_rank():
    g, k, lo, hi = 5, 3, -1.0, 1.0
    model = ops.single_op_model(
        ops.OP_BSPLINE,
        dict(grid_size=g, spline_order=k, grid_lo=lo, grid_hi=hi),
        ("B", "T", 3),
    )
    knots = (lo + (np.arange(g + 2 * k + 1) - k) * (hi - lo) / g).astype(np.float32)
    x = np.resize(np.concatenate([knots, np.nextafter(knots, np.float32(9))]), (2, 13, 3))
    x = x.astype(np.float32)
    for got in (run_ort(model, {"X": x})[0], run_ref(model, {"X": x})[0]):
        assert got.shape == (2, 13, 3, g + k)
        np.testing.assert_allclose(got, bspline_ref(x, g, k, lo, hi), atol=2e-6, rtol=0)


@pytest.mark.parametrize(("n", "lo", "hi"), [(8, -1.0, 1.0), (3, -2.5, 0.5), (12, 0.0, 1.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rbf_matches_numpy(n, lo, hi, dtype):
    elem, tol = _dtype_args(dtype)
    model = ops.single_op_model(
        ops.OP_RBF, dict(num_centers=n, grid_lo=lo, grid_hi=hi), ("B", 4), elem_type=elem
    )
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(n).uniform(lo - 1, hi + 1, (33, 4)).astype(dtype)
    mu = np.linspace(f32(lo), f32(hi), n)
    sigma = (f32(hi) - f32(lo)) / (n - 1)
    ref = np.exp(-(((x.astype(np.float64)[..., None] - mu) / sigma) ** 2))
    for got in (run_ort(model, {"X": x})[0], run_ref(model, {"X": x})[0]):
        assert got.shape == (33, 4, n)
        np.testing.assert_allclose(got, ref, atol=tol, rtol=0)


@pytest.mark.parametrize("layout", ops.LOOKUP_LAYOUTS)
@pytest.mark.parametrize(("n_in", "n_pts", "n_out"), [(4, 9, 3), (1, 2, 1), (6, 32, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lookup_matches_numpy_with_extrapolation(layout, n_in, n_pts, n_out, dtype):
    elem, tol = _dtype_args(dtype)
    lo, hi = -4.0, 4.0
    model = ops.single_op_model(
        ops.OP_LOOKUP,
        dict(grid_lo=lo, grid_hi=hi),
        ("B", "T", n_in),
        c_shape=(n_in, n_pts, n_out),
        elem_type=elem,
        lookup_layout=layout,
    )
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(n_pts)
    x = rng.uniform(-7, 7, (5, 3, n_in)).astype(dtype)
    x[0, 0, 0] = lo  # first control point exactly
    x[0, 1, 0] = hi  # last control point exactly
    c = rng.normal(size=(n_in, n_pts, n_out)).astype(dtype)
    ref = lookup_ref(x, c, lo, hi)
    for got in (run_ort(model, {"X": x, "C": c})[0], run_ref(model, {"X": x, "C": c})[0]):
        assert got.shape == (5, 3, n_out)
        np.testing.assert_allclose(got, ref, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("n_in", "n_out", "rows"),
    [
        (3, 2, ops.LOOKUP_CHUNK_ROWS + 1),  # narrow rows: blocks of LOOKUP_CHUNK_ROWS
        (3, 2, 3 * ops.LOOKUP_CHUNK_ROWS),  # no padding needed
        (64, 64, 200),  # wide rows: the element budget gives 64-row blocks
    ],
)
def test_chunked_lookup_block_path_matches_numpy(n_in, n_out, rows, dtype):
    """Batches bigger than one block go through the Scan (last block padded, then cut)."""
    assert ops.LOOKUP_BLOCK_ELEMENTS // (64 * 2 * 64) < 200 < ops.LOOKUP_CHUNK_ROWS
    elem, tol = _dtype_args(dtype)
    n_pts = 7
    model = ops.single_op_model(
        ops.OP_LOOKUP, dict(grid_lo=-1.0, grid_hi=2.0), ("B", "T", n_in),
        c_shape=(n_in, n_pts, n_out), elem_type=elem, lookup_layout="chunked",
    )  # fmt: skip
    scans = [n.op_type for f in model.functions for n in _all_nodes(f.node)]
    assert "Scan" in scans and "If" in scans
    rng = np.random.default_rng(rows)
    x = rng.uniform(-3, 4, (rows, 1, n_in)).astype(dtype)  # leading dims are flattened
    c = rng.normal(size=(n_in, n_pts, n_out)).astype(dtype)
    ref = lookup_ref(x, c, -1.0, 2.0)
    for got in (run_ort(model, {"X": x, "C": c})[0], run_ref(model, {"X": x, "C": c})[0]):
        assert got.shape == (rows, 1, n_out)
        np.testing.assert_allclose(got, ref, atol=10 * tol, rtol=10 * tol)


def _all_nodes(nodes):
    """Nodes including those inside If/Scan subgraphs."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g.node)


def _two_order_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", 4])
    n3 = helper.make_node(
        ops.OP_BSPLINE, ["X"], ["Y3"], domain=ops.DOMAIN,
        grid_size=5, spline_order=3, grid_lo=-1.0, grid_hi=1.0,
    )  # fmt: skip
    n1 = helper.make_node(
        ops.OP_BSPLINE, ["X"], ["Y1"], domain=ops.DOMAIN,
        grid_size=4, spline_order=1, grid_lo=-2.0, grid_hi=1.0,
    )  # fmt: skip
    outs = [
        helper.make_tensor_value_info("Y3", TensorProto.FLOAT, ["B", 4, 8]),
        helper.make_tensor_value_info("Y1", TensorProto.FLOAT, ["B", 4, 5]),
    ]
    graph = helper.make_graph([n3, n1], "two_orders", [x], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ops.ONNX_OPSET)])
    return ops.attach_functions(model)


def test_mixed_spline_orders_use_overloads():
    model = _two_order_model()
    assert model.ir_version == ops.IR_VERSION
    assert sorted(f.overload for f in model.functions) == ["k1", "k3"]
    assert sorted(n.overload for n in model.graph.node) == ["k1", "k3"]
    onnx.checker.check_model(model, full_check=True)
    ops.check_functions(model)
    x = np.random.default_rng(3).uniform(-2.5, 1.5, (9, 4)).astype(np.float32)
    y3, y1 = run_ort(model, {"X": x})
    np.testing.assert_allclose(y3, bspline_ref(x, 5, 3, -1.0, 1.0), atol=2e-6)
    np.testing.assert_allclose(y1, bspline_ref(x, 4, 1, -2.0, 1.0), atol=2e-6)
    # ReferenceEvaluator ignores `overload`; onnx's inliner honours it.
    r3, r1 = run_ref(inliner.inline_local_functions(model), {"X": x})
    np.testing.assert_allclose(r3, y3, atol=2e-6)
    np.testing.assert_allclose(r1, y1, atol=2e-6)


def test_missing_body_is_caught():
    model = ops.single_op_model(ops.OP_RBF, dict(num_centers=4, grid_lo=-1.0, grid_hi=1.0), (2, 3))
    del model.functions[:]
    onnx.checker.check_model(model, full_check=True)  # the checker alone lets this through
    with pytest.raises(ValueError, match="no FunctionProto for RBFBasis"):
        ops.check_functions(model)


def test_function_opset_must_match_model():
    model = ops.single_op_model(ops.OP_RBF, dict(num_centers=4, grid_lo=-1.0, grid_hi=1.0), (2, 3))
    model.functions[0].opset_import[0].version = 18
    with pytest.raises(ValueError, match="imports opset"):
        ops.check_functions(model)


def test_schema_registration_is_idempotent():
    ops.register_schemas()
    ops.register_schemas()
    for name in ops.OP_TYPES:
        schema = onnx.defs.get_schema(name, ops.DOMAIN_VERSION, ops.DOMAIN)
        assert schema.domain == ops.DOMAIN


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bspline_function_rejects_bad_order(bad):
    with pytest.raises(ValueError, match="spline_order"):
        ops.bspline_function(bad)
