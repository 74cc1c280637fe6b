"""CPU speed of kanmoe's KAN layers against an efficient-kan-style baseline and peer libraries.

Times forward (under ``torch.no_grad``) and forward+backward (input requires grad, fixed
random output gradient, grads set to None between runs) for one in=out layer at several batch
sizes. Implementations are interleaved round by round in a shuffled order so machine noise hits
all of them alike; medians (and p10/p90) are reported with ratios against the common baseline.
A missing or failing implementation becomes a row saying why, never a crash.

Run from the repo root: ``python benchmarks/kan_layers.py`` (``make bench-kan``); ``--quick``
is a smoke run (< 60 s) that never writes RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # sibling module: the script runs as a file, not as a package

BASELINE_SHORT = "efficient-kan-style B-spline"
BASELINE = f"{BASELINE_SHORT} (baseline)"
OUR_BASES = ("bspline", "rbf", "linear")


class EfficientKANStyleLayer(nn.Module):
    """The common baseline: a plain efficient-kan-style B-spline KAN layer, autograd only.

    Knots are stored per input, shape (in, G + 2K + 1); bases come from the Cox–de Boor
    recursion with broadcast divisions by knot differences. Output =
    silu(x) @ base_weight.T + bases(x).view(B, -1) @ (spline_weight * scaler).view(out, -1).T.
    Spline coefficients start as small noise (values do not affect timing).
    """

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, order: int = 3):
        super().__init__()
        self.in_features, self.out_features, self.order = in_features, out_features, order
        h = 2.0 / grid_size
        knots = torch.arange(-order, grid_size + order + 1, dtype=torch.float32) * h - 1.0
        self.register_buffer("grid", knots.expand(in_features, -1).contiguous())
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(
            torch.randn(out_features, in_features, grid_size + order) * 0.1 / grid_size
        )
        self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5))

    def b_splines(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in) -> (B, in, G + K) B-spline bases."""
        g = self.grid
        x = x.unsqueeze(-1)
        bases = ((x >= g[:, :-1]) & (x < g[:, 1:])).to(x.dtype)
        for k in range(1, self.order + 1):
            left = (x - g[:, : -(k + 1)]) / (g[:, k:-1] - g[:, : -(k + 1)]) * bases[:, :, :-1]
            right = (g[:, k + 1 :] - x) / (g[:, k + 1 :] - g[:, 1:(-k)]) * bases[:, :, 1:]
            bases = left + right
        return bases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in) -> (B, out)."""
        base = F.linear(F.silu(x), self.base_weight)
        weight = (self.spline_weight * self.spline_scaler.unsqueeze(-1)).view(self.out_features, -1)
        spline = F.linear(self.b_splines(x).view(x.shape[0], -1), weight)
        return base + spline


def check_baseline() -> None:
    """Guard the baseline against silent breakage: B-spline bases partition unity in range."""
    layer = EfficientKANStyleLayer(3, 2, grid_size=4, order=3).double()
    x = torch.linspace(-1, 1 - 1e-9, 101, dtype=torch.float64).unsqueeze(-1).expand(-1, 3)
    bases = layer.b_splines(x)
    if bases.min() < 0 or (bases.sum(-1) - 1).abs().max() > 1e-9:
        raise RuntimeError("baseline b_splines no longer form a partition of unity on [-1, 1)")


class FirstOutput(nn.Module):
    """pykan's KANLayer returns (y, preacts, postacts, postspline); time it as users call it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[0]


@dataclass
class Impl:
    """One row: a built module (or why it could not be built) plus its samples in seconds."""

    name: str
    module: nn.Module | None = None
    note: str = ""
    compile_: bool = False
    fwd: list[float] = field(default_factory=list)
    fb: list[float] = field(default_factory=list)
    budget: int = 0

    @property
    def ok(self) -> bool:
        return self.module is not None


def _short(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:160] + ("…" if len(text) > 160 else "")


def _pykan_skip(batch: int, n: int, args: argparse.Namespace) -> str | None:
    """Why pykan is not run at this size, or None. Its fwd+bwd keeps ~8 (B, out, in) tensors."""
    if batch > args.pykan_max_batch:
        return f"skipped: batch > --pykan-max-batch {args.pykan_max_batch}"
    need = 8 * batch * n * n * 4
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as fh:
        have = next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("MemAvailable:"))
        if need > 0.6 * have:
            return f"skipped: needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free"
    return None


