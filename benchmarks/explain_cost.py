"""What served explanations cost: v1 predict at concurrency 1 with and without ``explain``.

Two ``kanmoe serve`` processes, both on the default run's model, measured interleaved:

- ``explain graph``: the shipped export, whose graph also outputs each expert's prediction;
  requests without ``explain`` (the runner fetches prediction and gates only) and with
  ``"explain": true`` (every output, plus the contributions in the JSON);
- ``plain graph``: the same run exported with ``explain=False`` (no per-expert outputs): what
  every request cost before explanations existed.

Goals (issue #12): explain on ≤ 1.2× explain off, and the larger graph with explain off
≤ 1.05× the plain graph, both as median latency at concurrency 1 (wrk, one connection).

Run from the repo root: ``python benchmarks/explain_cost.py`` (``make bench-explain``).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # sibling modules: the script runs as a file, not as a package
from serving import LUA, Config, Server, parse_result
from serving_peers import ROOT, ROW

MODEL = "california_kamoe"
PREDICT = f"/v1/models/{MODEL}/predict"
PLAIN = json.dumps({"inputs": [ROW]})
EXPLAIN = json.dumps({"inputs": [ROW], "explain": True})


def plain_repository(dest: Path) -> Path:
    """The default run exported without per-expert outputs, as a one-model repository."""
    from kanmoe.export.exporter import export_model
    from kanmoe.export.repository import write_repository_entry
    from kanmoe.model.run import load_run

    shipped = ROOT / "model_repository" / MODEL / "1" / "kanmoe.json"
    info = json.loads(shipped.read_text())
    extra = {k: info[k] for k in ("feature_ranges", "gate_reference") if k in info}
    model = export_model(load_run(ROOT / "default_run"), explain=False)
    write_repository_entry(model, dest, MODEL, version=1, extra=extra)
    return dest


def wrk(server: Server, body: str, seconds: int, workdir: Path) -> tuple[float, float]:
    """(median latency ms, requests/s) of one connection posting ``body`` for ``seconds``."""
    script = workdir / f"{abs(hash(body))}.lua"
    script.write_text(LUA % (body, ""))
    url = f"http://127.0.0.1:{server.port}{PREDICT}"
    argv = ["wrk", "-t1", "-c1", f"-d{seconds}s", "--timeout", "10s", "-s", str(script), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    point = parse_result(done.stdout + done.stderr, f"{server.cfg.key} {body[-20:]}")
    if point.non_2xx or point.socket_errors:
        raise RuntimeError(f"{server.cfg.key}: {point.non_2xx} non-2xx, errors on {body}")
    return point.p50_ms, point.rps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=4, help="seconds per measured point")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: apt-get install wrk (make system-deps)")
    kanmoe = str(Path(sys.executable).with_name("kanmoe"))
    work = Path(tempfile.mkdtemp(prefix="kanmoe-explain-bench-"))
    cases = {  # label -> (server key, body)
        "explain graph, explain off": ("explain", PLAIN),
        "explain graph, explain on": ("explain", EXPLAIN),
        "plain graph (no expert outputs)": ("plain", PLAIN),
    }
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = os.getloadavg()[0]
    servers: dict[str, Server] = {}
    p50: dict[str, list[float]] = {k: [] for k in cases}
    rps: dict[str, list[float]] = {k: [] for k in cases}
    try:
        repos = {
            "explain": ROOT / "model_repository",
            "plain": plain_repository(work / "plain_repo"),
        }
        for key, repo in repos.items():
            cmd = [kanmoe, "serve", "--repository", str(repo), "--port", "{port}",
                   "--intra-op-threads", "1", "--log-level", "warning"]  # fmt: skip
            servers[key] = Server(Config(key, key, cmd), work)
        for s in servers.values():
            s.wait_ready()
        for key, body in cases.values():
            wrk(servers[key], body, 1, work)  # warm every path measured
        labels = list(cases)
        for r in range(args.rounds):
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                key, body = cases[label]
                ms, per_s = wrk(servers[key], body, args.seconds, work)
                p50[label].append(ms)
                rps[label].append(per_s)
                print(f"  round {r + 1} {label:<34} p50 {ms:6.3f} ms {per_s:7.0f} req/s")
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in p50.items()}
    mean_ms = {k: 1000 / statistics.median(v) for k, v in rps.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(p50[a], p50[b], strict=True))

    r_on = ratio("explain graph, explain on", "explain graph, explain off")
    r_big = ratio("explain graph, explain off", "plain graph (no expert outputs)")
    lines = [
        "## Explanations (make bench-explain)",
        "",
        f"- Machine: {results_file.machine_line()}",
        f"- Command: `python benchmarks/explain_cost.py --seconds {args.seconds} "
        f"--rounds {args.rounds}`, started {start}",
        f"- Load average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f} "
        "(2 cores: above ~0.5 other jobs shared the machine and the ratios are noisy)",
        "- Method: two `kanmoe serve` processes (1 ORT thread each), v1 predict with one row, "
        "wrk with one connection; cases interleaved round by round; ratios are medians of the "
        "per-round ratios of median latency.",
        "",
        "| case | p50 ms (median over rounds) | mean ms (1 / req/s) |",
        "|---|---:|---:|",
        *(f"| {k} | {med[k]:.3f} | {mean_ms[k]:.3f} |" for k in cases),
        "",
        f"1. explain on ≤ 1.2× explain off: **{'met' if r_on <= 1.2 else 'NOT met'}** "
        f"({r_on:.2f}×)",
        f"2. larger graph, explain off ≤ 1.05× plain graph: "
        f"**{'met' if r_big <= 1.05 else 'NOT met'}** ({r_big:.2f}×)",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        results_file.update_section("explain", text)


if __name__ == "__main__":
    main()
