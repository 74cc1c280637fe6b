"""Symbolic KAN layers: per-edge suggestions, ``auto_symbolic`` locking, ``symbolic_formula``.

``fit_layer`` samples every edge of a layer (over its grid, or over the range of data that
reaches it) and ranks the library's forms for each (``model/symbolic.py``).

``auto_symbolic`` fits every live edge (``model/symbolic.py``), and where the best form
reaches the R² threshold it locks the edge to that form with the layer's own
``lock(fn=...)`` (the spline is refitted to the form and frozen; the base branch is set to
0) and records the fit in ``layer.symbolic_edges[(out, in)]``. The model keeps evaluating
splines, so a locked edge equals its formula up to the spline's approximation error.

``symbolic_formula`` composes the recorded forms layer by layer: output q of a layer is
``sum_p a·f(b·x_p + c) + d`` over its unpruned edges (a pruned edge is exactly 0). It needs
every unpruned edge to be locked with a recorded form (an unlocked edge may have drifted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .symbolic import LibraryLike, SymbolicFit, fit_many

if TYPE_CHECKING:
    from .layers import KAN, KANLinear


@torch.no_grad()
def edge_samples(layer: KANLinear, x: Tensor | None = None, n_points: int = 128) -> Tensor:
    """(n_points, in) inputs spread evenly over each input's grid, or over its range in ``x``.

    Pass the activations that reach the layer as ``x`` to fit only where data lives (a
    ReLU-fed input never goes below 0; its untrained half of the grid would spoil the fit).
    """
    if x is None:
        return layer.input_domain(n_points, widen=0.0)
    layer._check_input(x)
    x2 = x.detach().reshape(-1, layer.in_features).to(layer.grid_scale)
    lo, hi = x2.min(0).values, x2.max(0).values
    steps = torch.linspace(0, 1, n_points, dtype=x2.dtype, device=x2.device)[:, None]
    return lo + (hi - lo) * steps


@torch.no_grad()
def fit_layer(
    layer: KANLinear,
    library: LibraryLike = None,
    x: Tensor | None = None,
    n_points: int = 128,
    complexity_weight: float = 0.5,
    inputs: Sequence[int] | None = None,
    outputs: Sequence[int] | None = None,
    **search: Any,
) -> dict[tuple[int, int], list[SymbolicFit]]:
    """Ranked fits for every (out, in) edge (or the given inputs/outputs) of ``layer``."""
    xs = edge_samples(layer, x, n_points)
    acts = layer.edge_activations(xs).detach().cpu().double()  # (S, out, in)
    xs = xs.detach().cpu().double()
    ins = range(layer.in_features) if inputs is None else inputs
    outs = list(range(layer.out_features) if outputs is None else outputs)
    fits: dict[tuple[int, int], list[SymbolicFit]] = {}
    for p in ins:
        ranked = fit_many(xs[:, p], acts[:, outs, p], library, complexity_weight, **search)
        for q, candidates in zip(outs, ranked, strict=True):
            fits[(q, p)] = candidates
    return fits


def suggest_symbolic(
    layer: KANLinear,
    in_idx: int,
    out_idx: int,
    library: LibraryLike = None,
    top: int = 5,
    x: Tensor | None = None,
    **kwargs: Any,
) -> list[SymbolicFit]:
    """The ``top`` best forms for edge (in_idx -> out_idx), best first."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top!r}")
    layer._edge_index(in_idx, out_idx)  # validates both indices
    fits = fit_layer(layer, library, x, inputs=[in_idx], outputs=[out_idx], **kwargs)
    return fits[(out_idx, in_idx)][:top]


@dataclass
class EdgeReport:
    """The best form of one edge and whether ``auto_symbolic`` locked it."""

    layer: int
    in_idx: int
    out_idx: int
    best: SymbolicFit | None
    locked: bool

    @property
    def r2(self) -> float:
        return self.best.r2 if self.best is not None else float("nan")

    def to_dict(self) -> dict[str, Any]:
        best = self.best.to_dict() if self.best is not None else None
        return {
            "layer": self.layer,
            "in": self.in_idx,
            "out": self.out_idx,
            "locked": self.locked,
            "best": best,
        }


def _records(layer: KANLinear) -> dict[tuple[int, int], SymbolicFit]:
    if not hasattr(layer, "symbolic_edges"):
        layer.symbolic_edges = {}
    return layer.symbolic_edges


