"""Triton Inference Server as a serving peer of ``kanmoe serve``, and the side-by-side run.

Triton runs here as the real ``tritonserver`` binary (2.51) bundled in the ``nvidia-pytriton``
wheel: its C++ HTTP frontend and dynamic batcher in front of a Python-backend model that
calls an ONNX Runtime session on the same ``model.onnx`` (the wheel has no ORT backend). The
Python backend stub links libpython 3.13, so Triton lives in its own Python 3.13 venv.

    python benchmarks/triton_peer.py setup            # the venv (once; ~10 min: numpy builds)
    VENV/bin/python benchmarks/triton_peer.py serve PORT   # one Triton server (bench starts it)
    python benchmarks/triton_peer.py bench            # kanmoe vs Triton, c = 1/16/64/256
    python benchmarks/triton_peer.py profile          # py-spy: where kanmoe's time goes

``bench`` runs ``serving.py``'s machinery (same wrk load, same one-row v2 JSON body, servers
interleaved round by round, 1 ORT intra-op thread everywhere) over kanmoe as shipped, the
hand-written FastAPI baseline, the HTTP floor and Triton, writes the "Serving vs Triton"
section of RESULTS.md and the plots in ``benchmarks/plots/``.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_peers import MODEL, MODEL_FILE  # stdlib-only at import: fine on 3.13

HERE = Path(__file__).resolve()
VENV = Path(os.environ.get("KANMOE_TRITON_VENV", Path.home() / ".cache/kanmoe/triton-venv"))
TRITON_PACKAGES = ["nvidia-pytriton==0.7.0", "onnxruntime", "numpy"]
TRITON_LABEL = "Triton 2.51 (pytriton: C++ HTTP + dynamic batcher, Python backend + ORT)"
READY_PATH = f"/v2/models/{MODEL}/ready"


def triton_python(venv: Path = VENV) -> str | None:
    """The venv's interpreter when Triton is installed there, else None."""
    python = venv / "bin" / "python"
    return (
        str(python)
        if python.exists() and list(venv.glob("lib/python3*/site-packages/pytriton"))
        else None
    )


# -- setup ----------------------------------------------------------------------------------------
def find_python313() -> str:
    pyenv = sorted(map(str, Path.home().glob(".pyenv/versions/3.13*/bin/python3.13")))
    for candidate in [shutil.which("python3.13"), *pyenv]:
        if candidate and Path(candidate).exists():
            return candidate
    sys.exit("Python 3.13 not found: install it (pyenv install 3.13) or pass --python")


def setup(venv: Path, python: str | None, if_missing: bool = False) -> None:
    """Create the Triton venv: Python 3.13 + nvidia-pytriton + onnxruntime + numpy."""
    if if_missing and triton_python(venv):
        print(f"Triton venv present: {venv}")
        return
    python = python or find_python313()
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", *TRITON_PACKAGES], check=True, timeout=3600
    )
    print(f"Triton venv ready: {venv}")


# -- the Triton server (runs in the Triton venv) ----------------------------------------
def serve(port: int, max_queue_delay_us: int, intra_op_threads: int) -> None:
    """Serve the default model on 127.0.0.1:PORT until SIGTERM (GRPC/metrics on free ports)."""
    import socket

    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(MODEL_FILE), opts, providers=["CPUExecutionProvider"])

    @batch
    def infer(input: np.ndarray) -> dict[str, np.ndarray]:
        out, gates = session.run(["output", "gate_weights"], {"input": input.astype(np.float32)})
        return {"output": out, "gate_weights": gates}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=port,
        grpc_address="127.0.0.1",
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL,
            infer_func=infer,
            inputs=[Tensor(name="input", dtype=np.float32, shape=(8,))],
            outputs=[
                Tensor(name="output", dtype=np.float32, shape=(1,)),
                Tensor(name="gate_weights", dtype=np.float32, shape=(3,)),
            ],
            config=ModelConfig(
                max_batch_size=256,
                batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us),
            ),
            strict=False,
        )
        # SIGTERM (the bench stops its servers so) leaves through the `with`: pytriton then
        # stops tritonserver and removes its workspace under ~/.cache/pytriton.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        triton.serve()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("setup", help="create the Python 3.13 venv with nvidia-pytriton")
    p.add_argument("--venv", type=Path, default=VENV)
    p.add_argument("--python", help="a Python 3.13 interpreter (default: python3.13 / pyenv)")
    p.add_argument("--if-missing", action="store_true", help="do nothing when it exists")
    p = sub.add_parser("serve", help="run one Triton server (inside the Triton venv)")
    p.add_argument("port", type=int)
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        help="dynamic batcher delay (default 0: kanmoe's max_delay_ms default)",
    )
    p.add_argument("--intra-op-threads", type=int, default=1)
    p = sub.add_parser("bench", help="kanmoe vs Triton (+ baseline, floor) at c=1/16/64/256")
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--note", default="")
    p.add_argument("--no-write", action="store_true", help="print only (no RESULTS.md, no plots)")
    p = sub.add_parser("profile", help="py-spy profile of kanmoe serve under wrk load")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("--save", help="also write py-spy's raw stacks to SAVE.c<concurrency>")
    p.add_argument("--no-write", action="store_true", help="print only (no RESULTS.md)")
    args = ap.parse_args()
    if args.cmd == "setup":
        setup(args.venv, args.python, args.if_missing)
    elif args.cmd == "serve":
        serve(args.port, args.max_queue_delay_us, args.intra_op_threads)
    else:
        import serving_triton  # kanmoe venv only: wrk, tables, plots, profile

        serving_triton.main(args)


if __name__ == "__main__":
    main()