def sweep_name(basis: str, size: int) -> str:
    """Row name of one resolution-sweep layer (``linear``: control points, else grid size)."""
    return (
        f"sweep: kanmoe linear, {size} control points"
        if basis == "linear"
        else (f"sweep: kanmoe bspline, grid {size}")
    )


def _wanted(name: str, args: argparse.Namespace) -> bool:
    """--only keeps rows whose name contains one of the given substrings (and the baseline)."""
    return not args.only or name == BASELINE or any(o.lower() in name.lower() for o in args.only)


def build_impls(n: int, batch: int, args: argparse.Namespace) -> list[Impl]:
    """Every implementation to time at this size; failures to build become noted rows."""
    factories: list[tuple[str, Callable[[], nn.Module], bool]] = [
        (BASELINE, lambda: EfficientKANStyleLayer(n, n), False),
        (f"{BASELINE_SHORT} (torch.compile)", lambda: EfficientKANStyleLayer(n, n), True),
        ("nn.Linear (MLP reference)", lambda: nn.Linear(n, n), False),
    ]
    try:
        from kanmoe.model import KANLinear
    except Exception as exc:  # the layers may not exist yet, or fail to import
        reason = f"unavailable: {_short(exc)}"
        impls = [Impl(name=f"kanmoe {b}", note=reason) for b in OUR_BASES]
    else:
        impls = []
        for b in OUR_BASES:
            factories.append((f"kanmoe {b}", lambda b=b: KANLinear(n, n, basis=b), False))
            name = f"kanmoe {b} (torch.compile)"
            factories.append((name, lambda b=b: KANLinear(n, n, basis=b), True))
        for pts in args.sweep_points:
            factories.append(
                (
                    sweep_name("linear", pts),
                    lambda pts=pts: KANLinear(n, n, basis="linear", num_control_points=pts),
                    False,
                )
            )
        for grid in args.sweep_grids:
            factories.append(
                (sweep_name("bspline", grid), lambda g=grid: KANLinear(n, n, grid_size=g), False)
            )
    skip = _pykan_skip(batch, n, args)
    if skip:
        impls.append(Impl("pykan KANLayer", note=skip))
    else:

        def pykan() -> nn.Module:
            from kan import KANLayer

            return FirstOutput(KANLayer(in_dim=n, out_dim=n, num=5, k=3))

        factories.append(("pykan KANLayer", pykan, False))
    for impl in ("sparse_matmul_csr", "embedding_bag", "embedding"):

        def kd(impl: str = impl) -> nn.Module:
            try:
                from kanditioned.kan_layer import KANLayer
            except ImportError:  # the distribution's import name is KANditioned
                from KANditioned.kan_layer import KANLayer
            return KANLayer(n, n, init="random_normal", num_control_points=32, impl=impl)

        default = " default" if impl == "sparse_matmul_csr" else ""
        factories.append((f"kanditioned KANLayer ({impl}{default})", kd, False))

    for name, make, comp in factories:
        if not _wanted(name, args):
            continue
        if comp and not args.compile:
            impls.append(Impl(name=name, note="skipped (--no-compile / --quick)"))
            continue
        try:
            torch.manual_seed(0)
            module = make()
            impls.append(
                Impl(name=name, module=torch.compile(module) if comp else module, compile_=comp)
            )
        except Exception as exc:
            impls.append(Impl(name=name, note=f"failed to build: {_short(exc)}"))
    return [imp for imp in impls if _wanted(imp.name, args)]


# wall clock by default; --clock cpu uses this thread's CPU time (1 thread only), which other
# jobs on a shared machine inflate far less than the wall clock (preemption is not counted)
CLOCK: Callable[[], float] = time.perf_counter


def _fwd(module: nn.Module, x: torch.Tensor) -> float:
    t0 = CLOCK()
    with torch.no_grad():
        module(x)
    return CLOCK() - t0


def _fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    module.zero_grad(set_to_none=True)
    x.grad = None
    t0 = CLOCK()
    module(x).backward(grad)
    return CLOCK() - t0


