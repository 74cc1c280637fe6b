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

The bodies themselves are built in :mod:`kanmoe.export.onnx_bodies`; this module holds the
schemas, attaches and checks bodies on exported models, and maps the torch ops to nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, helper
from onnx.defs import OpSchema

from kanmoe.export.onnx_bodies import (  # noqa: F401  (re-exported)
    BSPLINE_LAYOUTS,
    DOMAIN,
    DOMAIN_VERSION,
    IR_VERSION,
    LOOKUP_BLOCK_ELEMENTS,
    LOOKUP_CHUNK_ROWS,
    LOOKUP_LAYOUTS,
    ONNX_OPSET,
    OP_BSPLINE,
    OP_LOOKUP,
    OP_RBF,
    OP_TYPES,
    bspline_function,
    lookup_function,
    rbf_function,
)

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
    model: onnx.ModelProto, layout: str = "cardinal", lookup_layout: str = "chunked"
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
    layout: str = "cardinal",
    lookup_layout: str = "chunked",
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
    import onnxscript
    import torch

    import kanmoe.model.custom_ops  # noqa: F401  (registers torch.ops.kanmoe.*)

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