def _lock_fn(fit: SymbolicFit):
    """fit as a torch function that never returns NaN/inf (lock evaluates it on every input)."""
    return lambda x: torch.nan_to_num(fit(x.double()), nan=0.0, posinf=0.0, neginf=0.0).to(x.dtype)


@torch.no_grad()
def auto_symbolic_layer(
    layer: KANLinear,
    r2_threshold: float = 0.99,
    library: LibraryLike = None,
    x: Tensor | None = None,
    layer_index: int = 0,
    lock: bool = True,
    **kwargs: Any,
) -> list[EdgeReport]:
    """Fit every unpruned edge; lock those whose best form has R² >= ``r2_threshold``."""
    if not 0.0 <= r2_threshold <= 1.0:
        raise ValueError(f"r2_threshold must be in [0, 1], got {r2_threshold!r}")
    fits = fit_layer(layer, library, x, **kwargs)
    live = layer.edge_mask.cpu() > 0
    reports = []
    for (q, p), ranked in sorted(fits.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if not live[q, p]:
            continue
        best = ranked[0] if ranked else None
        locked = False
        if lock and best is not None and best.r2 >= r2_threshold:
            layer.lock(p, q, fn=_lock_fn(best))
            _records(layer)[(q, p)] = best
            locked = True
        reports.append(EdgeReport(layer_index, p, q, best, locked))
    return reports


@torch.no_grad()
def auto_symbolic_kan(
    kan: KAN,
    r2_threshold: float = 0.99,
    library: LibraryLike = None,
    x: Tensor | None = None,
    **kwargs: Any,
) -> list[EdgeReport]:
    """``auto_symbolic_layer`` on each layer in order; with ``x`` each layer is fitted over the
    activations that reach it (computed after the earlier layers were locked)."""
    reports: list[EdgeReport] = []
    for i, layer in enumerate(kan.layers):
        reports += auto_symbolic_layer(layer, r2_threshold, library, x, layer_index=i, **kwargs)
        if x is not None:
            x = layer(x)
    return reports


def round_floats(expr: Any, digits: int) -> Any:
    """Round every float constant of a sympy expression to ``digits`` decimals (integers exact)."""
    import sympy as sp

    repl = {}
    for f in expr.atoms(sp.Float):
        value = round(float(f), digits)
        repl[f] = sp.Integer(int(value)) if value == int(value) else sp.Float(value, 15)
    return expr.xreplace(repl)


def layer_formulas(layer: KANLinear, inputs: Sequence[Any], layer_index: int = 0) -> list[Any]:
    """Sympy expressions of the layer's outputs in terms of ``inputs`` (one per input)."""
    import sympy as sp

    records = _records(layer)
    keep = layer.edge_mask.cpu() > 0
    locked = layer.lock_mask.cpu()
    missing = [
        (q, p)
        for q in range(layer.out_features)
        for p in range(layer.in_features)
        if keep[q, p] and not (locked[q, p] and (q, p) in records)
    ]
    if missing:
        q, p = missing[0]
        raise ValueError(
            f"layer {layer_index}: {len(missing)} edge(s) have no symbolic form, first in {p} -> "
            f"out {q}; run auto_symbolic (maybe with a lower r2_threshold) or prune them"
        )
    outs = []
    for q in range(layer.out_features):
        terms = [records[(q, p)].expr(inputs[p]) for p in range(layer.in_features) if keep[q, p]]
        outs.append(sp.Add(*terms))
    return outs


def symbolic_formula(
    kan: KAN,
    var_names: Sequence[str] | None = None,
    simplify: bool = True,
    digits: int = 4,
) -> list[Any]:
    """One sympy expression per output of ``kan`` in the input names (default x1, x2, ...)."""
    import sympy as sp

    n_in = kan.layers[0].in_features
    names = list(var_names) if var_names is not None else [f"x{i + 1}" for i in range(n_in)]
    if len(names) != n_in:
        raise ValueError(f"var_names: expected {n_in} names, got {len(names)}")
    exprs: list[Any] = [sp.Symbol(n) for n in names]
    for i, layer in enumerate(kan.layers):
        exprs = [round_floats(e, digits + 2) for e in layer_formulas(layer, exprs, i)]
    out = []
    for e in exprs:
        e = round_floats(e, digits)
        if simplify:
            e = round_floats(sp.simplify(e), digits)
        out.append(e)
    return out