def run_batch(n: int, batch: int, args: argparse.Namespace) -> list[Impl]:
    """Warm up every implementation, then time them interleaved in shuffled rounds."""
    impls = build_impls(n, batch, args)
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, n, generator=gen) * 2 - 1) * 0.99  # inside every layer's grid
    xg = x.clone().requires_grad_(True)
    grad = torch.randn(batch, n, generator=gen)
    for imp in impls:
        if not imp.ok:
            continue
        t0 = time.perf_counter()
        try:
            for _ in range(args.warmup):
                t_f, t_b = _fwd(imp.module, x), _fwd_bwd(imp.module, xg, grad)
            with torch.no_grad():
                y = imp.module(x)
                if tuple(y.shape) != (batch, n) or not torch.isfinite(y).all():
                    raise RuntimeError(f"bad output shape {tuple(y.shape)} or non-finite values")
                if imp.compile_:  # the compiled graph must compute what eager computes
                    err = (y - imp.module._orig_mod(x)).abs().max().item()
                    if err > 1e-3 * max(1.0, y.abs().max().item()):
                        raise RuntimeError(f"compiled output differs from eager by {err:.3g}")
        except Exception as exc:
            what = "compile failed" if imp.compile_ else "failed"
            imp.module, imp.note = None, f"{what}: {_short(exc)}"
            continue
        if imp.compile_:
            imp.note = f"compile+warm-up {time.perf_counter() - t0:.0f} s"
        # expensive rows (pykan at large batch) get fewer samples, never fewer than 3
        imp.budget = max(3, min(args.repeats, int(args.max_seconds / max(t_f + t_b, 1e-9))))
        if imp.budget < args.repeats:
            imp.note = (imp.note + "; " if imp.note else "") + f"{imp.budget} samples (time cap)"
    order = random.Random(batch)
    live = [imp for imp in impls if imp.ok]
    for _ in range(args.repeats):
        order.shuffle(live)
        for imp in live:
            if len(imp.fb) < imp.budget:
                imp.fwd.append(_fwd(imp.module, x))
                imp.fb.append(_fwd_bwd(imp.module, xg, grad))
    for imp in impls:
        imp.module = None  # free big peers (pykan) before the next batch size
    gc.collect()
    return impls


