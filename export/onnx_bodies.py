"""FunctionProto bodies of the ``ai.kanmoe`` ops, built from standard ONNX ops (opset 20).

Every body reads the calling node's attributes through ``Constant`` nodes with
``ref_attr_name`` and works for float32 and float64. ``spline_order`` is static in every
B-spline body, so there is one body per order.

The shipped B-spline body (``layout="cardinal"``) evaluates the closed form of the uniform
B-spline: a dozen element-wise ops on ``(rows, G + K)``, about 2x faster in ORT than the
unrolled Cox–de Boor recursion at batch 4096 with G = 32. A ``"local"`` body computes only
the K + 1 non-zero pieces and scatters them (faster still at batch 4096, slower at small
batches). The recursion is kept in two layouts for comparison and for K = 0: knots-first
``(knots, rows)`` with one final Transpose (2-5x faster than rows-first) and rows-first as
efficient-kan writes it.

The shipped lookup body (``"chunked"``) gathers value/slope rows and contracts them with one
batched MatMul; for batches bigger than one block it does so block by block in a ``Scan`` so
the gathered rows stay in cache (torch's ``embedding_bag`` never materialises them at all).
"""

from __future__ import annotations

import math
from typing import Any

from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, TypeProto, helper

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
BSPLINE_LAYOUTS = ("cardinal", "local", "knots_first", "rows_first")
LOOKUP_LAYOUTS = ("chunked", "value_slope", "hat_matmul", "gather")  # first: shipped
#: At most this many rows per Scan step of the "chunked" lookup body.
LOOKUP_CHUNK_ROWS = 512
#: Gathered floats per block (rows * I * 2 * O, 2 MB in float32): the block stays in cache.
#: 2**18..2**20 measured alike on the default model and a 64->64 layer; unbounded blocks
#: (one Gather for the batch) are 1.6x slower on the layer at batch 4096.
LOOKUP_BLOCK_ELEMENTS = 1 << 19


class _Body:
    """Tiny node builder: every call appends one node and returns its fresh output name."""

    def __init__(self, prefix: str = "_t") -> None:
        self.nodes: list[NodeProto] = []
        self._n = 0
        self._prefix = prefix  # subgraph bodies use their own, so names never clash

    def __call__(self, op: str, *inputs: str, **attrs: Any) -> str:
        self._n += 1
        out = f"{self._prefix}{self._n}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def const_i64(self, *values: int) -> str:
        tensor = helper.make_tensor("v", TensorProto.INT64, [len(values)], values)
        return self("Constant", value=tensor)

    def scalar_like(self, value: float, like: str) -> str:
        """A 0-D constant of ``like``'s dtype, stored as double so float64 bodies stay exact."""
        const = self("Constant", value=helper.make_tensor("v", TensorProto.DOUBLE, [], [value]))
        return self("CastLike", const, like)

    def scalar_i64(self, value: int) -> str:
        return self("Constant", value=helper.make_tensor("v", TensorProto.INT64, [], [value]))

    def attr_ref(self, attr: str, kind: str) -> str:
        """A Constant whose value is the calling node's attribute ``attr`` (0-D)."""
        self._n += 1
        out = f"{self._prefix}{self._n}"
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
        return self.slice_axis(x, start, end, 0)

    def slice_axis(self, x: str, start: int, end: int, axis: int) -> str:
        return self("Slice", x, self.const_i64(start), self.const_i64(end), self.const_i64(axis))

    def slice_last(self, x: str, start: int, end: int) -> str:
        return self.slice_axis(x, start, end, -1)


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
    spline_order: int, overload: str = "", layout: str = "cardinal"
) -> FunctionProto:
    """FunctionProto for ``BSplineBasis`` for one ``spline_order`` (K).

    ``layout="cardinal"`` (default) uses the closed form (K >= 1; K = 0 falls back to the
    knots-first recursion). ``"knots_first"`` unrolls the recursion on ``(knots, rows)`` and
    transposes at the end;
    ``"rows_first"`` evaluates on ``(rows, knots)`` as efficient-kan does (kept for the
    benchmark's comparison). Both follow efficient-kan's recursion term for term.
    """
    if isinstance(spline_order, bool) or not isinstance(spline_order, int) or spline_order < 0:
        raise ValueError(f"spline_order must be an int >= 0, got {spline_order!r}")
    if layout not in BSPLINE_LAYOUTS:
        raise ValueError(f"layout must be one of {BSPLINE_LAYOUTS}, got {layout!r}")
    if layout == "cardinal" and spline_order > 0:
        return _bspline_cardinal_function(spline_order, overload)
    if layout == "local":
        return _bspline_local_function(spline_order, overload)
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
    return _bspline_result(b, bases, shape, overload)


