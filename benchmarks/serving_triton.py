"""kanmoe serve side by side with Triton, and a py-spy profile of where kanmoe's time goes.

Driven by ``python benchmarks/triton_peer.py bench|profile`` (``make bench-triton``). The
load, servers and interleaving are ``serving.py``'s; this module picks the peers, runs the
concurrency sweep 1/16/64/256, checks the issue's goals against Triton, draws the plots and
writes the "Serving vs Triton" section of RESULTS.md.
"""

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import results_file
import serving
from triton_peer import READY_PATH, TRITON_LABEL, triton_python

PLOTS = Path(__file__).resolve().parent / "plots"
PEERS = ("kanmoe", "baseline", "floor", "triton")
SECTION = "serving_triton"
SHORT = {
    "kanmoe": "kanmoe serve",
    "baseline": "hand-written FastAPI + ORT",
    "floor": "HTTP floor (bare ASGI)",
    "triton": "Triton (pytriton, Python backend)",
}


def triton_config() -> serving.Config:
    python = triton_python()
    if python is None:
        sys.exit("Triton venv missing: python benchmarks/triton_peer.py setup")
    script = str(Path(__file__).resolve().with_name("triton_peer.py"))
    return serving.Config(
        "triton",
        TRITON_LABEL,
        [python, script, "serve", "{port}"],
        ready_path=READY_PATH,
        ready_timeout_s=300.0,
    )


def peer_configs() -> list[serving.Config]:
    cfgs = {c.key: c for c in serving.configs()}
    cfgs.setdefault("triton", triton_config())
    return [cfgs[k] for k in PEERS]


def git_state() -> str:
    """The commit measured, and whether service/ had uncommitted edits (a shared tree)."""
    here = Path(__file__).parent
    run = lambda *a: subprocess.run(  # noqa: E731
        ["git", *a], capture_output=True, text=True, cwd=here
    ).stdout.strip()
    dirty = run("status", "--porcelain", "--", "service", "kanmoe")
    return f"git {run('rev-parse', '--short', 'HEAD')}" + (
        " + uncommitted edits in service/ or kanmoe/ (measured as in the working tree)"
        if dirty
        else ""
    )


