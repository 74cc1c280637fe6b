"""The ``ai.kanmoe`` ONNX domain: op schemas, FunctionProto bodies, torch translation table.

Each spline op is one custom-domain node in the exported graph (so a runtime may register a
fast native kernel for it) *and* ships inside the model as a FunctionProto made of standard
ONNX ops (so stock ONNX Runtime and ``onnx.reference.ReferenceEvaluator`` run it unchanged).

Ops (domain ``ai.kanmoe``, version 1):

- ``BSplineBasis(X) -> Y``: ``X (...)`` -> ``Y (..., G + K)``; uniform knots
  ``t_j = lo + (j - K) h``, ``h = (hi - lo) / G``, Cox–de Boor bases of order ``K``.
  Attributes ``grid_size`` (G), ``spline_order`` (K), ``grid_lo``, ``grid_hi``.
- ``RBFBasis(X) -> Y``: ``X (...)`` -> ``Y (..., N)``, ``exp(-((x - mu_i) / sigma)^2)`` with
  ``mu = linspace(lo, hi, N)``, ``sigma = (hi - lo) / (N - 1)``. Attributes ``num_centers``,
  ``grid_lo``, ``grid_hi``.
- ``LinearSplineLookup(X, C) -> Y``: ``X (..., I)``, ``C (I, N, O)`` -> ``Y (..., O)``: per input
  the piecewise-linear interpolant through ``N`` uniform control points on ``[lo, hi]``
  (linear extrapolation outside), summed over inputs. Attributes ``grid_lo``, ``grid_hi``.

``spline_order`` sets how many recursion steps the B-spline body unrolls, so it cannot be
read from the attribute at run time: one body is generated per order actually used
(:func:`bspline_function`). Models with one order (the usual case) get a plain
``BSplineBasis`` function; models mixing orders tag each node and function with
``overload="k<K>"`` (IR >= 10), which ONNX Runtime and ``onnx.inliner`` honour.

The B-spline body computes on a knots-first ``(knots, rows)`` layout, slicing along axis 0,
then transposes once: ORT then runs a few large element-wise ops instead of many strided
ones (2-5x faster than the ``(rows, knots)`` layout, see ``benchmarks/onnx_runtime.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, helper
from onnx.defs import OpSchema

DOMAIN = "ai.kanmoe"
DOMAIN_VERSION = 1
#: The default-domain opset the torch exporter writes; function bodies must import the same.
ONNX_OPSET = 20
#: Pinned so ONNX Runtime <= 1.31 (max IR 13) loads the files; IR 10 still allows overloads.
IR_VERSION = 10

OP_BSPLINE = "BSplineBasis"
OP_RBF = "RBFBasis"
OP_LOOKUP = "LinearSplineLookup"
OP_TYPES = (OP_BSPLINE, OP_RBF, OP_LOOKUP)
BSPLINE_LAYOUTS = ("knots_first", "rows_first")
LOOKUP_LAYOUTS = ("value_slope", "hat_matmul", "gather")

_T = [("T", ["tensor(float)", "tensor(double)"], "float32 or float64")]
_ATTR = OpSchema.Attribute
_INT = OpSchema.AttrType.INT
_FLOAT = OpSchema.AttrType.FLOAT


def op_schemas() -> tuple[OpSchema, ...]:
    """The three ``ai.kanmoe`` v1 schemas (needed by onnxscript when the exporter emits nodes)."""
    fp = OpSchema.FormalParameter
    return (
        OpSchema(
            OP_BSPLINE,
            DOMAIN,
            DOMAIN_VERSION,
            "Uniform-knot B-spline bases of order spline_order: X (...) -> Y (..., G + K).",
            inputs=[fp("X", "T")],
            outputs=[fp("Y", "T")],
            type_constraints=_T,
            attributes=[
                _ATTR("grid_size", _INT, "number of grid intervals G"),
                _ATTR("spline_order", _INT, "spline order K (degree)"),
                _ATTR("grid_lo", _FLOAT, "lower end of the grid"),
                _ATTR("grid_hi", _FLOAT, "upper end of the grid"),
            ],
        ),
        OpSchema(
            OP_RBF,
            DOMAIN,
            DOMAIN_VERSION,
            "Gaussian radial bases on a uniform grid of centres: X (...) -> Y (..., N).",
            inputs=[fp("X", "T")],
            outputs=[fp("Y", "T")],
            type_constraints=_T,
            attributes=[
                _ATTR("num_centers", _INT, "number of centres N"),
                _ATTR("grid_lo", _FLOAT, "first centre"),
                _ATTR("grid_hi", _FLOAT, "last centre"),
            ],
        ),
        OpSchema(
            OP_LOOKUP,
            DOMAIN,
            DOMAIN_VERSION,
            "Sum over inputs of linear splines through uniform control points: "
            "X (..., I), C (I, N, O) -> Y (..., O).",
            inputs=[fp("X", "T"), fp("C", "T")],
            outputs=[fp("Y", "T")],
            type_constraints=_T,
            attributes=[
                _ATTR("grid_lo", _FLOAT, "position of the first control point"),
                _ATTR("grid_hi", _FLOAT, "position of the last control point"),
            ],
        ),
    )


def register_schemas() -> None:
    """Register the domain's schemas with ``onnx.defs`` once per process (idempotent)."""
    for schema in op_schemas():
        if onnx.defs.has(schema.name, schema.since_version, schema.domain):
            continue
        onnx.defs.register_schema(schema)