def _bspline_result(b: _Body, bases: str, shape: str, overload: str) -> FunctionProto:
    """Reshape ``(rows, G + K)`` bases to ``X.shape + (G + K,)`` and wrap the body."""
    y = b("Reshape", bases, b("Concat", shape, b.const_i64(-1), axis=0))
    attributes = ["grid_size", "spline_order", "grid_lo", "grid_hi"]
    return _function(OP_BSPLINE, ["X"], attributes, b, y, overload)


def _bspline_cardinal_function(spline_order: int, overload: str) -> FunctionProto:
    """``BSplineBasis`` from the closed form of the uniform (cardinal) B-spline, K >= 1.

    On a uniform grid every basis is one shifted cardinal B-spline: with ``u = (x - lo) / h``
    and centres ``c_j = j - (K - 1) / 2``, ``B_j = N_K(|u - c_j|)`` where, for ``r >= 0``,
    ``N_K(r) = sum_{i < (K + 1) / 2} (-1)^i C(K + 1, i) relu((K + 1) / 2 - i - r)^K / K!``
    (the truncated-power form evaluated on the symmetric half, so no cancellation between
    large terms). About a dozen element-wise ops on ``(rows, G + K)`` and no Slice/Div, which
    ORT runs several times faster than the unrolled Cox–de Boor recursion at large grids.
    K = 0 has a discontinuous basis and keeps the recursion body.
    """
    k_ord = spline_order
    b = _Body()
    lo, hi = _grid_scalars(b, "X")
    g_int = b.attr_ref("grid_size", "int")
    h = b("Div", b("Sub", hi, lo), b("CastLike", g_int, "X"))
    m = b("Add", g_int, b.scalar_i64(k_ord))
    j = b("CastLike", b("Range", b.scalar_i64(0), m, b.scalar_i64(1)), "X")
    shift = b.scalar_like(-(k_ord - 1) / 2, "X")
    centres = b("Add", j, shift)  # (M,), M = G + K
    shape = b("Shape", "X")
    u = b("Div", b("Sub", b("Reshape", "X", b.const_i64(-1, 1)), lo), h)  # (R, 1)
    r = b("Abs", b("Sub", u, centres))  # (R, M)
    return _bspline_result(b, _cardinal_terms(b, r, k_ord), shape, overload)


