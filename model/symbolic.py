"""Symbolic regression of learned KAN edges: fit ``a·f(b·x + c) + d`` for each f of a library.

For one edge phi(x) sampled at S points, and one candidate f, the fit searches (b, c) on a
grid and zooms in around the best point (as pykan does); for fixed (b, c) the best (a, d)
are ordinary least squares, so a point's R² is the squared correlation of f(b·x + c) with
phi. x is first mapped onto [-1, 1] so the search box (b, c) in [-10, 10]² means the same
for every input range. Candidates are ranked by ``log10(1 - R² + 1e-6) + weight ·
complexity`` (lower is better): one step of complexity must buy a ~3x smaller residual
(weight 0.5), so ``x²`` beats a Gaussian that fits the same parabola marginally better.

Design decision: the candidate values f(b·t + c) depend on the input only, not on the
output, so the coarse search is one matmul over all outputs of an input; only the zoom runs
per edge. Candidates whose inner interval leaves f's domain (log, sqrt, 1/x, tan poles) are
rejected, so every suggested formula is finite over the whole fitted range.

KAN layers (``suggest_symbolic``, ``auto_symbolic``) and formulas are in
``symbolic_formula.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

SEARCHES = ("full", "shift", "scale", "none")
_R2_EPS = 1e-6  # residual floor of the ranking score: below it, fits count as exact


def _sympy():
    import sympy

    return sympy


def _no_pole(poles_at: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """Validity check for periodic poles: lo and hi lie between the same two poles."""
    return lambda lo, hi: poles_at(lo) == poles_at(hi)


@dataclass(frozen=True)
class SymbolicFunction:
    """One library entry: ``torch_fn`` and ``sympy_fn`` compute the same f(u).

    ``search`` says which inner parameters the fit searches: ``full`` (b and c), ``shift``
    (c only, b = ±1: f(b·u) is f(u) up to a factor, e.g. powers), ``scale`` (b only, c = 0:
    f(u + c) is f(u) up to a factor, e.g. exp) or ``none`` (b = 1, c = 0). ``valid(lo, hi)``
    says for which inner intervals [lo, hi] f is finite (None: everywhere).
    """

    name: str
    torch_fn: Callable[[Tensor], Tensor]
    sympy_fn: Callable[[Any], Any]
    complexity: int = 2
    search: str = "full"
    valid: Callable[[Tensor, Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.complexity < 0:
            raise ValueError(f"complexity must be >= 0, got {self.complexity!r}")


def _default_library() -> dict[str, SymbolicFunction]:
    sp = _sympy
    half_pi = math.pi / 2
    entries = [
        SymbolicFunction("0", torch.zeros_like, lambda u: 0, 0, "none"),
        SymbolicFunction("x", lambda u: u, lambda u: u, 1, "none"),
        SymbolicFunction("x^2", lambda u: u**2, lambda u: u**2, 2, "shift"),
        SymbolicFunction("x^3", lambda u: u**3, lambda u: u**3, 3, "shift"),
        SymbolicFunction("x^4", lambda u: u**4, lambda u: u**4, 4, "shift"),
        SymbolicFunction(
            "1/x", lambda u: 1 / u, lambda u: 1 / u, 2, "shift", lambda lo, hi: (lo > 0) | (hi < 0)
        ),
        SymbolicFunction(
            "sqrt", torch.sqrt, lambda u: sp().sqrt(u), 2, "shift", lambda lo, hi: lo >= 0
        ),
        SymbolicFunction("exp", torch.exp, lambda u: sp().exp(u), 2, "scale"),
        SymbolicFunction(
            "log", torch.log, lambda u: sp().log(u), 2, "shift", lambda lo, hi: lo > 0
        ),
        SymbolicFunction("sin", torch.sin, lambda u: sp().sin(u), 3),
        SymbolicFunction(
            "tan",
            torch.tan,
            lambda u: sp().tan(u),
            4,
            valid=_no_pole(lambda v: torch.floor((v - half_pi) / math.pi)),
        ),
        SymbolicFunction("tanh", torch.tanh, lambda u: sp().tanh(u), 3),
        SymbolicFunction("abs", torch.abs, lambda u: sp().Abs(u), 2, "shift"),
        SymbolicFunction("sigmoid", torch.sigmoid, lambda u: 1 / (1 + sp().exp(-u)), 3),
        SymbolicFunction("gaussian", lambda u: torch.exp(-(u**2)), lambda u: sp().exp(-(u**2)), 3),
    ]
    return {e.name: e for e in entries}


DEFAULT_LIBRARY: dict[str, SymbolicFunction] = _default_library()

LibraryLike = Mapping[str, SymbolicFunction] | Sequence[str | SymbolicFunction] | None


def make_library(library: LibraryLike = None) -> dict[str, SymbolicFunction]:
    """Library from None (the default), names of default entries and/or SymbolicFunctions."""
    if library is None:
        return dict(DEFAULT_LIBRARY)
    items = library.values() if isinstance(library, Mapping) else library
    out: dict[str, SymbolicFunction] = {}
    for item in items:
        if isinstance(item, str):
            if item not in DEFAULT_LIBRARY:
                raise ValueError(
                    f"library: unknown function {item!r}; known: {sorted(DEFAULT_LIBRARY)} "
                    "(or pass a SymbolicFunction)"
                )
            item = DEFAULT_LIBRARY[item]
        if not isinstance(item, SymbolicFunction):
            raise ValueError(f"library entries must be names or SymbolicFunction, got {item!r}")
        out[item.name] = item
    if not out:
        raise ValueError("library is empty")
    return out


@dataclass
class SymbolicFit:
    """``a·f(b·x + c) + d`` fitted to one edge, with its R² and ranking score."""

    name: str
    a: float
    b: float
    c: float
    d: float
    r2: float
    complexity: int
    score: float
    fn: SymbolicFunction = field(repr=False, compare=False)

    def __call__(self, x: Tensor) -> Tensor:
        """Evaluate the fitted form on a torch tensor (elementwise)."""
        return self.a * self.fn.torch_fn(self.b * x + self.c) + self.d

    def expr(self, var: Any) -> Any:
        """The fitted form as a sympy expression of ``var`` (a symbol or an expression)."""
        sp = _sympy()
        inner = var if (self.b, self.c) == (1.0, 0.0) else sp.Float(self.b) * var + sp.Float(self.c)
        return sp.Float(self.a) * self.fn.sympy_fn(inner) + sp.Float(self.d)

    def to_dict(self) -> dict[str, float | int | str]:
        keys = ("name", "a", "b", "c", "d", "r2", "complexity", "score")
        return {k: getattr(self, k) for k in keys}


# ---------------------------------------------------------------------- search


def _axis_values(mode: str, axis: str, span: float, grid: int) -> Tensor:
    searched = {"full": "bc", "shift": "c", "scale": "b", "none": ""}[mode]
    if axis in searched:
        return torch.linspace(-span, span, grid, dtype=torch.float64)
    if axis == "b":
        return torch.tensor([-1.0, 1.0] if mode == "shift" else [1.0], dtype=torch.float64)
    return torch.zeros(1, dtype=torch.float64)


def _candidates(fn: SymbolicFunction, t: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """f(b·t + c) for parameter sets (..., P) at points t (S,): values (..., P, S), ok (..., P).

    Rows that are not ok may hold NaN/inf; every consumer masks them by ``ok``.
    """
    u = fn.torch_fn(torch.addcmul(c.unsqueeze(-1), b.unsqueeze(-1), t))
    if not torch.is_tensor(u):
        u = torch.as_tensor(u, dtype=torch.float64)
    u = torch.broadcast_to(u, (*b.shape, t.shape[0])).to(torch.float64)
    ok = torch.isfinite(u.sum(-1))  # also rejects values so large that they overflow
    if fn.valid is not None:
        lo, hi = torch.minimum(c - b, c + b), torch.maximum(c - b, c + b)  # t spans [-1, 1]
        ok = ok & fn.valid(lo, hi)
    return u, ok


def _r2(u: Tensor, ok: Tensor, yc: Tensor, y_ss: Tensor) -> Tensor:
    """Squared correlation of each row of u (..., P, S) with yc (..., S, E) -> (..., P, E).

    yc is centred, so u needs no centring for the covariance; sum(u²) - S·mean² is its
    spread (a row flat to 1e-10 of its size counts as constant: it explains nothing).
    """
    total = u.sum(-1)
    sq = torch.linalg.vecdot(u, u)
    u_ss = sq - total**2 / u.shape[-1]
    flat = u_ss <= 1e-10 * (1 + sq)
    cov = u @ yc
    r2 = cov**2 / (u_ss.clamp_min(1e-300).unsqueeze(-1) * y_ss.clamp_min(1e-300))
    bad = (~ok | flat).unsqueeze(-1)
    return torch.where(bad, torch.full_like(r2, -1.0), r2.clamp(max=1.0))


def _refine(
    fn: SymbolicFunction, t: Tensor, yc: Tensor, b: Tensor, c: Tensor, free: Tensor, steps: int
) -> tuple[Tensor, Tensor]:
    """Levenberg-Marquardt on the residual of the best a·f(b·t + c) + d; yc (E, S) centred.

    Variable projection (Kaufman's Jacobian): a and d are solved exactly for each (b, c), so
    the Jacobian columns d(a·f)/db = a·f'·t and d(a·f)/dc = a·f' are projected off the
    constant and off f itself. f' comes from autograd, so user functions need no derivative.
    A step is kept only if it lowers the residual and stays finite and inside f's domain;
    ``free`` (2,) masks the parameters the function's search mode fixes.
    """

    def evaluate(bb: Tensor, cc: Tensor):
        with torch.enable_grad():
            v = torch.addcmul(cc[:, None], bb[:, None], t).requires_grad_(True)
            u = fn.torch_fn(v)
            du = torch.autograd.grad(u.sum(), v, allow_unused=True)[0] if u.requires_grad else None
        u = u.detach()
        du = torch.zeros_like(u) if du is None else du.detach()
        uc = u - u.mean(-1, keepdim=True)
        u_ss = (uc * uc).sum(-1).clamp_min(1e-300)
        a = (uc * yc).sum(-1) / u_ss
        res = yc - a[:, None] * uc
        loss = (res * res).sum(-1)
        ok = torch.isfinite(loss) & torch.isfinite(du).all(-1)
        if fn.valid is not None:
            ok = ok & fn.valid(torch.minimum(cc - bb, cc + bb), torch.maximum(cc - bb, cc + bb))
        return torch.where(ok, loss, torch.full_like(loss, math.inf)), a, du, uc, u_ss, res

    b, c = b.clone(), c.clone()
    cur, a, du, uc, u_ss, res = evaluate(b, c)
    lam = torch.full_like(cur, 1e-3)
    stalled = 0
    for _ in range(steps):
        before = cur
        jac = torch.stack([a[:, None] * du * t, a[:, None] * du], dim=-1)  # (E, S, 2)
        jac = jac - jac.mean(1, keepdim=True)
        jac = jac - uc.unsqueeze(-1) * (
            (uc.unsqueeze(-1) * jac).sum(1, keepdim=True) / u_ss[:, None, None]
        )
        jac = torch.nan_to_num(jac) * free
        jtj = jac.transpose(1, 2) @ jac + torch.diag(1 - free)
        jtr = (jac.transpose(1, 2) @ torch.nan_to_num(res).unsqueeze(-1)).squeeze(-1)
        damp = lam[:, None, None] * torch.diag_embed(jtj.diagonal(dim1=1, dim2=2) + 1e-12)
        step = torch.linalg.solve(jtj + damp, jtr.unsqueeze(-1)).squeeze(-1) * free
        step = torch.nan_to_num(step)
        new = evaluate(b + step[:, 0], c + step[:, 1])
        better = new[0] < cur
        b = torch.where(better, b + step[:, 0], b)
        c = torch.where(better, c + step[:, 1], c)
        cur, a, du, uc, u_ss, res = (
            torch.where(better.reshape(-1, *([1] * (o.dim() - 1))), n, o)
            for n, o in zip(new, (cur, a, du, uc, u_ss, res), strict=True)
        )
        lam = torch.where(better, lam / 3, lam * 5).clamp(1e-12, 1e12)
        gained = (before - cur) > 1e-9 * before.abs()  # a relative gain worth another step
        stalled = 0 if bool(gained.any()) else stalled + 1
        if stalled >= 2:
            break  # converged: two steps in a row improved no edge noticeably
    return b, c


@torch.no_grad()
def fit_function(
    x: Tensor,
    y: Tensor,
    fn: SymbolicFunction,
    span: float = 10.0,
    grid: int = 41,
    zoom_grid: int = 11,
    iterations: int = 2,
    atol: float = 1e-6,
    zoom_min_r2: float = 0.3,
    refine_steps: int = 20,
) -> Tensor:
    """Fit ``a·fn(b·x + c) + d`` to E functions sampled at the same points.

    x (S,), y (S, E) -> (E, 5) rows ``a, b, c, d, r2`` (b, c in x's own units). Coarse grid
    of ``grid``² points over (b, c) in [-span, span]² (after mapping x onto [-1, 1]), then
    ``iterations`` zooms of ``zoom_grid``² points over one step around the best (only for
    functions whose coarse R² reaches ``zoom_min_r2``: the zoom cannot rescue the others),
    then up to ``refine_steps`` Levenberg-Marquardt steps (the grid alone stalls on the
    narrow curved ridges that b and c often form, e.g. cosh(b·x + c)).
    A function that is constant within ``atol`` fits every form with a = 0 and R² = 1.
    """
    x = x.detach().to(torch.float64).reshape(-1)
    y = y.detach().to(torch.float64).reshape(x.shape[0], -1)
    mid, half = (x.max() + x.min()) / 2, ((x.max() - x.min()) / 2).clamp_min(1e-12)
    t = (x - mid) / half
    y_mean = y.mean(0)
    yc = y - y_mean
    y_ss = (yc**2).sum(0)  # (E,)

    b_axis = _axis_values(fn.search, "b", span, grid)
    c_axis = _axis_values(fn.search, "c", span, grid)
    bb, cc = torch.meshgrid(b_axis, c_axis, indexing="ij")
    b0, c0 = bb.reshape(-1), cc.reshape(-1)
    u, ok = _candidates(fn, t, b0, c0)
    coarse = _r2(u, ok, yc, y_ss)
    best = coarse.argmax(0)  # (E,)
    b_best, c_best = b0[best], c0[best]
    zoom = torch.nonzero(coarse.max(0).values >= zoom_min_r2).flatten()

    steps = {
        axis: (2 * span / (grid - 1) if len(vals) == grid else 0.0)
        for axis, vals in (("b", b_axis), ("c", c_axis))
    }
    for _ in range(iterations if any(steps.values()) and len(zoom) else 0):
        offsets = {
            axis: torch.linspace(-s, s, zoom_grid, dtype=torch.float64)
            if s
            else torch.zeros(1, dtype=torch.float64)
            for axis, s in steps.items()
        }
        db, dc = (o.reshape(-1) for o in torch.meshgrid(offsets["b"], offsets["c"], indexing="ij"))
        bz = b_best[zoom, None] + db[None, :]  # (Z, P) for the Z edges worth zooming
        cz = c_best[zoom, None] + dc[None, :]
        u, ok = _candidates(fn, t, bz, cz)  # (Z, P, S)
        r2 = _r2(u, ok, yc.t()[zoom].unsqueeze(-1), y_ss[zoom, None, None])[..., 0]  # (Z, P)
        pick = r2.argmax(1)
        rows = torch.arange(len(zoom))
        b_best, c_best = b_best.clone(), c_best.clone()
        b_best[zoom], c_best[zoom] = bz[rows, pick], cz[rows, pick]
        steps = {axis: s * 2 / (zoom_grid - 1) for axis, s in steps.items()}
    if refine_steps and len(zoom) and any(steps.values()):
        free = torch.tensor([float(bool(steps["b"])), float(bool(steps["c"]))], dtype=t.dtype)
        b_best, c_best = b_best.clone(), c_best.clone()
        b_best[zoom], c_best[zoom] = _refine(
            fn, t, yc.t()[zoom], b_best[zoom], c_best[zoom], free, refine_steps
        )

    u, ok = _candidates(fn, t, b_best, c_best)  # (E, S)
    u = torch.where(ok.unsqueeze(-1), u, torch.zeros_like(u))
    uc = u - u.mean(-1, keepdim=True)
    u_ss = (uc**2).sum(-1)
    a = torch.where(
        u_ss > 0, (uc * yc.t()).sum(-1) / u_ss.clamp_min(1e-300), torch.zeros_like(u_ss)
    )
    a = torch.where(ok, a, torch.zeros_like(a))
    d = y_mean - a * u.mean(-1)
    res = ((a[:, None] * u + d[:, None] - y.t()) ** 2).sum(-1)
    r2 = torch.where(y_ss > 0, 1 - res / y_ss.clamp_min(1e-300), torch.zeros_like(res))
    r2 = torch.where(ok, r2.clamp_min(0.0), torch.full_like(r2, -1.0))
    constant = y.std(0, unbiased=False) <= atol
    a = torch.where(constant, torch.zeros_like(a), a)
    d = torch.where(constant, y_mean, d)
    r2 = torch.where(constant, torch.ones_like(r2), r2)
    # back to x's units: b·t + c = (b/half)·x + (c - b·mid/half)
    b_x, c_x = b_best / half, c_best - b_best * mid / half
    return torch.stack([a, b_x, c_x, d, r2], dim=1)


def rank_score(r2: float, complexity: int, complexity_weight: float) -> float:
    """Lower is better: log10 of the residual share plus the weighted complexity."""
    return math.log10(max(1.0 - r2, 0.0) + _R2_EPS) + complexity_weight * complexity


def fit_many(
    x: Tensor,
    y: Tensor,
    library: LibraryLike = None,
    complexity_weight: float = 0.5,
    **search: Any,
) -> list[list[SymbolicFit]]:
    """Every library form fitted to each of E functions: x (S,), y (S, E) -> E ranked lists."""
    lib = make_library(library)
    y2 = y.reshape(x.reshape(-1).shape[0], -1)
    per_edge: list[list[SymbolicFit]] = [[] for _ in range(y2.shape[1])]
    for fn in lib.values():
        params = fit_function(x, y2, fn, **search).tolist()
        for e, (a, b, c, d, r2) in enumerate(params):
            if r2 < 0:  # no valid parameters inside the search box
                continue
            if fn.name in ("x", "0"):  # a·(b·x + c) + d is a line (or a constant): say so
                a, b, c, d = (a * b, 1.0, 0.0, a * c + d) if fn.name == "x" else (0.0, 1.0, 0.0, d)
            score = rank_score(r2, fn.complexity, complexity_weight)
            per_edge[e].append(SymbolicFit(fn.name, a, b, c, d, r2, fn.complexity, score, fn))
    for fits in per_edge:
        fits.sort(key=lambda f: f.score)
    return per_edge