class _Body:
    """Tiny node builder: every call appends one node and returns its fresh output name."""

    def __init__(self) -> None:
        self.nodes: list[NodeProto] = []
        self._n = 0

    def __call__(self, op: str, *inputs: str, **attrs: Any) -> str:
        self._n += 1
        out = f"_t{self._n}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def const_i64(self, *values: int) -> str:
        tensor = helper.make_tensor("v", TensorProto.INT64, [len(values)], values)
        return self("Constant", value=tensor)

    def scalar_i64(self, value: int) -> str:
        return self("Constant", value=helper.make_tensor("v", TensorProto.INT64, [], [value]))

    def attr_ref(self, attr: str, kind: str) -> str:
        """A Constant whose value is the calling node's attribute ``attr`` (0-D)."""
        self._n += 1
        out = f"_t{self._n}"
        node = helper.make_node("Constant", [], [out])
        ref = helper.make_attribute_ref(
            f"value_{kind}", AttributeProto.FLOAT if kind == "float" else AttributeProto.INT
        )
        ref.ref_attr_name = attr
        node.attribute.append(ref)
        self.nodes.append(node)
        return out

    def slice0(self, x: str, start: int, end: int) -> str:
        """``x[start:end]`` along axis 0 (end may be negative; 2**62 means 'to the end')."""
        return self("Slice", x, self.const_i64(start), self.const_i64(end), self.const_i64(0))

    def slice_axis(self, x: str, start: int, end: int, axis: int) -> str:
        return self("Slice", x, self.const_i64(start), self.const_i64(end), self.const_i64(axis))

    def slice_last(self, x: str, start: int, end: int) -> str:
        return self("Slice", x, self.const_i64(start), self.const_i64(end), self.const_i64(-1))


_END = 2**62


def _function(
    name: str, inputs: list[str], attributes: list[str], body: _Body, result: str, overload: str
) -> FunctionProto:
    body.nodes.append(helper.make_node("Identity", [result], ["Y"]))
    fn = helper.make_function(
        DOMAIN,
        name,
        inputs,
        ["Y"],
        body.nodes,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        attributes=attributes,
    )
    if overload:
        fn.overload = overload
    return fn


def _grid_scalars(b: _Body, x: str) -> tuple[str, str]:
    lo = b("CastLike", b.attr_ref("grid_lo", "float"), x)
    hi = b("CastLike", b.attr_ref("grid_hi", "float"), x)
    return lo, hi


