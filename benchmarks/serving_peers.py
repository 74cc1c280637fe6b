"""The processes ``benchmarks/serving.py`` compares ``kanmoe serve`` with, and its fallback load.

Each runs as its own process (``python benchmarks/serving_peers.py NAME ...``) so that it
gets its own interpreter and event loop, like a real deployment:

- ``baseline PORT``: the hand-written server a user writes in ~20 lines: FastAPI,
  ``await request.json()``, numpy, ``session.run`` inside the async route, ``JSONResponse``,
  on plain uvicorn with h11 + asyncio (what ``pip install fastapi uvicorn`` runs: no
  uvloop/httptools).
- ``floor PORT``: the HTTP floor: a bare ASGI app that reads the body and sends a fixed
  reply of kanmoe's size, on the stack ``kanmoe serve`` uses (uvicorn, uvloop, httptools).
- ``load URL CONNECTIONS SECONDS TOKEN``: an httpx load generator for machines without
  ``wrk``; it prints the same ``RESULT`` line as the benchmark's wrk Lua script.
"""

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "california_kamoe"
MODEL_FILE = ROOT / "model_repository" / MODEL / "1" / "model.onnx"
INFER_PATH = f"/v2/models/{MODEL}/infer"
ROW = [8.3252, 41.0, 6.984127, 1.02381, 322.0, 2.555556, 37.88, -122.23]  # California row 0
_DATA = ",".join(map(str, ROW))
BODY = f'{{"inputs":[{{"name":"input","datatype":"FP32","shape":[1,8],"data":[{_DATA}]}}]}}'
TOKEN = "bench-token"
FLOOR_BODY = (
    b'{"model_name":"california_kamoe","model_version":"1","outputs":[{"name":"output",'
    b'"datatype":"FP32","shape":[1,1],"data":[4.327404]},{"name":"gate_weights","datatype"'
    b':"FP32","shape":[1,3],"data":[0.38702908,0.5660256,0.046945304]}]}'
)


def serve_baseline(port: int) -> None:
    """The hand-written baseline (the 20 lines from ``opts`` to ``uvicorn.run``)."""
    import numpy as np
    import onnxruntime as ort
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(MODEL_FILE), opts, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict:
        return {}

    @app.post(INFER_PATH)
    async def infer(request: Request) -> JSONResponse:
        tensor = (await request.json())["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        out, gates = session.run(["output", "gate_weights"], {"input": x})
        outputs = [
            {"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.ravel().tolist()}
            for n, a in (("output", out), ("gate_weights", gates))
        ]
        return JSONResponse({"model_name": MODEL, "model_version": "1", "outputs": outputs})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="asyncio", http="h11",
                log_level="warning", access_log=False)  # fmt: skip


def serve_floor(port: int) -> None:
    """The HTTP floor: read the body, answer a fixed kanmoe-sized reply, nothing else."""
    import uvicorn

    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(FLOOR_BODY)).encode()),
    ]

    async def app(scope: dict, receive, send) -> None:
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": FLOOR_BODY})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                lifespan="off", log_level="warning", access_log=False)  # fmt: skip


def httpx_load(url: str, connections: int, seconds: float, token: bool) -> None:
    """Fallback load generator; far slower per request than wrk, so fast servers look slower."""
    import asyncio

    import httpx

    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {TOKEN}"
    latencies: list[float] = []
    errors = {"status": 0, "socket": 0}

    async def worker(client: httpx.AsyncClient, deadline: float) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                r = await client.post(url, content=BODY, headers=headers)
            except httpx.HTTPError:
                errors["socket"] += 1
                continue
            latencies.append(time.perf_counter() - t0)
            errors["status"] += not 200 <= r.status_code < 300

    async def main() -> float:
        limits = httpx.Limits(max_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(client, t0 + seconds) for _ in range(connections)))
            return time.perf_counter() - t0

    elapsed = asyncio.run(main())
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    print(f"RESULT {len(latencies)} {int(elapsed * 1e6)} {int(q[49] * 1e6)} {int(q[98] * 1e6)} "
          f"{errors['status']} {errors['socket']}")  # fmt: skip


if __name__ == "__main__":
    what, *rest = sys.argv[1:] or ["?"]
    if what == "baseline" and len(rest) == 1:
        serve_baseline(int(rest[0]))
    elif what == "floor" and len(rest) == 1:
        serve_floor(int(rest[0]))
    elif what == "load" and len(rest) == 4:
        httpx_load(rest[0], int(rest[1]), float(rest[2]), rest[3] == "1")
    else:
        sys.exit("usage: serving_peers.py baseline PORT | floor PORT | load URL C SECONDS 0|1")
