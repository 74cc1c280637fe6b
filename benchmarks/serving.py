"""Serving throughput and latency: ``kanmoe serve`` vs a hand-written server and the HTTP floor.

Every server runs in its own process, started and stopped here, and is loaded from another
process (``wrk``, one thread; an httpx load generator when wrk is missing) for a fixed time
at concurrency 1, 16 and 64 with one-row Open Inference Protocol v2 JSON requests:

- ``kanmoe serve`` as shipped (metrics on, batching on), without and with ``KANMOE_API_TOKEN``,
  and with ``--no-batching``, ``--no-metrics``, ``--workers 2``;
- the hand-written baseline: ~20 lines of FastAPI + ONNX Runtime (``await request.json()``,
  numpy, ``session.run``, ``JSONResponse``) on plain uvicorn with h11 + asyncio, which is
  what ``pip install fastapi uvicorn`` gives (no uvloop/httptools);
- the HTTP floor: a bare ASGI app returning a fixed body on the stack ``kanmoe serve`` uses
  (uvicorn with uvloop + httptools);
- raw ``session.run`` in this process, batch 1 and batch 64 (no HTTP at all);
- Triton Inference Server, when its venv exists (``triton_peer.py``; its own sweep to
  concurrency 256 with plots: ``triton_peer.py bench``, ``make bench-triton``).

The baseline, the floor and the httpx fallback live in ``serving_peers.py``.

Fairness on a small machine: ORT gets 1 intra-op thread in every server, wrk 1 thread; all
servers stay up for the whole run and are measured interleaved (round by round, the order
rotating each round), each warmed first; the table gives the median over rounds, each goal
the median of its per-round ratios. Next to throughput the table gives each server's CPU
time per request (read from /proc for its whole process group), which moves far less than
throughput when other jobs share the machine.

Run from the repo root: ``python benchmarks/serving.py`` (``make bench-serve``); ``--quick``
is a smoke run (1 s points, 1 round) that does not write RESULTS.md.
"""

import argparse
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # sibling modules: the script runs as a file, not as a package
from serving_peers import BODY, FLOOR_BODY, INFER_PATH, MODEL_FILE, ROOT, ROW, TOKEN
from triton_peer import READY_PATH, TRITON_LABEL, triton_python

CONCURRENCY = (1, 16, 64)
HTTPX_NOTE = (
    "httpx AsyncClient (wrk missing: `apt-get install wrk`); it saturates before fast servers "
    "do, so ratios to the floor are understated"
)
PEERS = Path(__file__).resolve().with_name("serving_peers.py")
TRITON_PEER = Path(__file__).resolve().with_name("triton_peer.py")


# -- server processes ---------------------------------------------------------------------------
@dataclass
class Config:
    key: str
    label: str
    args: list[str]  # after the executable; "{port}" is filled in
    token: bool = False
    ready_path: str = "/v2/health/ready"  # Triton: the model's own ready route
    ready_timeout_s: float = 90.0