def bspline_function(
    spline_order: int, overload: str = "", layout: str = "knots_first"
) -> FunctionProto:
    """FunctionProto for ``BSplineBasis`` unrolled for one ``spline_order`` (K).

    ``layout="knots_first"`` evaluates on ``(knots, rows)`` and transposes at the end (fast);
    ``"rows_first"`` evaluates on ``(rows, knots)`` as efficient-kan does (kept for the
    benchmark's comparison). Both follow efficient-kan's recursion term for term.
    """
    if isinstance(spline_order, bool) or not isinstance(spline_order, int) or spline_order < 0:
        raise ValueError(f"spline_order must be an int >= 0, got {spline_order!r}")
    if layout not in BSPLINE_LAYOUTS:
        raise ValueError(f"layout must be one of {BSPLINE_LAYOUTS}, got {layout!r}")
    k_ord = spline_order
    b = _Body()
    lo, hi = _grid_scalars(b, "X")
    g_int = b.attr_ref("grid_size", "int")
    h = b("Div", b("Sub", hi, lo), b("CastLike", g_int, "X"))
    limit = b("Add", g_int, b.scalar_i64(k_ord + 1))
    j = b("Range", b.scalar_i64(-k_ord), limit, b.scalar_i64(1))
    knots = b("Add", b("Mul", b("CastLike", j, "X"), h), lo)  # (M,), M = G + 2K + 1
    shape = b("Shape", "X")
    if layout == "knots_first":
        t = b("Unsqueeze", knots, b.const_i64(1))  # (M, 1)
        x = b("Reshape", "X", b.const_i64(1, -1))  # (1, R)
        cut = b.slice0
    else:
        t = knots  # (M,)
        x = b("Reshape", "X", b.const_i64(-1, 1))  # (R, 1)
        cut = b.slice_last
    inside = b("And", b("GreaterOrEqual", x, cut(t, 0, -1)), b("Less", x, cut(t, 1, _END)))
    bases = b("CastLike", inside, "X")  # order-0 bases: 1 on [t_j, t_{j+1})
    for k in range(1, k_ord + 1):
        t_a = cut(t, 0, -(k + 1))  # t_j
        left = b("Div", b("Sub", x, t_a), b("Sub", cut(t, k, -1), t_a))
        t_b = cut(t, k + 1, _END)  # t_{j+k+1}
        right = b("Div", b("Sub", t_b, x), b("Sub", t_b, cut(t, 1, -k)))
        bases = b(
            "Add",
            b("Mul", left, cut(bases, 0, -1)),
            b("Mul", right, cut(bases, 1, _END)),
        )
    if layout == "knots_first":
        bases = b("Transpose", bases, perm=[1, 0])  # (R, G + K)
    out_shape = b("Concat", shape, b.const_i64(-1), axis=0)
    y = b("Reshape", bases, out_shape)
    return _function(
        OP_BSPLINE,
        ["X"],
        ["grid_size", "spline_order", "grid_lo", "grid_hi"],
        b,
        y,
        overload,
    )


def rbf_function() -> FunctionProto:
    """FunctionProto for ``RBFBasis``: ``exp(-((x - mu) / sigma)^2)`` on a new last axis."""
    b = _Body()
    lo, hi = _grid_scalars(b, "X")
    n_int = b.attr_ref("num_centers", "int")
    sigma = b("Div", b("Sub", hi, lo), b("CastLike", b("Sub", n_int, b.scalar_i64(1)), "X"))
    idx = b("Range", b.scalar_i64(0), n_int, b.scalar_i64(1))
    mu = b("Add", b("Mul", b("CastLike", idx, "X"), sigma), lo)  # (N,)
    d = b("Div", b("Sub", b("Unsqueeze", "X", b.const_i64(-1)), mu), sigma)
    y = b("Exp", b("Neg", b("Mul", d, d)))
    return _function(OP_RBF, ["X"], ["num_centers", "grid_lo", "grid_hi"], b, y, "")