def _q(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def render(results: dict[int, list[Impl]]) -> str:
    """Markdown table: median ms (p10–p90) and time ÷ baseline time (lower is faster)."""
    lines = [
        "| implementation | batch | fwd ms, median (p10–p90) | fwd+bwd ms, median (p10–p90) "
        "| fwd ÷ baseline | fwd+bwd ÷ baseline | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for batch, impls in results.items():
        base = next((i for i in impls if i.name == BASELINE and i.fb), None)
        for imp in impls:
            if imp.name.startswith("sweep: "):
                continue
            if not imp.fb:
                lines.append(f"| {imp.name} | {batch} | — | — | — | — | {imp.note} |")
                continue
            pairs = ((imp.fwd, base.fwd if base else None), (imp.fb, base.fb if base else None))
            cells = [
                f"{median_ms(s):.2f} ({1e3 * _q(s, 0.1):.2f}–{1e3 * _q(s, 0.9):.2f})"
                for s, _ in pairs
            ]
            ratios = [f"{median_ms(s) / median_ms(r):.2f}×" if r else "—" for s, r in pairs]
            lines.append(
                f"| {imp.name} | {batch} | {' | '.join(cells)} | {' | '.join(ratios)} "
                f"| {imp.note} |"
            )
    return "\n".join(lines)


def _fb(results: dict[int, list[Impl]], batch: int, name: str) -> float | None:
    imp = next((i for i in results.get(batch, []) if i.name == name and i.fb), None)
    return median_ms(imp.fb) if imp else None


def render_sweep(results: dict[int, list[Impl]], args: argparse.Namespace) -> str:
    """Resolution sweep: each row's median times and its ratio to the coarsest of its basis."""
    lines = [
        "| layer | batch | fwd ms, median (p10–p90) | fwd+bwd ms, median (p10–p90) "
        "| fwd ÷ coarsest | fwd+bwd ÷ coarsest | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for batch, impls in results.items():
        by_name = {i.name: i for i in impls}
        for basis, sizes in (("linear", args.sweep_points), ("bspline", args.sweep_grids)):
            first = by_name.get(sweep_name(basis, sizes[0])) if sizes else None
            for size in sizes:
                imp = by_name.get(sweep_name(basis, size))
                if imp is None:
                    continue
                label = imp.name.removeprefix("sweep: ")
                if not imp.fb:
                    lines.append(f"| {label} | {batch} | — | — | — | — | {imp.note} |")
                    continue
                cells = [
                    f"{median_ms(v):.2f} ({1e3 * _q(v, 0.1):.2f}–{1e3 * _q(v, 0.9):.2f})"
                    for v in (imp.fwd, imp.fb)
                ]
                if first is not None and first.fb:
                    ratios = [
                        f"{median_ms(imp.fwd) / median_ms(first.fwd):.2f}×",
                        f"{median_ms(imp.fb) / median_ms(first.fb):.2f}×",
                    ]
                else:
                    ratios = ["—", "—"]
                row = [label, str(batch), *cells, *ratios, imp.note]
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _impl(results: dict[int, list[Impl]], batch: int, name: str) -> Impl | None:
    return next((i for i in results.get(batch, []) if i.name == name and i.fb), None)


def paired_ratio(num: Impl, den: Impl) -> float:
    """Median over rounds of fwd+bwd(num) / fwd+bwd(den) from the same round.

    Sample i of every row comes from round i (rounds shuffle the rows), so a pair saw the
    same background load: on a shared machine this moves far less than a ratio of medians.
    """
    return statistics.median(a / b for a, b in zip(num.fb, den.fb, strict=False))


def _ratio_goal(
    results: dict[int, list[Impl]], num: str, den: str, limit: float
) -> tuple[list[bool], list[str]]:
    """Per batch: paired fwd+bwd(num) / fwd+bwd(den) <= limit, with the ratio of medians too."""
    flags, parts = [], []
    for b in results:
        a, c = _impl(results, b, num), _impl(results, b, den)
        if a and c:
            ratio = paired_ratio(a, c)
            flags.append(ratio <= limit)
            parts.append(
                f"batch {b}: {ratio:.2f}× (medians {median_ms(a.fb) / median_ms(c.fb):.2f}×)"
            )
    return flags, parts


def target_checks(results: dict[int, list[Impl]], args: argparse.Namespace) -> list[str]:
    """The issues' targets, each as 'met' / 'not met' / 'not measured' with its numbers."""

    def verdict(flags: list[bool]) -> str:
        return "not measured" if not flags else ("**met**" if all(flags) else "**not met**")

    def line(text: str, flags: list[bool], parts: list[str]) -> str:
        return f"{text}: {verdict(flags)} ({', '.join(parts) or '—'})"

    out = [
        line(
            "1. kanmoe bspline fwd+bwd ≤ 0.7× baseline",
            *_ratio_goal(results, "kanmoe bspline", BASELINE, 0.7),
        ),
        line(
            "2. kanmoe linear (32 control points) fwd+bwd ≤ 0.6× kanmoe bspline (grid 5)",
            *_ratio_goal(results, "kanmoe linear", "kanmoe bspline", 0.6),
        ),
    ]

    flags, parts = [], []
    for b, impls in results.items():
        kd = [median_ms(i.fb) for i in impls if i.name.startswith("kanditioned") and i.fb]
        lin = _fb(results, b, "kanmoe linear")
        if kd and lin:
            flags.append(lin <= 1.05 * min(kd))
            parts.append(
                f"batch {b}: {lin:.2f} ms vs fastest kanditioned {min(kd):.2f} ms "
                f"= {lin / min(kd):.2f}×"
            )
    out.append(
        "3. kanmoe linear fwd+bwd no slower than kanditioned (5 % noise allowance): "
        f"{verdict(flags)} ({'; '.join(parts) or '—'})"
    )

    pts, grids = args.sweep_points, args.sweep_grids
    if 16 in pts and 256 in pts:
        flags, parts = _ratio_goal(
            results, sweep_name("linear", 256), sweep_name("linear", 16), 1.5
        )
        if 1024 in pts:
            _, big = _ratio_goal(results, sweep_name("linear", 1024), sweep_name("linear", 16), 0)
            parts = [
                f"{p}; 1024 points {q.split(': ')[1]}" for p, q in zip(parts, big, strict=True)
            ]
        out.append(line("4. linear fwd+bwd at 256 control points ≤ 1.5× at 16", flags, parts))
    if 5 in grids and 64 in grids:
        out.append(
            line(
                "5. bspline fwd+bwd at grid 64 ≤ 2× at grid 5",
                *_ratio_goal(results, sweep_name("bspline", 64), sweep_name("bspline", 5), 2.0),
            )
        )
    return out


def git_line() -> str:
    """Commit the numbers belong to, and whether model/ or kanmoe/ had uncommitted edits."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True)
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "model", "kanmoe")
    except OSError:
        return "unknown"
    return (head or "unknown") + (" (model/ or kanmoe/ had uncommitted edits)" if dirty else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 4096], help="batch sizes")
    p.add_argument("--features", type=int, default=256, help="in = out features")
    p.add_argument("--repeats", type=int, default=30, help="timed rounds per batch size")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per implementation")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default 2; --quick: 1)")
    p.add_argument(
        "--max-seconds", type=float, default=60.0, help="time cap per row (fewer samples)"
    )
    p.add_argument("--pykan-max-batch", type=int, default=4096, help="skip pykan above this batch")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time torch.compile rows",
    )
    p.add_argument(
        "--sweep-points",
        type=int,
        nargs="*",
        default=[16, 64, 256, 1024],
        help="linear-lookup control points of the resolution sweep (none: no sweep)",
    )
    p.add_argument(
        "--sweep-grids",
        type=int,
        nargs="*",
        default=[5, 16, 64],
        help="B-spline grid sizes of the resolution sweep (none: no sweep)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall clock, or this thread's CPU time (needs --threads 1; for a shared machine)",
    )
    p.add_argument("--note", default="", help="free text for RESULTS.md (e.g. machine shared)")
    p.add_argument("--only", nargs="+", default=(), help="row name substrings to keep")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (implies --no-write)")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    if min(args.batches) < 1 or min(args.features, args.repeats, args.threads, args.warmup) < 1:
        p.error("--batches, --features, --repeats, --warmup and --threads must be positive")
    if args.quick:
        args.batches, args.features, args.repeats, args.warmup = [64], 32, 5, 2
        args.sweep_points, args.sweep_grids = args.sweep_points[:2], args.sweep_grids[:2]
        args.no_write = True
        args.compile = False if args.compile is None else args.compile
    args.compile = True if args.compile is None else args.compile
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu measures one thread: use it with --threads 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    check_baseline()
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    dyn = torch._dynamo.config
    dyn.recompile_limit = max(dyn.recompile_limit, 64)  # one class, many instances and shapes
    dyn.accumulated_recompile_limit = max(dyn.accumulated_recompile_limit, 512)
    load0 = os.getloadavg()
    started = time.perf_counter()
    results: dict[int, list[Impl]] = {}
    for batch in args.batches:
        print(f"batch {batch}: timing…", file=sys.stderr, flush=True)
        results[batch] = run_batch(args.features, batch, args)
    load1 = os.getloadavg()
    command = shlex.join(
        ["python", "benchmarks/kan_layers.py", *(sys.argv[1:] if argv is None else argv)]
    )
    header = [
        f"## KAN layers: in = out = {args.features}, CPU, float32",
        "",
        f"- Machine: {results_file.machine_line()}",
        f"- torch {torch.__version__}, `torch.set_num_threads({args.threads})`, git {git_line()}",
        f"- Command: `{command}` (`make bench-kan` runs it with the defaults); "
        f"took {time.perf_counter() - started:.0f} s",
        f"- Load average (1 min) at start / end: {load0[0]:.1f} / {load1[0]:.1f}"
        + (
            " — the machine was busy with other work, so numbers are noisy"
            if max(load0[0], load1[0]) > args.threads
            else ""
        ),
        *([f"- Note: {args.note}"] if args.note else []),
        f"- Method: {args.warmup} warm-up calls, then up to {args.repeats} rounds with the "
        "implementations in shuffled order each round; fwd under `torch.no_grad()`; fwd+bwd with "
        "input requiring grad, `y.backward(fixed random grad)`, grads set to None between runs. "
        "Ratios are time ÷ baseline time (below 1 is faster); the targets' ratios are the median "
        "over rounds of the two rows' same-round ratio (ratio of medians in brackets). "
        "torch.compile rows are compiled "
        "during warm-up. Inputs uniform in (-0.99, 0.99). Clock: "
        + (
            "CPU time of the one timing thread (`time.thread_time`), not wall time"
            if args.clock == "cpu"
            else "wall time (`time.perf_counter`)"
        )
        + ".",
        "",
    ]
    checks = target_checks(results, args)
    sweep = []
    if args.sweep_points or args.sweep_grids:
        sweep = [
            "",
            "### Resolution sweep",
            "",
            "Same rounds as above; ratios against the coarsest layer of the same basis (a "
            "flat column is what 'resolution for free' means).",
            "",
            render_sweep(results, args),
        ]
    body = "\n".join([*header, render(results), *sweep, "", "### Targets", "", *checks])
    print(body)
    if args.no_write:
        print("\n(not written: --no-write/--quick)", file=sys.stderr)
    else:
        results_file.update_section("kan_layers", body)
        print(f"\nwritten to {results_file.RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