class LoadSampler:
    """1-minute load average every 5 s while the run goes: the machine is shared."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(5.0):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadSampler":
        self.samples.append(os.getloadavg()[0])
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])


def per_round_ratio(res: serving.Results, a: str, b: str, c: int, attr: str) -> float | None:
    pa, pb = res.points.get((a, c)), res.points.get((b, c))
    if not pa or not pb:
        return None
    return statistics.median(
        getattr(x, attr) / getattr(y, attr) for x, y in zip(pa, pb, strict=True)
    )


def goals(res: serving.Results) -> list[str]:
    rows = ["| goal | measured | target | verdict |", "|---|---|---|---|"]
    checks = [
        (
            "c=64 kanmoe / Triton throughput",
            per_round_ratio(res, "kanmoe", "triton", 64, "rps"),
            5.0,
            True,
            "%.1fx",
        ),
        (
            "c=64 kanmoe p99 / Triton p99",
            per_round_ratio(res, "kanmoe", "triton", 64, "p99_ms"),
            1.0,
            False,
            "%.2f",
        ),
        (
            "c=1 kanmoe p50 / Triton p50",
            per_round_ratio(res, "kanmoe", "triton", 1, "p50_ms"),
            0.2,
            False,
            "%.2f",
        ),
    ]
    for name, value, target, higher, fmt in checks:
        if value is None:
            rows.append(f"| {name} | n/a | | not measured |")
            continue
        met = value >= target if higher else value <= target
        sign = ">=" if higher else "<="
        rows.append(
            f"| {name} | {fmt % value} | {sign} {fmt % target} | {'met' if met else 'NOT met'} |"
        )
    bad = sum(p.non_2xx + p.socket_errors for pts in res.points.values() for p in pts)
    rows.append(
        f"| non-2xx + socket errors, all runs | {bad} | = 0 | {'met' if not bad else 'NOT met'} |"
    )
    return rows


def plot(res: serving.Results, cfgs: list[serving.Config], conc: list[int]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(exist_ok=True)
    out = []
    for what in ("throughput", "latency"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for cfg in cfgs:
            pts = [(c, res.median(cfg.key, c)) for c in conc]
            pts = [(c, p) for c, p in pts if p is not None]
            xs = [c for c, _ in pts]
            if what == "throughput":
                ax.plot(xs, [p.rps for _, p in pts], "o-", label=SHORT.get(cfg.key, cfg.key))
            else:
                (line,) = ax.plot(
                    xs, [p.p50_ms for _, p in pts], "o-", label=f"{SHORT.get(cfg.key, cfg.key)} p50"
                )
                ax.plot(
                    xs,
                    [p.p99_ms for _, p in pts],
                    "s--",
                    color=line.get_color(),
                    label=f"{SHORT.get(cfg.key, cfg.key)} p99",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent connections (wrk, one-row v2 JSON requests)")
        if what == "throughput":
            ax.set_yscale("log")
            ax.set_ylabel("requests/s (median over rounds)")
        else:
            ax.set_yscale("log")
            ax.set_ylabel("latency, ms (p50 solid, p99 dashed)")
        ax.set_title(f"Serving {what}: kanmoe vs Triton and references (2 shared cores)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = PLOTS / f"serving_{what}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def report(
    res: serving.Results, cfgs: list[serving.Config], args: argparse.Namespace, info: dict
) -> str:
    table = [
        "| server | concurrency | req/s | p50 ms | p99 ms | server CPU µs/req | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for cfg in cfgs:
        for c in args.concurrency:
            p = res.median(cfg.key, c)
            if p is not None:
                table.append(
                    f"| {cfg.label} | {c} | {p.rps:,.0f} | {p.p50_ms:.2f} | "
                    f"{p.p99_ms:.2f} | {p.cpu_us:.0f} | "
                    f"{p.non_2xx + p.socket_errors} |"
                )
    ratios = [
        "| concurrency | kanmoe / Triton req/s | kanmoe / Triton p50 | kanmoe / Triton p99 | "
        "Triton / kanmoe server CPU per request |",
        "|---|---|---|---|---|",
    ]
    for c in args.concurrency:
        r = [per_round_ratio(res, "kanmoe", "triton", c, a) for a in ("rps", "p50_ms", "p99_ms")]
        cpu = per_round_ratio(res, "triton", "kanmoe", c, "cpu_us")
        if None not in r and cpu is not None:
            ratios.append(f"| {c} | {r[0]:.1f}x | {r[1]:.2f} | {r[2]:.2f} | {cpu:.1f}x |")
    head = [
        "## Serving vs Triton (make bench-triton)",
        "",
        f"- Machine: {info['cpu']}, nproc {info['nproc']}; {serving.versions()}",
        f"- Command: `{info['command']}`; started {info['start']}, took {info['took']:.0f} s; "
        f"{git_state()}",
        f"- Load average (1 min) over the run, sampled every 5 s: min {info['load_min']:.1f}, "
        f"median {info['load_med']:.1f}, max {info['load_max']:.1f} (other agents' jobs share "
        "the 2 cores: absolute numbers are depressed and noisy; servers are measured "
        "interleaved, so the ratios hold better)",
        f"- Load: wrk {serving.wrk_version()}, 1 thread, {args.seconds} s per point after a "
        f"{args.warmup} s warm-up, {args.rounds} interleaved rounds; table: median over rounds; "
        "ratios: median of per-round ratios. The same one-row v2 JSON request to every server: "
        f"`{serving.BODY}`.",
        "- Every server runs the same `model.onnx` on ORT's CPU EP with 1 intra-op thread. "
        "kanmoe: `kanmoe serve` as shipped (metrics, batching, max delay 0). Triton: the "
        "`tritonserver` 2.51 binary from `nvidia-pytriton` 0.7.0 (Python 3.13 venv), dynamic "
        "batching (max batch 256, queue delay 0 µs, like kanmoe), the model as a Python-backend "
        "callable running the ORT session (the wheel has no ORT backend). Baseline and floor "
        "as in the Serving section above.",
    ]
    if args.note:
        head.append(f"- Note: {args.note}")
    plots = [
        "![throughput vs concurrency](plots/serving_throughput.png)",
        "![latency vs concurrency](plots/serving_latency.png)",
    ]
    return "\n".join([*head, "", *table, "", *ratios, "", *goals(res), "", *plots])


def bench(args: argparse.Namespace) -> None:
    cfgs = peer_configs()
    t0, start = time.time(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="kanmoe-bench-triton-") as tmp, LoadSampler() as ld:
        res = serving.measure(args, cfgs, serving.Load("wrk", Path(tmp)), Path(tmp))
    info = {
        "cpu": results_file.machine_line().split(",")[0],
        "nproc": os.cpu_count(),
        "command": shlex.join(["python", "benchmarks/triton_peer.py", *sys.argv[1:]]),
        "start": start,
        "took": time.time() - t0,
        "load_min": min(ld.samples),
        "load_med": statistics.median(ld.samples),
        "load_max": max(ld.samples),
    }
    text = report(res, cfgs, args, info)
    print("\n" + text)
    if not args.no_write:
        print("plots:", *plot(res, cfgs, args.concurrency))
        results_file.update_section(SECTION, text)
        print(f"written to {results_file.RESULTS}")


# -- where the time goes ----------------------------------------------------------------------
# (category, file suffixes, function names or None for any). A sample belongs to the first
# category met walking its stack from the leaf up, so time in stdlib helpers (asyncio.timeout,
# executor submit) counts for the kanmoe code that called them; a stack with no such frame is
# the event loop itself or, for the ORT executor thread parked in ``queue.get``, idle.
CATEGORIES = [
    ("run: ONNX Runtime session.run", ("onnxruntime_inference_collection.py", "runtime.py"), None),
    (
        "parse: v2 JSON body to numpy",
        ("v2_codec.py",),
        {
            "decode_infer_request",
            "_decode_inputs",
            "_from_json",
            "_reshape",
            "_dtype",
            "_decode_outputs",
            "_decompress",
        },
    ),
    ("serialise: numpy to v2 JSON", ("v2_codec.py",), {"encode_infer_response"}),
    ("queue: micro-batcher (coalesce, hand-off to the ORT thread, scatter)", ("batcher.py",), None),
    ("metrics and drift", ("metrics.py", "drift.py"), None),
    (
        "handler: validation, request timeout, reply",
        ("handlers.py", "v1_codec.py", "v2_codec.py"),
        None,
    ),
    ("front door: auth, ids, body read, send", ("frontdoor.py",), None),
    ("HTTP: uvicorn protocol (httptools callbacks)", ("uvicorn/protocols",), None),
]
IDLE = "idle: ORT executor thread waiting for a batch (not CPU)"
LOOP = "event loop: uvloop in C (socket I/O, polling, callbacks)"


def classify(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        name, _, where = frame.partition(" (")
        path = where.rsplit(":", 1)[0]
        for label, suffixes, funcs in CATEGORIES:
            if any(x in path for x in suffixes) and (funcs is None or name in funcs):
                return label
    leaf = frames[-1]
    if leaf.startswith("_worker (") and "concurrent/futures/thread.py" in leaf:
        return IDLE
    return LOOP


def profile_once(
    spy: Path, server: serving.Server, load: serving.Load, c: int, seconds: int, save: str | None
) -> tuple[serving.Point, float, Counter[str]]:
    """py-spy (200 Hz, non-blocking) on the server for ``seconds`` of wrk load at ``c``."""
    with tempfile.TemporaryDirectory(prefix="kanmoe-profile-") as tmp:
        raw = Path(tmp) / "samples.txt"
        cmd = [
            str(spy),
            "record",
            "--pid",
            str(server.pid()),
            "--duration",
            str(seconds),
            "--rate",
            "200",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(raw),
        ]
        cpu0 = server.cpu_seconds()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        point = load.run(server, c, seconds)
        proc.wait(timeout=seconds + 60)
        cpu_us = (server.cpu_seconds() - cpu0) / max(point.requests, 1) * 1e6
        text = raw.read_text()
    if save:
        Path(f"{save}.c{c}").write_text(text)
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[classify(stack)] += int(n)
    return point, cpu_us, counts


def profile(args: argparse.Namespace) -> None:
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        sys.exit("py-spy missing: .venv/bin/pip install py-spy")
    (cfg,) = [c for c in serving.configs() if c.key == "kanmoe"]
    runs = {}
    loads = []
    with tempfile.TemporaryDirectory(prefix="kanmoe-profile-") as tmp:
        server, load = serving.Server(cfg, Path(tmp)), serving.Load("wrk", Path(tmp))
        try:
            server.wait_ready()
            load.run(server, 16, 2)
            for c in args.concurrency:
                loads.append(os.getloadavg()[0])
                runs[c] = profile_once(spy, server, load, c, args.seconds, args.save)
        finally:
            server.stop()
    labels = [label for label, _, _ in CATEGORIES] + [LOOP]
    head = (
        "| where the server's CPU goes | "
        + " | ".join(f"c={c}: share, ≈ µs/req" for c in runs)
        + " |"
    )
    table = [head, "|---" * (len(runs) + 1) + "|"]
    for label in labels:
        cells = []
        for _, cpu_us, counts in runs.values():
            busy = sum(n for k, n in counts.items() if k != IDLE) or 1
            share = counts.get(label, 0) / busy
            cells.append(f"{share:.0%}, {share * cpu_us:.0f}")
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    summary = []
    for (c, (point, cpu_us, counts)), ld in zip(runs.items(), loads, strict=True):
        busy = sum(n for k, n in counts.items() if k != IDLE)
        summary.append(
            f"- c={c}: {point.rps:,.0f} req/s, p50 {point.p50_ms:.2f} ms, "
            f"p99 {point.p99_ms:.2f} ms; "
            f"server CPU {cpu_us:.0f} µs per request; {busy} busy py-spy samples (+{counts[IDLE]} "
            f"of the ORT thread parked, not counted); load average {ld:.1f}"
        )
    text = "\n".join(
        [
            "## Where kanmoe's time goes (make bench-triton: `triton_peer.py profile`)",
            "",
            f"- `kanmoe serve` as shipped (1 ORT thread) under wrk, {args.seconds} s per "
            "concurrency, profiled with py-spy 200 Hz `--nonblocking` (all threads); each sample "
            "is filed under the first kanmoe part found walking its stack up from the leaf "
            "(`serving_triton.CATEGORIES`), so stdlib helpers (asyncio.timeout, executor submit) "
            "count for the kanmoe code that called them. µs/req = share × server CPU per request "
            "(from /proc). ORT's kernels run inside `session.run` on the executor thread.",
            f"- Command: `{shlex.join(['python', 'benchmarks/triton_peer.py', *sys.argv[1:]])}`; "
            f"{git_state()}",
            *summary,
            "",
            *table,
        ]
    )
    print(text)
    if not args.no_write:
        results_file.update_section("serving_profile", text)
        print(f"written to {results_file.RESULTS}")


def main(args: argparse.Namespace) -> None:
    if args.cmd == "bench":
        bench(args)
    else:
        profile(args)