def _cardinal_terms(b: _Body, r: str, k_ord: int) -> str:
    """``N_K(r)`` of the centred cardinal B-spline for ``r = |s - (K + 1) / 2| >= 0``."""
    total = ""
    for i in range((k_ord + 2) // 2):
        q = b("Relu", b("Sub", b.scalar_like((k_ord + 1) / 2 - i, "X"), r))
        power = q
        for _ in range(k_ord - 1):
            power = b("Mul", power, q)
        coeff = (-1) ** i * math.comb(k_ord + 1, i) / math.factorial(k_ord)
        term = b("Mul", power, b.scalar_like(coeff, "X"))
        total = term if not total else b("Add", total, term)
    return total


def _bspline_local_function(spline_order: int, overload: str) -> FunctionProto:
    """``BSplineBasis`` from its K + 1 non-zero pieces, scattered into the dense output.

    ``s = (x - lo) / h + K`` in knot units, cell ``c = floor(s)``, ``t = s - c``: only the
    bases ``j = c - m`` (m = 0..K) are non-zero, with values ``N_K(t + m)``. The pieces are
    computed on ``(rows, K + 1)`` and written with one ScatterElements into a zero
    ``(rows, G + 3K + 2)`` buffer padded so that out-of-grid cells land in the margins,
    which a final Slice drops.
    """
    k_ord = spline_order
    b = _Body()
    lo, hi = _grid_scalars(b, "X")
    g_int = b.attr_ref("grid_size", "int")
    h = b("Div", b("Sub", hi, lo), b("CastLike", g_int, "X"))
    m_int = b("Add", g_int, b.scalar_i64(k_ord))  # M = G + K bases
    m_f = b("CastLike", m_int, "X")
    shape = b("Shape", "X")
    s = b(
        "Add",
        b("Div", b("Sub", b("Reshape", "X", b.const_i64(-1, 1)), lo), h),
        b.scalar_like(float(k_ord), "X"),
    )  # (R, 1)
    upper = b("Add", m_f, b.scalar_like(k_ord + 0.5, "X"))
    s = b("Clip", s, b.scalar_like(-0.5, "X"), upper)  # far outside: every piece in a margin
    cell = b("Floor", s)
    t = b("Sub", s, cell)
    offsets = b.const_i64(*range(k_ord + 1))  # m
    offsets_f = b("CastLike", offsets, "X")
    r = b("Abs", b("Sub", b("Add", t, offsets_f), b.scalar_like((k_ord + 1) / 2, "X")))
    # (R, K + 1); order 0 is the indicator of the cell itself
    pieces = (
        _cardinal_terms(b, r, k_ord)
        if k_ord
        else b("Add", b("Mul", t, b.scalar_like(0.0, "X")), b.scalar_like(1.0, "X"))
    )
    pad = k_ord + 1
    index = b("Add", b("Sub", b("Cast", cell, to=TensorProto.INT64), offsets), b.scalar_i64(pad))
    width = b("Add", m_int, b.scalar_i64(2 * k_ord + 2))
    rows = b("Slice", b("Shape", s), b.const_i64(0), b.const_i64(1), b.const_i64(0))
    zeros = b(
        "Expand",
        b.scalar_like(0.0, "X"),
        b("Concat", rows, b("Reshape", width, b.const_i64(1)), axis=0),
    )
    dense = b("ScatterElements", zeros, index, pieces, axis=1)
    end = b("Reshape", b("Add", m_int, b.scalar_i64(pad)), b.const_i64(1))
    bases = b("Slice", dense, b.const_i64(pad), end, b.const_i64(1))
    return _bspline_result(b, bases, shape, overload)


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


def lookup_function(layout: str = "chunked") -> FunctionProto:
    """FunctionProto for ``LinearSplineLookup`` (y = sum over inputs of a linear interpolant).

    Position ``u = (x - lo) / (hi - lo) * (N - 1)``, segment ``i = clip(floor(u), 0, N - 2)``,
    ``y = sum_p c[p, i] + (u - i) * (c[p, i + 1] - c[p, i])`` (so the end segments extrapolate).

    Layouts (all exact to float rounding; the benchmark compares them):

    - ``"value_slope"``: one Gather from a ``(I*N, 2*O)`` table of
      ``[c[p, i], c[p, i+1] - c[p, i]]`` (built from C; ORT constant-folds it when C is an
      initializer), then one batched MatMul with the weights ``[1, u - i]``.
    - ``"chunked"`` (shipped): ``value_slope``, but when the batch is bigger than one block
      (LOOKUP_BLOCK_ELEMENTS gathered floats, 8..LOOKUP_CHUNK_ROWS rows) an ``If`` runs the
      Gather + MatMul in a ``Scan`` over blocks that stay in cache (about 1.5x faster at
      batch 4096, the same for small batches).
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
    elif layout in ("value_slope", "chunked"):
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
        w = b(
            "Concat",
            b("Unsqueeze", b("Add", b("Mul", frac, zero), one), b.const_i64(-1)),
            b("Unsqueeze", frac, b.const_i64(-1)),
            axis=2,
        )  # fmt: skip  (R, I, 2)
        w = b("Reshape", w, b.const_i64(0, 1, -1))  # (R, 1, 2I)
        pair_shape = b("Concat", b.const_i64(0), b.const_i64(-1), n_out, axis=0)
        if layout == "value_slope":
            g = b("Gather", vs, flat_idx, axis=0)  # (R, I, 2*O)
            y = b("Squeeze", b("MatMul", w, b("Reshape", g, pair_shape)), b.const_i64(1))
        else:
            y = _chunked_gather_matmul(b, vs, flat_idx, w, pair_shape, n_out)
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


def _chunked_gather_matmul(
    b: _Body, vs: str, flat_idx: str, w: str, pair_shape: str, n_out: str
) -> str:
    """``value_slope``'s Gather + MatMul, run by a ``Scan`` over blocks of rows when many.

    One Gather over a large batch writes a (rows, I, 2*O) block far bigger than the cache
    and the MatMul reads it back from memory; blocks of about LOOKUP_BLOCK_ELEMENTS gathered
    floats (8 to LOOKUP_CHUNK_ROWS rows) stay in cache (about 1.5x faster at batch 4096). A
    batch of one block or less takes the plain path (an ``If``), which has less fixed cost.
    The last block is padded with index 0, weight 0 and cut off afterwards. Both branches
    read the tensors above from the enclosing scope.
    """
    rows = b("Shape", flat_idx, end=1)  # (1,)
    row_elems = b("Mul", b("Shape", flat_idx, start=1), b("Mul", n_out, b.const_i64(2)))
    limit = b("Div", b.const_i64(LOOKUP_BLOCK_ELEMENTS), row_elems)  # rows per cached block
    limit = b("Max", b("Min", limit, b.const_i64(LOOKUP_CHUNK_ROWS)), b.const_i64(8))
    many = b("Squeeze", b("Greater", rows, limit), b.const_i64(0))
    flat_out = b("Concat", b.const_i64(-1), n_out, axis=0)  # (rows, O)

    plain = _Body("_plain")
    g = plain("Gather", vs, flat_idx, axis=0)
    plain("Reshape", plain("MatMul", w, plain("Reshape", g, pair_shape)), flat_out)

    blocks = _Body("_blocks")
    n_blocks = blocks("Div", blocks("Sub", blocks("Add", rows, limit), blocks.const_i64(1)), limit)
    pad = blocks("Sub", blocks("Mul", n_blocks, limit), rows)
    no = blocks.const_i64(0)
    idx = blocks("Pad", flat_idx, blocks("Concat", no, no, pad, no, axis=0))
    wts = blocks("Pad", w, blocks("Concat", no, no, no, pad, no, no, axis=0))
    idx = blocks("Reshape", idx, blocks("Concat", blocks.const_i64(-1), limit,
                                        blocks("Shape", flat_idx, start=1), axis=0))  # fmt: skip
    wts = blocks("Reshape", wts, blocks("Concat", blocks.const_i64(-1), limit,
                                        blocks("Shape", w, start=1), axis=0))  # fmt: skip
    step = helper.make_graph(
        [
            helper.make_node("Gather", [vs, "idx_b"], ["g_b"], axis=0),
            helper.make_node("Reshape", ["g_b", pair_shape], ["pairs_b"]),
            helper.make_node("MatMul", ["w_b", "pairs_b"], ["y_b"]),
        ],
        "lookup_block",
        [helper.make_value_info("idx_b", TypeProto()), helper.make_value_info("w_b", TypeProto())],
        [helper.make_value_info("y_b", TypeProto())],
    )
    y = blocks("Scan", idx, wts, num_scan_inputs=2, body=step)  # (blocks, block, 1, O)
    y = blocks("Reshape", y, flat_out)
    blocks("Slice", y, blocks.const_i64(0), rows, blocks.const_i64(0))

    def branch(body: _Body, name: str):
        return helper.make_graph(
            body.nodes, name, [], [helper.make_value_info(body.nodes[-1].output[0], TypeProto())]
        )

    return b("If", many, then_branch=branch(blocks, "lookup_blocks"),
             else_branch=branch(plain, "lookup_plain"))  # fmt: skip
