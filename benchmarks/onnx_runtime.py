"""Per-row latency of exported kanmoe models: ONNX Runtime (CPU, function bodies) vs torch.

Models: the default California KAMoE (``default_run/`` if present, else an untrained model
of the default config's shape) and one ``KANLinear`` 64->64 per basis. Implementations:
torch eager, ``torch.compile``, ORT with the function bodies the exporter ships (closed-form
"cardinal" B-spline, value/slope lookup) and ORT with alternative body layouts for comparison
(Cox–de Boor recursion knots-first and rows-first as in efficient-kan; hat-matmul and
two-gather lookups).
Implementations are interleaved round by round so machine noise hits all of them alike;
the table gives median microseconds per row and the speed-up over torch eager.

Run from the repo root: ``python benchmarks/onnx_runtime.py [RUN_DIR]`` (``make bench-onnx``);
``--quick`` is a smoke run that does not write RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # sibling module: the script runs as a file, not as a package

from kanmoe.export import onnx_ops
from kanmoe.export.exporter import export_model
from kanmoe.paths import CONFIGS_DIR, PROJECT_ROOT

BATCHES = (1, 64, 4096)
CALIFORNIA_FEATURES = ["MedInc", "HouseAge", "AveRooms", "AveBedrms", "Population", "AveOccup",
                       "Latitude", "Longitude"]  # fmt: skip
DEFAULT_RUN = PROJECT_ROOT / "default_run"


def default_servable(run_dir: Path | None):
    """The trained default run, or an untrained model of the default config's shape."""
    from kanmoe.model.run import build_servable, load_run

    if run_dir is not None:
        return load_run(run_dir), str(run_dir)
    if DEFAULT_RUN.is_dir():
        return load_run(DEFAULT_RUN), "default_run/"
    from kanmoe.model.builder import build_model
    from kanmoe.model.config import read_yaml, validate_config

    cfg = validate_config(read_yaml(CONFIGS_DIR / "california_kamoe.yaml"))
    torch.manual_seed(0)
    names = CALIFORNIA_FEATURES
    net = build_model(cfg.model, len(names), 1, None, feature_names=names)
    n = len(names)
    servable = build_servable(net, names, ["y"], [0.0] * n, [1.0] * n, [0.0], [1.0])
    return servable, "untrained configs/california_kamoe.yaml"


def layer_servable(basis: str):
    """One KANLinear 64->64 wrapped as a servable (identity standardisation)."""
    from kanmoe.model.layers import KANLinear
    from kanmoe.model.run import build_servable

    torch.manual_seed(0)
    layer = KANLinear(64, 64, basis=basis)
    return build_servable(layer, [f"x{i}" for i in range(64)], [f"y{i}" for i in range(64)],
                          [0.0] * 64, [1.0] * 64, [0.0] * 64, [1.0] * 64)  # fmt: skip


def ort_runner(model: onnx.ModelProto, threads: int) -> Callable[[np.ndarray], object]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"input": x})


def torch_runner(module: torch.nn.Module) -> Callable[[np.ndarray], object]:
    def run(x: np.ndarray):
        with torch.inference_mode():
            return module(torch.from_numpy(x))

    return run


def time_rounds(
    runners: dict[str, Callable], x: np.ndarray, rounds: int, budget_s: float
) -> dict[str, float]:
    """Median seconds per call of each runner, interleaved in rounds."""
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():  # warm-up (and compile)
        fn(x)
        fn(x)
    for _ in range(rounds):
        for name, fn in runners.items():
            n, start = 0, time.perf_counter()
            while True:
                fn(x)
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed > budget_s / rounds or n >= 200:
                    break
            samples[name].append(elapsed / n)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_model(label: str, servable, args) -> list[str]:
    """Rows of the markdown table for one model."""
    servable = servable.eval()
    model = export_model(servable)
    runners: dict[str, Callable] = {"torch eager": torch_runner(servable)}
    if not args.no_compile:
        runners["torch.compile"] = torch_runner(torch.compile(servable, dynamic=True))
    runners["ORT (shipped function bodies)"] = ort_runner(model, args.threads)
    used = {n.op_type for n in onnx_ops.kanmoe_nodes(model)}
    if onnx_ops.OP_BSPLINE in used:
        for alt in ("local", "knots_first", "rows_first"):
            variant = onnx.ModelProto()
            variant.CopyFrom(model)
            onnx_ops.attach_functions(variant, layout=alt)
            runners[f"ORT, {alt} B-spline body (alt.)"] = ort_runner(variant, args.threads)
    if onnx_ops.OP_LOOKUP in used:
        for alt in onnx_ops.LOOKUP_LAYOUTS[1:]:
            variant = onnx.ModelProto()
            variant.CopyFrom(model)
            onnx_ops.attach_functions(variant, lookup_layout=alt)
            runners[f"ORT, {alt} lookup (alt.)"] = ort_runner(variant, args.threads)
    rng = np.random.default_rng(0)
    n_feat = servable.n_features
    mean = servable.x_mean.numpy()
    std = servable.x_std.numpy()
    per_batch = {}
    for batch in args.batches:
        x = (rng.standard_normal((batch, n_feat)) * std + mean).astype(np.float32)
        per_batch[batch] = time_rounds(runners, x, args.rounds, args.budget)
        print(f"  {label} batch {batch}: " + ", ".join(
            f"{k}={v / batch * 1e6:.2f}us/row" for k, v in per_batch[batch].items()
        ), flush=True)  # fmt: skip
    lines = []
    for name in runners:
        cells = []
        for batch in args.batches:
            t = per_batch[batch][name]
            ratio = per_batch[batch]["torch eager"] / t
            cells.append(f"{t / batch * 1e6:.2f} ({ratio:.2f}x)")
        lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds per measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--quick", action="store_true", help="smoke run, no RESULTS.md")
    parser.add_argument("--note", default="", help="one line added under the table header")
    args = parser.parse_args(argv)
    args.batches = BATCHES
    if args.quick:
        args.rounds, args.budget, args.batches = 2, 0.1, (1, 64)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    servable, source = default_servable(args.run_dir)
    models = [(f"default KAMoE ({source})", servable)]
    models += [(f"KANLinear 64->64 {b}", layer_servable(b)) for b in ("bspline", "rbf", "linear")]
    header = " | ".join(f"batch {b}" for b in args.batches)
    lines = [
        "## ONNX Runtime vs torch (CPU)",
        "",
        f"Machine: {results_file.machine_line()}. {args.threads} thread(s) for torch and ORT "
        f"(ORT CPU EP, onnxruntime {__import__('onnxruntime').__version__}, "
        f"torch {torch.__version__}). Median microseconds per row over {args.rounds} "
        "interleaved rounds; (N x) = speed-up over torch eager. ORT runs the FunctionProto "
        "bodies shipped in the file (no native kernel). Layer rows include the servable's "
        "(identity) standardisation.",
        *([f"Note: {args.note}"] if args.note else []),
        "",
        f"| model | implementation | {header} |",
        "|---|---|" + "---|" * len(args.batches),
    ]
    for label, model in models:
        print(f"benchmarking {label}", flush=True)
        lines += bench_model(label, model, args)
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        results_file.update_section("onnx_runtime", text)
        print(f"wrote {results_file.RESULTS}")


if __name__ == "__main__":
    main()