def configs() -> list[Config]:
    kanmoe = str(Path(sys.executable).with_name("kanmoe"))
    if not Path(kanmoe).exists():
        kanmoe = shutil.which("kanmoe") or "kanmoe"
    base = [
        kanmoe,
        "serve",
        "--repository",
        str(ROOT / "model_repository"),
        "--port",
        "{port}",
        "--intra-op-threads",
        "1",
    ]
    me = [sys.executable, str(PEERS)]
    triton = triton_python()  # Triton joins when its venv exists (triton_peer.py setup)
    extra = [Config("triton", TRITON_LABEL, [triton, str(TRITON_PEER), "serve", "{port}"],
                    ready_path=READY_PATH, ready_timeout_s=300.0)] if triton else []  # fmt: skip
    return [
        Config("kanmoe", "kanmoe serve (as shipped, no token)", base),
        Config("kanmoe_auth", "kanmoe serve + KANMOE_API_TOKEN", base, token=True),
        Config("no_batching", "kanmoe serve --no-batching", [*base, "--no-batching"]),
        Config("no_metrics", "kanmoe serve --no-metrics", [*base, "--no-metrics"]),
        Config("workers2", "kanmoe serve --workers 2", [*base, "--workers", "2"]),
        Config(
            "baseline",
            "hand-written FastAPI + ORT (uvicorn h11/asyncio)",
            [*me, "baseline", "{port}"],
        ),
        Config(
            "floor", "bare ASGI fixed body (uvicorn uvloop/httptools)", [*me, "floor", "{port}"]
        ),
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process group: started in its own session so cleanup kills the workers too."""

    def __init__(self, cfg: Config, logdir: Path) -> None:
        self.cfg = cfg
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KANMOE_")}  # as shipped
        if cfg.token:
            env["KANMOE_API_TOKEN"] = TOKEN
        self.log = logdir / f"{cfg.key}.log"
        argv = [a.replace("{port}", str(self.port)) for a in cfg.args]
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{self.port}{INFER_PATH}"

    def wait_ready(self, timeout_s: float | None = None) -> None:
        timeout_s = timeout_s or self.cfg.ready_timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-800:]
                raise RuntimeError(f"{self.cfg.key} exited ({self.proc.returncode}):\n{tail}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}{self.cfg.ready_path}", timeout=2
                ) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.cfg.key} not ready after {timeout_s:.0f} s (log {self.log})")

    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of every live process in the server's group (workers too).

        When other jobs share the machine, CPU time per request moves much less than
        throughput does: it is the steadier view of what a request costs the server."""
        ticks = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # the process ended while we looked
            if int(fields[2]) == self.proc.pid:  # pgrp
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL it after 10 s: never leave a server behind."""
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


# -- load generation ------------------------------------------------------------------------------
LUA = """wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
%s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass
class Point:
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    requests: int = 0
    cpu_us: float = float("nan")  # server CPU time (all its processes and threads) per request


def parse_result(text: str, what: str) -> Point:
    for line in text.splitlines():
        if line.startswith("RESULT "):
            n, dur_us, p50, p99, status, sock = (int(v) for v in line.split()[1:7])
            return Point(n / (dur_us / 1e6), p50 / 1e3, p99 / 1e3, status, sock, n)
    raise RuntimeError(f"{what}: no RESULT line in the load generator's output:\n{text[-800:]}")


class Load:
    """``wrk -t1`` with a Lua script whose ``done`` prints the counts and percentiles."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.scripts = {}
        for token in (False, True):
            auth = f'wrk.headers["Authorization"] = "Bearer {TOKEN}"' if token else ""
            path = workdir / f"post{'_auth' if token else ''}.lua"
            path.write_text(LUA % (BODY, auth))
            self.scripts[token] = path

    def run(self, server: Server, connections: int, seconds: int) -> Point:
        """Load ``server`` for ``seconds`` from ``connections`` keep-alive connections."""
        if self.kind == "wrk":
            script = str(self.scripts[server.cfg.token])
            argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                    "-s", script, server.url]  # fmt: skip
        else:
            token = "1" if server.cfg.token else "0"
            argv = [sys.executable, str(PEERS), "load", server.url, str(connections),
                    str(seconds), token]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        return parse_result(done.stdout + done.stderr, f"{server.cfg.key} c={connections}")


# -- raw session.run -----------------------------------------------------------------------------
def raw_rows_per_s(session, batch: int, seconds: float) -> float:
    import numpy as np

    x = np.tile(np.asarray(ROW, np.float32), (batch, 1))
    names = ["output", "gate_weights"]
    session.run(names, {"input": x})
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        session.run(names, {"input": x})
        n += 1
    return n * batch / elapsed


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Results:
    points: dict[tuple[str, int], list[Point]] = field(default_factory=dict)
    raw: dict[int, list[float]] = field(default_factory=dict)

    def median(self, key: str, c: int) -> Point | None:
        pts = self.points.get((key, c))
        if not pts:
            return None
        med = statistics.median
        return Point(
            med(p.rps for p in pts),
            med(p.p50_ms for p in pts),
            med(p.p99_ms for p in pts),
            sum(p.non_2xx for p in pts),
            sum(p.socket_errors for p in pts),
            sum(p.requests for p in pts),
            med(p.cpu_us for p in pts),
        )


def measure(args: argparse.Namespace, cfgs: list[Config], load: Load, logdir: Path) -> Results:
    import onnxruntime as ort

    res = Results()
    servers: list[Server] = []
    try:
        for cfg in cfgs:
            servers.append(Server(cfg, logdir))
        for s in servers:
            s.wait_ready()
            # Warm until a run is clean: caches, allocator, and with --workers every worker
            # ready (readiness may answer from the first worker while another still loads).
            for _ in range(10):
                warm = load.run(s, 16, args.warmup)
                if warm.non_2xx + warm.socket_errors == 0:
                    break
            print(f"  ready and warmed: {s.cfg.label} (pid {s.pid()}, port {s.port})", flush=True)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(MODEL_FILE), opts, providers=["CPUExecutionProvider"])
        for r in range(args.rounds):
            order = servers[r % len(servers) :] + servers[: r % len(servers)]
            for c in args.concurrency:
                for s in order:
                    cpu0 = s.cpu_seconds()
                    p = load.run(s, c, args.seconds)
                    p.cpu_us = (s.cpu_seconds() - cpu0) / max(p.requests, 1) * 1e6
                    res.points.setdefault((s.cfg.key, c), []).append(p)
                    print(
                        f"  round {r + 1} c={c:<3} {s.cfg.key:<12} {p.rps:9.0f} rows/s "
                        f"p50 {p.p50_ms:7.3f} ms p99 {p.p99_ms:8.3f} ms "
                        f"cpu {p.cpu_us:6.0f} us/req non-2xx {p.non_2xx} "
                        f"socket errors {p.socket_errors}",
                        flush=True,
                    )
            for batch in (1, 64):
                res.raw.setdefault(batch, []).append(raw_rows_per_s(session, batch, args.seconds))
    finally:
        for s in servers:
            s.stop()
    return res


def goal_rows(res: Results) -> list[tuple[str, ...]]:
    """(goal, measured, target, verdict, CPU view) for every goal the issue sets.

    The CPU view is the same throughput ratio predicted from server CPU time per request
    (B's over A's): what the ratio would be if each server had a core to itself."""
    rows: list[tuple[str, ...]] = []

    def ratio(a: str, b: str, c: int, attr: str = "rps") -> float | None:
        """Median over rounds of the per-round ratio: both sides measured minutes apart at
        most, so a slow drift in the machine's background load cancels out."""
        pa, pb = res.points.get((a, c)), res.points.get((b, c))
        if not pa or not pb:
            return None
        return statistics.median(
            getattr(x, attr) / getattr(y, attr) for x, y in zip(pa, pb, strict=True)
        )

    def add(name: str, a: str, b: str, c: int, target: float, fmt: str, p50: bool = False):
        value = ratio(a, b, c, "p50_ms" if p50 else "rps")
        cpu = None if p50 else ratio(b, a, c, "cpu_us")
        view = "" if cpu is None else fmt % cpu
        if value is None:
            rows.append((name, "n/a", "", "not measured", view))
            return
        met = value <= target if p50 else value >= target
        sign = "<=" if p50 else ">="
        verdict = "met" if met else "NOT met"
        rows.append((name, fmt % value, f"{sign} {fmt % target}", verdict, view))

    for k in ("kanmoe", "kanmoe_auth"):
        add(f"c=64 {k} / HTTP floor (rows/s)", k, "floor", 64, 0.60, "%.2f")
        add(f"c=64 {k} / hand-written baseline (rows/s)", k, "baseline", 64, 8.0, "%.1fx")
        add(f"c=1 {k} p50 / baseline p50", k, "baseline", 1, 0.5, "%.2f", p50=True)
    add("c=64 batching on / off (rows/s)", "kanmoe", "no_batching", 64, 4.0, "%.1fx")
    for c in (16, 64):
        add(f"c={c} metrics on / off (rows/s)", "kanmoe", "no_metrics", c, 0.90, "%.2f")
    w = ratio("workers2", "kanmoe", 64)
    cpu = ratio("kanmoe", "workers2", 64, "cpu_us")
    rows.append(
        (
            "c=64 --workers 2 / 1 (rows/s)",
            "n/a" if w is None else f"{w:.2f}x",
            "no goal (2 cores, shared with wrk)",
            "reported",
            "" if cpu is None else f"{cpu:.2f}x per core",
        )
    )
    bad = sum(p.non_2xx + p.socket_errors for pts in res.points.values() for p in pts)
    verdict = "met" if not bad else "NOT met"
    rows.append(("non-2xx + socket errors, all runs", str(bad), "= 0", verdict, ""))
    return rows


def report(res: Results, cfgs: list[Config], args: argparse.Namespace, info: dict) -> str:
    lines = [
        "| server | concurrency | rows/s (= req/s) | rows/s min-max | p50 ms | p99 ms | "
        "server CPU µs/req | non-2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cfg in cfgs:
        for c in args.concurrency:
            p = res.median(cfg.key, c)
            if p is not None:
                rps = [q.rps for q in res.points[cfg.key, c]]
                lines.append(
                    f"| {cfg.label} | {c} | {p.rps:,.0f} | {min(rps):,.0f}-{max(rps):,.0f} | "
                    f"{p.p50_ms:.3f} | {p.p99_ms:.3f} | {p.cpu_us:.0f} | "
                    f"{p.non_2xx + p.socket_errors} |"
                )
    for batch, vals in sorted(res.raw.items()):
        v = statistics.median(vals)
        lines.append(
            f"| raw `session.run` in-process, batch {batch} | - | {v:,.0f} | "
            f"{min(vals):,.0f}-{max(vals):,.0f} | {batch / v * 1e3:.3f} (per call) | | "
            f"{1e6 / v:.0f} (wall, per row) | |"
        )
    goals = [
        "| goal | measured | target | verdict | CPU view (each server on its own core) |",
        "|---|---|---|---|---|",
    ]
    goals += ["| " + " | ".join(row) + " |" for row in goal_rows(res)]
    head = [
        "## Serving (make bench-serve)",
        "",
        f"- Machine: {info['cpu']}, nproc {info['nproc']}; {info['versions']}",
        f"- Command: `{info['command']}`; started {info['start']}, took {info['took']:.0f} s",
        f"- Load average (1/5/15 min) before: {info['load_before']}; after: {info['load_after']}"
        + (
            " — shared machine: absolute numbers are depressed and noisy; the ratios hold "
            "better (servers measured interleaved)"
            if info["busy"]
            else ""
        ),
        f"- Load: {info['load']}, {args.seconds:g} s per point after a {args.warmup:g} s warm-up "
        f"at concurrency 16, {args.rounds} interleaved round(s) (server order rotated each "
        "round); table: **median over rounds** (p50/p99 from wrk's per-request latencies); "
        "goal ratios: median over rounds of the per-round ratio. One-row v2 JSON "
        "`POST /v2/models/california_kamoe/infer` (body below), keep-alive connections.",
        "- Every server: ORT CPU EP, 1 intra-op thread (kanmoe: `--intra-op-threads 1`), one "
        "process unless named; kanmoe otherwise as shipped (metrics on, batching on, "
        f"max delay {shipped('max_delay_ms'):g} ms, max batch {shipped('max_batch_size')} rows, "
        "access log off); the token run sets `KANMOE_API_TOKEN` and wrk sends "
        "`Authorization: Bearer`.",
        "- Baseline: FastAPI + ORT in ~20 lines (`await request.json()`, numpy, `session.run` "
        "in the async route, `JSONResponse`) on uvicorn with h11 + asyncio (what `pip install "
        "fastapi uvicorn` runs), access log off like kanmoe's default. Floor: a bare ASGI app "
        "reading the body and sending a fixed "
        f"{len(FLOOR_BODY)}-byte reply on uvicorn with uvloop + httptools (kanmoe's stack).",
    ]
    if info.get("note"):
        head.append(f"- Note: {info['note']}")
    body = f"- Request body: `{BODY}`"
    return "\n".join([*head, body, "", *lines, "", *goals])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def wrk_version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()
    return out[1] if len(out) > 1 else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=4, help="seconds per measured point")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up seconds per server")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    ap.add_argument("--only", nargs="+", help="config keys to run (default: all)")
    ap.add_argument("--load", choices=("auto", "wrk", "httpx"), default="auto")
    ap.add_argument("--note", default="", help="free text recorded with the results")
    ap.add_argument("--quick", action="store_true", help="1 s points, 1 round, no RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.rounds, args.no_write = 1, 1, 1, True
    cfgs = [c for c in configs() if not args.only or c.key in args.only]
    kind = args.load if args.load != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
    if kind == "httpx":
        print(f"note: load from {HTTPX_NOTE}")
    signal.signal(signal.SIGTERM, _interrupt)  # a killed bench still stops its servers
    load_before, t0 = os.getloadavg(), time.time()
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        with tempfile.TemporaryDirectory(prefix="kanmoe-bench-serve-") as tmp:
            res = measure(args, cfgs, Load(kind, Path(tmp)), Path(tmp))
    except KeyboardInterrupt:
        sys.exit("interrupted: every server was stopped, RESULTS.md left as it was")
    load_after = os.getloadavg()
    info = {
        "cpu": results_file.machine_line().split(",")[0],
        "nproc": os.cpu_count(),
        "versions": versions(),
        "command": shlex.join(["python", "benchmarks/serving.py", *sys.argv[1:]]),
        "start": start,
        "took": time.time() - t0,
        "load_before": " / ".join(f"{v:.2f}" for v in load_before),
        "load_after": " / ".join(f"{v:.2f}" for v in load_after),
        "busy": max(load_before[0], load_after[0]) > 1.5,
        "load": f"wrk {wrk_version()}, 1 thread" if kind == "wrk" else HTTPX_NOTE,
        "note": args.note,
    }
    text = report(res, cfgs, args, info)
    print("\n" + text)
    if not args.no_write:
        results_file.update_section("serving", text)
        print(f"\nwritten to {results_file.RESULTS}")


def shipped(setting: str) -> object:
    """A ``kanmoe serve`` default, read from its settings so this text never goes stale."""
    from kanmoe.service.settings import ServeSettings

    return ServeSettings.model_fields[setting].default


def versions() -> str:
    from importlib.metadata import version

    names = ("onnxruntime", "fastapi", "uvicorn", "uvloop", "httptools", "orjson")
    return ", ".join(f"{n} {version(n)}" for n in names) + f", Python {sys.version.split()[0]}"


if __name__ == "__main__":
    main()
