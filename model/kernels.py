"""Local-row kernels: the work per (sample, input) pair is a few table rows, not the whole grid.

Both fast spline layers are the same computation: for every sample b and input p, S weights
w[b,p,s] pick the rows ``base[b,p] + s`` (s < S) of a per-input table (in, R, out), and
y[b] = sum_p sum_s w[b,p,s] table[p, base[b,p] + s]. The linear lookup has S = 2 (weights
1 - t, t), the local B-spline S = K + 1 (the non-zero bases). Cost is O(B * in * S * out)
whatever R is: that is what makes ``num_control_points`` and ``grid_size`` free.

- forward: ``embedding_bag`` with per-sample weights over inputs in cache-sized groups;
- backward, table: one stable sort of the row keys (int16 where they fit), then segment sums
  of the output gradient by ``embedding_bag`` with offsets (one call per shift s, or one
  merged call when the table is much larger than the batch);
- backward, x: sampled dot products g[b] . rows[key] (``sparse.sampled_addmm`` on a CSR
  pattern in sorted-key order, so the table is read sequentially).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

FORWARD_GROUP_BYTES = 1 << 20  # table bytes per embedding_bag call in the CPU forward
FORWARD_MAX_GROUPS = 16
_INT16_KEYS = 32767  # keys sorted as int16 up to this (torch sorts int16 fastest on CPU)
INT16_MAX_GROUPS = 2  # int16 sorts per call at most (measured: 3+ groups lose to one int32 sort)
SLOPE_GROUP_BYTES = 1 << 22  # slope rows built per sampled_addmm call in the lookup backward
BACKWARD_G_BYTES = 1 << 20  # output-gradient rows per backward block (gathered at random)
BACKWARD_ADD_RATIO = 0.03  # blocks only while re-adding grad_table costs < this x the row work
# one merged segment-sum call once the table (rows x out) exceeds this x the pair count: S-1
# extra table-sized outputs and adds (page-faulted afresh above glibc's 32 MB mmap threshold)
# against S scatters of the pair indices; crossover measured at 8-16 (S = 2) and 6-18 (S = 4)
MERGE_RATIO = 12
_INT32_MAX = 2**31 - 1  # row and sample indices go to embedding_bag as int32 below this


def _index_dtype(*sizes: int) -> torch.dtype:
    """int32 when every index fits (fbgemm's embedding_bag runs ~10-25 % faster on int32)."""
    return torch.int32 if max(sizes) <= _INT32_MAX else torch.int64


def rows_forward(base: Tensor, weights: Tensor, table: Tensor) -> Tensor:
    """y (B, out) = sum_p sum_s weights[b,p,s] * table[p, base[b,p] + s].

    base (B, in) int64 (row index within each input's table), weights (B, in, S), table
    (in, R, out) contiguous. On CPU the inputs go in groups whose table slice stays in cache.
    """
    n_b, n_in = base.shape
    n_s = weights.shape[-1]
    _, n_rows, n_out = table.shape
    bytes_per_input = n_rows * n_out * table.element_size()
    # at least n_in / FORWARD_MAX_GROUPS inputs per group: each group adds a (B, out) pass
    step = max(1, FORWARD_GROUP_BYTES // bytes_per_input, -(-n_in // FORWARD_MAX_GROUPS))
    step = n_in if table.is_cuda else step
    dtype = _index_dtype(n_in * n_rows)
    base = base.to(dtype)
    shifts = torch.arange(n_s, device=base.device, dtype=dtype)
    y = None
    for s in range(0, n_in, step):
        e = min(s + step, n_in)
        local = base[:, s:e] + torch.arange(e - s, device=base.device, dtype=dtype).mul_(n_rows)
        idx = (local.unsqueeze(-1) + shifts).reshape(n_b, (e - s) * n_s)
        w = weights[:, s:e].reshape(n_b, (e - s) * n_s)
        flat = table[s:e].reshape((e - s) * n_rows, n_out)
        part = F.embedding_bag(idx, flat, per_sample_weights=w, mode="sum")
        y = part if y is None else y.add_(part)
    assert y is not None
    return y


class SortedRows(NamedTuple):
    """(sample, input) pairs sorted by their global table row p*R + base (stable)."""

    order: Tensor  # (n,) int64: flat pair index b*in + p of each sorted element
    sample: Tensor  # (n,) int32 (int64 past 2**31 samples): b of each sorted element
    row: Tensor  # (n,) int64: global row key of each sorted element
    crow: Tensor  # (n_rows + 1,) int64: element range of each global row


def sort_rows(base: Tensor, n_rows: int) -> SortedRows:
    """Group the B*in pairs by global row key p*R + base (stable, so samples stay ascending).

    Keys are sorted as int16 in up to ``INT16_MAX_GROUPS`` groups of inputs whose keys fit
    (torch's CPU sort of int16 is ~2x faster than int32 and ~3x faster than int64); groups are
    concatenated in key order. Larger tables: one int32 sort.
    """
    n_in = base.shape[1]
    per = max(1, _INT16_KEYS // n_rows)
    if -(-n_in // per) > INT16_MAX_GROUPS:  # past this, one int32 sort beats the group overhead
        per = n_in
    orders, samples, keys = [], [], []
    for s in range(0, n_in, per):
        e = min(s + per, n_in)
        local = base[:, s:e] + torch.arange(e - s, device=base.device) * n_rows
        dtype = torch.int16 if (e - s) * n_rows <= _INT16_KEYS else torch.int32
        key, pos = torch.sort(local.reshape(-1).to(dtype), stable=True)
        sample = torch.div(pos, e - s, rounding_mode="floor")
        orders.append(pos if e - s == n_in else sample * n_in + (pos - sample * (e - s) + s))
        samples.append(sample)
        keys.append(key.long() + s * n_rows if s else key.long())
    order, sample, row = (torch.cat(v) if len(v) > 1 else v[0] for v in (orders, samples, keys))
    sample = sample.to(_index_dtype(base.shape[0], n_in * n_rows))
    counts = torch.bincount(row, minlength=n_in * n_rows)
    crow = torch.zeros(n_in * n_rows + 1, dtype=torch.int64, device=base.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return SortedRows(order, sample, row, crow)


def segment_sums(
    rows: SortedRows, g: Tensor, weights: Sequence[Tensor], merged: bool | None = None
) -> Tensor:
    """grad_table (in*R, out): row r sums w[i, s] * g[sample_i] over pairs with row_i + s = r.

    ``weights``: S tensors (n,) in sorted order. Either S ``embedding_bag`` calls whose shifted
    outputs are added (cheap index work; best for small tables), or one merged call whose bag
    r holds the sorted segments of rows r, r-1, ..., r-S+1 (each output row written once;
    best when the table is large). ``merged=None`` picks by size.
    """
    n, n_s = rows.sample.numel(), len(weights)
    crow = rows.crow
    total = crow.numel() - 1
    if merged is None:
        merged = total * g.shape[1] > MERGE_RATIO * n
    if not merged or n_s == 1:
        offsets = crow[:-1].to(rows.sample.dtype)
        out = None
        for s in range(n_s):
            part = F.embedding_bag(
                rows.sample, g, offsets, mode="sum", per_sample_weights=weights[s]
            )
            if out is None:
                out = part
            else:
                out[s:].add_(part[: total - s])
        assert out is not None
        return out
    # Bag d holds, for s = S-1 .. 0, the sorted segment of row d - s (with the weights of shift
    # s). So element i (row r) lands at i + sum_{j=0}^{S-2} crow[r + s - j] for shift s, and bag
    # d starts at sum_{s=0}^{S-1} crow[d - s] (crow below 0 is 0): no sort, S scatters.
    cp = F.pad(crow, (n_s - 1, 0))  # cp[k + S - 1] = crow[k]
    r = rows.row
    acc = [torch.zeros_like(r)]  # acc[k] = sum_{k' = 1..k} cp[r + k']
    for k in range(1, 2 * n_s - 1):
        acc.append(cp.index_select(0, r + k).add_(acc[-1]))
    starts = cp[n_s - 1 : n_s - 1 + total].clone()
    for d in range(1, n_s):
        starts += cp[n_s - 1 - d : n_s - 1 - d + total]
    ar = torch.arange(n, device=g.device)
    idx = torch.empty(n * n_s, dtype=rows.sample.dtype, device=g.device)
    w = torch.empty(n * n_s, dtype=g.dtype, device=g.device)
    for s in range(n_s):
        pos = (acc[s + n_s - 1] - acc[s]).add_(ar)
        idx.scatter_(0, pos, rows.sample)
        w.scatter_(0, pos, weights[s])
    return F.embedding_bag(idx, g, starts.to(idx.dtype), mode="sum", per_sample_weights=w)


def sampled_dots(rows: SortedRows, table_flat: Tensor, g: Tensor, shift: int = 0) -> Tensor:
    """(n,) in sorted order: g[sample_i] . table_flat[row_i + shift]."""
    n = rows.sample.numel()
    n_rows = table_flat.shape[0]
    crow = rows.crow.to(rows.sample.dtype)  # CSR indices share one dtype
    if shift:
        crow = torch.cat((crow.new_zeros(shift), crow[: n_rows + 1 - shift]))
    with warnings.catch_warnings():  # "sparse CSR is beta" is noise here
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow, rows.sample, g.new_zeros(n), size=(n_rows, g.shape[0]), check_invariants=False
        )
    return torch.sparse.sampled_addmm(pattern, table_flat, g.t(), beta=0.0).values()


def slope_dots(rows: SortedRows, table: Tensor, g: Tensor, slopes: Tensor | None = None) -> Tensor:
    """(n,) in sorted order: g[sample_i] . (table[p, c + 1] - table[p, c]) for row_i = p*R + c.

    Differences first (no cancellation between two large dot products); built per group of
    inputs into a cache-sized block, so no second full-size table is allocated, unless the
    caller passes them all in ``slopes`` (in, R-1, out) (several sample blocks share them).
    """
    n_in, n_rows, n_out = table.shape
    step = max(1, SLOPE_GROUP_BYTES // (n_rows * n_out * table.element_size()))
    crow = rows.crow
    # one buffer for every group: a fresh block per group would be page-faulted in each time
    buf = table.new_empty(min(step, n_in), n_rows - 1, n_out) if slopes is None else slopes
    parts = []
    for s in range(0, n_in, step):
        e = min(s + step, n_in)
        lo, hi = int(crow[s * n_rows]), int(crow[e * n_rows])
        if lo == hi:
            continue
        if slopes is None:
            slope = torch.sub(table[s:e, 1:], table[s:e, :-1], out=buf[: e - s])
        else:
            slope = slopes[s:e]
        slope = slope.view(-1, n_out)
        # each input's last row is never a left cell (empty), so dropping it keeps the CSR
        local = crow[s * n_rows : e * n_rows].view(e - s, n_rows)[:, : n_rows - 1]
        crow_g = torch.cat((local.reshape(-1), crow[e * n_rows : e * n_rows + 1])).sub_(lo)
        sub = SortedRows(rows.order, rows.sample[lo:hi], rows.row, crow_g)
        parts.append(sampled_dots(sub, slope, g))
    if not parts:  # an empty batch
        return g.new_zeros(0)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def unsort(rows: SortedRows, values: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Scatter sorted-order values back to the (B, in) pair layout."""
    out = values.new_empty(values.numel())
    out[rows.order] = values
    return out.reshape(shape)


class LocalRowsFn(torch.autograd.Function):
    """y = rows_forward(base, weights, table) with gradients for x and the table.

    ``apply(x, table, base, weights, dweights, slope_scale, oim, rows)``: base, weights (and
    dweights, the x-derivatives of the weights) are computed from x outside, without grad; x
    is passed only so autograd routes its gradient here. grad_x is sum_s dweights[s] *
    (g . row s) or, when dweights is None (the linear lookup, whose weights are (1 - t, t)),
    slope_scale * g . (row 1 - row 0), the difference taken first so float32 does not cancel
    two large dot products.
    ``oim``: ``table`` is (out, in, M) (a B-spline layer's coefficients) and ``rows`` its
    (in, M, out) row table (``coef_rows``); the gradient comes back in the layout of
    ``table``: a permuted view when ``table`` is stored (in, M, out) (no copy), else
    contiguous (strided gradients would make the coefficients' own backward slow).
    Otherwise ``rows`` is None and ``table`` the (in, R, out) row table itself.
    """

    @staticmethod
    def forward(x, table, base, weights, dweights, slope_scale, oim, rows):  # type: ignore[override]
        return rows_forward(base, weights, table if rows is None else rows)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, table, base, weights, dweights, slope_scale, oim, rows = inputs
        ctx.save_for_backward(table if rows is None else rows, base, weights, dweights)
        ctx.slope_scale, ctx.oim = slope_scale, oim
        ctx.permuted = oim and table.permute(1, 2, 0).is_contiguous()
        ctx.x_shape, ctx.table_shape = x.shape, table.shape

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        table, base, weights, dweights = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[:2]
        g = g.contiguous()
        n_b, n_in = base.shape
        step = backward_chunk_rows(n_b, n_in, weights.shape[-1], table)
        slopes = None
        if need_x and dweights is None and step < n_b:  # lookup in blocks: slopes made once
            slopes = torch.sub(table[:, 1:], table[:, :-1])
        grad_xs, grad_table = [], None
        for s in range(0, max(n_b, 1), step):  # an empty batch is one empty block
            e = min(s + step, n_b)
            gx, gt = _backward_block(
                table,
                base[s:e],
                weights[s:e],
                dweights if dweights is None else dweights[s:e],
                g[s:e],
                ctx.slope_scale,
                need_x,
                need_table,
                slopes,
            )
            grad_xs.append(gx)
            grad_table = gt if grad_table is None else grad_table.add_(gt)
        grad_x = None
        if need_x:
            grad_x = (torch.cat(grad_xs) if len(grad_xs) > 1 else grad_xs[0]).reshape(ctx.x_shape)
        if grad_table is not None and ctx.oim:
            n_out, n_in, n_m = ctx.table_shape
            if ctx.permuted:
                grad_table = grad_table.view(n_in, n_m, n_out).permute(2, 0, 1)
            else:  # a 2-D transpose copy (blocked, fast)
                grad_table = grad_table.view(n_in * n_m, n_out).t().contiguous()
                grad_table = grad_table.view(n_out, n_in, n_m)
        return grad_x, grad_table, None, None, None, None, None, None


def coef_rows(coef: Tensor) -> Tensor:
    """(out, in, M) coefficients -> their (in, M, out) row table: a view when stored that way
    (a B-spline layer on the local path keeps them so), else a 2-D transpose copy (blocked and
    fast, unlike a 3-D permute copy)."""
    rows = coef.detach().permute(1, 2, 0)
    if rows.is_contiguous():
        return rows
    n_out, n_in, n_m = coef.shape
    with torch.no_grad():
        return coef.reshape(n_out, n_in * n_m).t().contiguous().view(n_in, n_m, n_out)


def backward_chunk_rows(n_b: int, n_in: int, n_s: int, table: Tensor) -> int:
    """Samples per backward block: g's rows of a block stay in cache (they are gathered in
    random order), unless re-adding the table gradient per block would cost more than that."""
    if table.is_cuda:
        return max(n_b, 1)
    n_out = table.shape[-1]
    step = max(1, BACKWARD_G_BYTES // (n_out * table.element_size()))
    blocks = -(-n_b // step)
    if blocks > 1 and (blocks - 1) * table.numel() > BACKWARD_ADD_RATIO * n_b * n_in * n_s * n_out:
        return max(n_b, 1)
    return step


def _backward_block(
    table: Tensor,
    base: Tensor,
    weights: Tensor,
    dweights: Tensor | None,
    g: Tensor,
    slope_scale: float,
    need_x: bool,
    need_table: bool,
    slopes: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """grad_x (B, in) and grad_table (in, R, out) of one block of samples.

    ``dweights`` None means the linear lookup: weights (1 - t, t), grad_x from slopes.
    """
    n_in, n_rows, n_out = table.shape
    n_s = weights.shape[-1]
    rows = sort_rows(base, n_rows)
    grad_x = grad_table = None
    if need_x:
        if dweights is None:
            dots = slope_dots(rows, table, g, slopes).mul_(slope_scale)
        else:
            dw = dweights.reshape(-1, n_s).index_select(0, rows.order)
            flat = table.reshape(-1, n_out)
            dots = sampled_dots(rows, flat, g, 0).mul_(dw[:, 0])
            for s in range(1, n_s):
                dots.addcmul_(sampled_dots(rows, flat, g, s), dw[:, s])
        grad_x = unsort(rows, dots, tuple(base.shape))
    if need_table:
        flat_w = weights.reshape(-1, n_s)  # one strided gather per shift: no (n, S) transpose
        if dweights is None and n_s == 2:  # the lookup's (1 - t, t): gather t only
            t = flat_w[:, 1].index_select(0, rows.order)
            w = [torch.rsub(t, 1.0), t]
        else:
            w = [flat_w[:, s].index_select(0, rows.order) for s in range(n_s)]
        grad_table = segment_sums(rows, g, w)
        grad_table = grad_table.reshape(n_in, n_rows, n_out)
    return grad_x, grad_table


SCALE_GROUP_BYTES = 1 << 20  # rows per chunk of the row-scale gradient's reused product buffer


class ScaleRowsFn(torch.autograd.Function):
    """rows (in, M, out) * scale (in, out) broadcast over M, for (in, M, out)-stored coefficients.

    Autograd's own product would allocate a second table-sized tensor in the backward just to
    sum it over M for the scale's gradient; here that product goes through one cache-sized
    buffer, input group by input group.
    """

    @staticmethod
    def forward(rows: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        return rows * scale.unsqueeze(1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        rows, scale = ctx.saved_tensors
        grad_rows = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_rows = g * scale.unsqueeze(1)
        if ctx.needs_input_grad[1]:
            n_in, n_m, n_out = rows.shape
            step = max(1, SCALE_GROUP_BYTES // max(1, n_m * n_out * rows.element_size()))
            buf = rows.new_empty(min(step, n_in), n_m, n_out)
            grad_scale = rows.new_empty(n_in, n_out)
            for s in range(0, n_in, step):
                e = min(s + step, n_in)
                part = torch.mul(g[s:e], rows[s:e], out=buf[: e - s])
                torch.sum(part, 1, out=grad_scale[s:e])
        return grad_rows, grad_scale