def lookup_function(layout: str = "value_slope") -> FunctionProto:
    """FunctionProto for ``LinearSplineLookup`` (y = sum over inputs of a linear interpolant).

    Position ``u = (x - lo) / (hi - lo) * (N - 1)``, segment ``i = clip(floor(u), 0, N - 2)``,
    ``y = sum_p c[p, i] + (u - i) * (c[p, i + 1] - c[p, i])`` (so the end segments extrapolate).

    Layouts (all exact to float rounding; the benchmark compares them):

    - ``"value_slope"`` (shipped): one Gather from a ``(I*N, 2*O)`` table of
      ``[c[p, i], c[p, i+1] - c[p, i]]`` (built from C; ORT constant-folds it when C is an
      initializer), then one batched MatMul with the weights ``[1, u - i]``.
    - ``"hat_matmul"``: hat weights ``relu(1 - |clip(u, 0, N-1) - j|)`` over the N points,
      one MatMul with the ``(I*N, O)`` table, plus end-segment slopes times the overshoot.
    - ``"gather"``: two Gathers of ``(rows, I, O)`` and a lerp (the textbook form).
    """
    if layout not in LOOKUP_LAYOUTS:
        raise ValueError(f"layout must be one of {LOOKUP_LAYOUTS}, got {layout!r}")
    b = _Body()
    lo, hi = _grid_scalars(b, "X")
    x_shape = b("Shape", "X")
    c_shape = b("Shape", "C")
    n_in = b("Gather", c_shape, b.scalar_i64(0))
    n_pts = b("Gather", c_shape, b.scalar_i64(1))
    x = b("Reshape", "X", b("Concat", b.const_i64(-1), b.slice_last(c_shape, 0, 1), axis=0))
    n_seg = b("CastLike", b("Sub", n_pts, b.scalar_i64(1)), "X")
    u = b("Mul", b("Div", b("Sub", x, lo), b("Sub", hi, lo)), n_seg)  # (R, I)
    zero = b("CastLike", b("Constant", value_float=0.0), "X")
    one = b("CastLike", b("Constant", value_float=1.0), "X")
    table = b("Reshape", "C", b("Concat", b.const_i64(-1), b.slice_last(c_shape, 2, 3), axis=0))
    if layout == "gather":
        seg = b("Clip", b("Floor", u), zero, b("Sub", n_seg, one))
        frac = b("Unsqueeze", b("Sub", u, seg), b.const_i64(-1))  # (R, I, 1)
        row = b("Mul", b("Range", b.scalar_i64(0), n_in, b.scalar_i64(1)), n_pts)  # (I,)
        flat_idx = b("Add", b("Cast", seg, to=TensorProto.INT64), row)  # (R, I)
        c0 = b("Gather", table, flat_idx, axis=0)  # (R, I, O)
        c1 = b("Gather", table, b("Add", flat_idx, b.scalar_i64(1)), axis=0)
        val = b("Add", c0, b("Mul", frac, b("Sub", c1, c0)))
        y = b("ReduceSum", val, b.const_i64(1), keepdims=0)  # (R, O)
    elif layout == "value_slope":
        seg = b("Clip", b("Floor", u), zero, b("Sub", n_seg, one))
        frac = b("Sub", u, seg)  # (R, I)
        row = b("Mul", b("Range", b.scalar_i64(0), n_in, b.scalar_i64(1)), n_pts)  # (I,)
        flat_idx = b("Add", b("Cast", seg, to=TensorProto.INT64), row)  # (R, I)
        # (I, N, 2, O) table of [value, slope to the next point]; constant-folded by ORT
        slope = b("Sub", b.slice_axis("C", 1, _END, 1), b.slice_axis("C", 0, -1, 1))
        slope = b("Concat", slope, b.slice_axis(slope, -1, _END, 1), axis=1)  # pad last
        vs = b("Concat", b("Unsqueeze", "C", b.const_i64(2)),
               b("Unsqueeze", slope, b.const_i64(2)), axis=2)  # fmt: skip
        n_out = b.slice_last(c_shape, 2, 3)
        vs = b("Reshape", vs, b("Concat", b.const_i64(-1), b("Mul", n_out, b.const_i64(2)), axis=0))
        g = b("Gather", vs, flat_idx, axis=0)  # (R, I, 2*O)
        g = b(
            "Reshape", g, b("Concat", b.const_i64(0), b.const_i64(-1), n_out, axis=0)
        )  # (R, 2I, O)
        w = b(
            "Concat",
            b("Unsqueeze", b("Add", b("Mul", frac, zero), one), b.const_i64(-1)),
            b("Unsqueeze", frac, b.const_i64(-1)),
            axis=2,
        )  # fmt: skip  (R, I, 2)
        w = b("Reshape", w, b.const_i64(0, 1, -1))  # (R, 1, 2I)
        y = b("Squeeze", b("MatMul", w, g), b.const_i64(1))
    else:
        uc = b("Clip", u, zero, n_seg)
        pos = b("CastLike", b("Range", b.scalar_i64(0), n_pts, b.scalar_i64(1)), "X")  # (N,)
        dist = b("Abs", b("Sub", b("Unsqueeze", uc, b.const_i64(-1)), pos))  # (R, I, N)
        hat = b("Relu", b("Sub", one, dist))
        width = b("Unsqueeze", b("Mul", n_in, n_pts), b.const_i64(0))
        y = b("MatMul", b("Reshape", hat, b("Concat", b.const_i64(-1), width, axis=0)), table)
        excess = b("Sub", u, uc)  # < 0 below the grid, > 0 above it, 0 inside
        first = b("Sub", b("Gather", "C", b.scalar_i64(1), axis=1),
                  b("Gather", "C", b.scalar_i64(0), axis=1))  # fmt: skip
        last_i = b("Sub", n_pts, b.scalar_i64(1))
        last = b("Sub", b("Gather", "C", last_i, axis=1),
                 b("Gather", "C", b("Sub", last_i, b.scalar_i64(1)), axis=1))  # fmt: skip
        y = b("Add", y, b("MatMul", b("Min", excess, zero), first))
        y = b("Add", y, b("MatMul", b("Max", excess, zero), last))
    out_shape = b("Concat", b.slice_last(x_shape, 0, -1), b.slice_last(c_shape, 2, 3), axis=0)
    y = b("Reshape", y, out_shape)
    return _function(OP_LOOKUP, ["X", "C"], ["grid_lo", "grid_hi"], b, y, "")


def _nodes(graph: onnx.GraphProto):
    """All nodes of ``graph`` including those inside subgraphs (Loop/Scan/If bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


def kanmoe_nodes(model: onnx.ModelProto) -> list[NodeProto]:
    """Every ``ai.kanmoe`` node in the model (main graph and subgraphs)."""
    return [n for n in _nodes(model.graph) if n.domain == DOMAIN]


def _spline_order(node: NodeProto) -> int:
    for attr in node.attribute:
        if attr.name == "spline_order":
            return int(attr.i)
    raise ValueError(f"{node.op_type} node {node.name!r} has no spline_order attribute")


def attach_functions(
    model: onnx.ModelProto, layout: str = "knots_first", lookup_layout: str = "value_slope"
) -> onnx.ModelProto:
    """Add the FunctionProto of every ai.kanmoe op the graph uses, in place; returns ``model``.

    Also adds the domain to ``opset_import`` and pins ``ir_version``. With more than one
    B-spline order, nodes and bodies are matched by ``overload="k<K>"``.
    """
    nodes = kanmoe_nodes(model)
    unknown = sorted({n.op_type for n in nodes} - set(OP_TYPES))
    if unknown:
        raise ValueError(f"unknown {DOMAIN} op(s) in graph: {unknown}")
    orders = sorted({_spline_order(n) for n in nodes if n.op_type == OP_BSPLINE})
    keep = [f for f in model.functions if f.domain != DOMAIN]
    fns: list[FunctionProto] = []
    if len(orders) == 1:
        fns.append(bspline_function(orders[0], layout=layout))
    for k in orders if len(orders) > 1 else ():
        fns.append(bspline_function(k, overload=f"k{k}", layout=layout))
    for n in nodes:
        if n.op_type == OP_BSPLINE:
            n.overload = f"k{_spline_order(n)}" if len(orders) > 1 else ""
    used = {n.op_type for n in nodes}
    if OP_RBF in used:
        fns.append(rbf_function())
    if OP_LOOKUP in used:
        fns.append(lookup_function(lookup_layout))
    del model.functions[:]
    model.functions.extend(keep + fns)
    if nodes and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    model.ir_version = IR_VERSION
    return model


def check_functions(model: onnx.ModelProto) -> None:
    """Raise ``ValueError`` unless every ai.kanmoe node has a matching FunctionProto.

    ``onnx.checker`` accepts a custom node without a body; runtimes then fail at load time.
    """
    have = {(f.domain, f.name, f.overload) for f in model.functions}
    default = {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")}
    for node in kanmoe_nodes(model):
        if (node.domain, node.op_type, node.overload) not in have:
            label = node.op_type + (f" (overload {node.overload})" if node.overload else "")
            raise ValueError(f"{DOMAIN} node {node.name!r}: no FunctionProto for {label}")
    for fn in model.functions:
        fn_default = {o.version for o in fn.opset_import if o.domain in ("", "ai.onnx")}
        if fn.domain == DOMAIN and fn_default != default:
            raise ValueError(
                f"function {fn.name} imports opset {sorted(fn_default)}, model {sorted(default)}"
            )


def single_op_model(
    op_type: str,
    attrs: dict[str, Any],
    x_shape: tuple[int | str, ...],
    c_shape: tuple[int, ...] | None = None,
    elem_type: int = TensorProto.FLOAT,
    layout: str = "knots_first",
    lookup_layout: str = "value_slope",
) -> onnx.ModelProto:
    """A model holding one ai.kanmoe node plus its function (tests and benchmarks)."""
    inputs = [helper.make_tensor_value_info("X", elem_type, list(x_shape))]
    node_inputs = ["X"]
    if c_shape is not None:
        inputs.append(helper.make_tensor_value_info("C", elem_type, list(c_shape)))
        node_inputs.append("C")
    node = helper.make_node(op_type, node_inputs, ["Y"], domain=DOMAIN, name=op_type, **attrs)
    y_shape = [*x_shape[:-1], c_shape[2]] if c_shape is not None else [*x_shape, "n_basis"]
    graph = helper.make_graph(
        [node], op_type, inputs, [helper.make_tensor_value_info("Y", elem_type, y_shape)]
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", ONNX_OPSET),
            helper.make_opsetid(DOMAIN, DOMAIN_VERSION),
        ],
        ir_version=IR_VERSION,
    )
    return attach_functions(model, layout=layout, lookup_layout=lookup_layout)


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export``: one ai.kanmoe node per op call.

    Requires ``kanmoe.model.custom_ops`` (which defines ``torch.ops.kanmoe.*``).
    """
    import kanmoe.model.custom_ops  # noqa: F401  (registers torch.ops.kanmoe.*)
    import onnxscript
    import torch

    register_schemas()
    opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def bspline(x, grid_size: int, spline_order: int, grid_lo: float, grid_hi: float):
        return opset.BSplineBasis(
            x,
            grid_size=int(grid_size),
            spline_order=int(spline_order),
            grid_lo=float(grid_lo),
            grid_hi=float(grid_hi),
        )

    def rbf(x, num_centers: int, grid_lo: float, grid_hi: float):
        return opset.RBFBasis(
            x, num_centers=int(num_centers), grid_lo=float(grid_lo), grid_hi=float(grid_hi)
        )

    def lookup(x, control_points, grid_lo: float, grid_hi: float):
        return opset.LinearSplineLookup(
            x, control_points, grid_lo=float(grid_lo), grid_hi=float(grid_hi)
        )

    ops = torch.ops.kanmoe
    return {
        ops.bspline_basis.default: bspline,
        ops.rbf_basis.default: rbf,
        ops.linear_spline_lookup.default: lookup,
    }
