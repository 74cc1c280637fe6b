"""A load generator for the overload tests, run as its own process so that its CPU time and
event loop are not the server's or pytest's.

It sends v2 binary infer requests of ``--rows`` rows (a few fixed payloads, their answers
computed here with ONNX Runtime) over raw keep-alive HTTP/1.1 connections, either
closed-loop (``--mode capacity``: N connections back to back, to measure what the server
can do) or open-loop (``--mode open``: requests start on a fixed schedule at ``--rate`` per
second whatever the answers, as real overload arrives). Every answer is checked: a 200 must
equal ONNX Runtime's outputs, anything else is recorded with its status and Retry-After.
The summary is one JSON document (``--out``).

    python -m tests.load_client --port 8000 --model-file M.onnx --mode open --rate 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson

PAYLOADS = 8
OUTPUTS = ("output", "gate_weights")


@dataclass
class Payload:
    body: bytes
    want: dict[str, np.ndarray]


@dataclass
class Tally:
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    accepted_latency_s: list[float] = field(default_factory=list)
    rejected_latency_s: list[float] = field(default_factory=list)
    missing_retry_after: int = 0
    wrong_answers: list[str] = field(default_factory=list)
    connection_errors: list[str] = field(default_factory=list)
    max_abs_error: float = 0.0
    late_starts: int = 0  # open loop: requests that waited for a free connection
    sending_s: float = 0.0  # how long sending took (open loop: the schedule's real length)


def make_payloads(model_file: Path, model: str, rows: int, seed: int = 0) -> list[Payload]:
    """Fixed requests (rows near the California data) and their ONNX Runtime answers."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    centre = np.array([3.9, 28.6, 5.4, 1.1, 1425.0, 3.1, 35.6, -119.6], np.float32)
    scale = np.array([1.9, 12.6, 2.5, 0.5, 1132.0, 10.4, 2.1, 2.0], np.float32)
    payloads = []
    for _ in range(PAYLOADS):
        x = (centre + scale * rng.standard_normal((rows, 8))).astype(np.float32)
        x[:, 4:6] = np.abs(x[:, 4:6])
        want = dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"input": x}), strict=True))
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [rows, 8],
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in OUTPUTS],
            }
        )
        body = header + x.tobytes()
        request = (
            f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        payloads.append(Payload(request, want))
    return payloads


KEEPALIVE_S = 4.0  # reuse an idle connection only this long (the server closes at 5 s)


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.open = True
        self.idle_since = time.perf_counter()

    def reusable(self) -> bool:
        """Not closed by either side, and not idle long enough for the server to close it
        as we write (the keep-alive race every HTTP client avoids the same way)."""
        fresh = time.perf_counter() - self.idle_since < KEEPALIVE_S
        return self.open and fresh and not self.reader.at_eof()

    async def exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        self.idle_since = time.perf_counter()
        return status, headers, body

    def close(self) -> None:
        self.open = False
        self.writer.close()


def check_answer(tally: Tally, payload: Payload, headers: dict[str, str], body: bytes) -> None:
    n = int(headers["inference-header-content-length"])
    doc = orjson.loads(body[:n])
    offset = n
    for entry in doc["outputs"]:
        size = entry["parameters"]["binary_data_size"]
        got = np.frombuffer(body[offset : offset + size], "<f4").reshape(entry["shape"])
        offset += size
        want = payload.want[entry["name"]]
        if got.shape != want.shape:
            tally.wrong_answers.append(f"{entry['name']}: shape {got.shape} != {want.shape}")
            continue
        err = float(np.max(np.abs(got - want) / (1.0 + np.abs(want))))
        tally.max_abs_error = max(tally.max_abs_error, err)
        if err > 1e-4:
            tally.wrong_answers.append(f"{entry['name']}: relative error {err:.3g}")


async def one_request(conn: Connection, payload: Payload, tally: Tally) -> None:
    tally.sent += 1
    start = time.perf_counter()
    try:
        status, headers, body = await conn.exchange(payload.body)
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        conn.close()
        tally.connection_errors.append(f"{type(exc).__name__}: {exc}"[:200])
        return
    seconds = time.perf_counter() - start
    tally.statuses[status] = tally.statuses.get(status, 0) + 1
    if status == 200:
        tally.accepted_latency_s.append(seconds)
        check_answer(tally, payload, headers, body)
    else:
        tally.rejected_latency_s.append(seconds)
        if status in (429, 503) and "retry-after" not in headers:
            tally.missing_retry_after += 1


async def connect(port: int) -> Connection:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    return Connection(reader, writer)


async def closed_loop(
    port: int, payloads: list[Payload], seconds: float, concurrency: int
) -> Tally:
    tally = Tally()
    deadline = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        conn = await connect(port)
        i = k
        while time.perf_counter() < deadline:
            if not conn.open:
                conn = await connect(port)
            await one_request(conn, payloads[i % len(payloads)], tally)
            i += concurrency
        conn.close()

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return tally


async def open_loop(
    port: int, payloads: list[Payload], seconds: float, rate: float, max_connections: int
) -> Tally:
    tally = Tally()
    idle: list[Connection] = []
    made = 0
    freed = asyncio.Event()
    tasks: set[asyncio.Task] = set()

    async def run(conn: Connection, payload: Payload) -> None:
        await one_request(conn, payload, tally)
        if conn.open:
            idle.append(conn)
        else:
            nonlocal made
            made -= 1
        freed.set()

    start = time.perf_counter()
    total = int(seconds * rate)
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        while not idle and made >= max_connections:
            tally.late_starts += 1
            freed.clear()
            await freed.wait()
        while idle and not idle[-1].reusable():
            idle.pop().close()
            made -= 1
        if idle:
            conn = idle.pop()
        else:
            made += 1
            try:
                conn = await connect(port)
            except OSError as exc:
                made -= 1
                tally.connection_errors.append(f"connect: {exc}"[:200])
                continue
        task = asyncio.create_task(run(conn, payloads[i % len(payloads)]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sending_s = time.perf_counter() - start
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    tally.sending_s = sending_s
    return tally


def summarise(tally: Tally, seconds: float) -> dict:
    accepted = np.array(tally.accepted_latency_s or [0.0])
    return {
        "sent": tally.sent,
        "statuses": tally.statuses,
        "accepted": len(tally.accepted_latency_s),
        "accepted_per_s": len(tally.accepted_latency_s) / seconds,
        "sent_per_s": tally.sent / (tally.sending_s or seconds),
        "p50_s": float(np.percentile(accepted, 50)),
        "p99_s": float(np.percentile(accepted, 99)),
        "max_s": float(accepted.max()),
        "rejected_p99_s": float(np.percentile(tally.rejected_latency_s or [0.0], 99)),
        "missing_retry_after": tally.missing_retry_after,
        "wrong_answers": tally.wrong_answers[:20],
        "max_relative_error": tally.max_abs_error,
        "connection_errors": tally.connection_errors[:20],
        "n_connection_errors": len(tally.connection_errors),
        "late_starts": tally.late_starts,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="california_kamoe")
    parser.add_argument("--model-file", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--mode", choices=["capacity", "open"], required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--max-connections", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    payloads = make_payloads(args.model_file, args.model, args.rows)
    if args.mode == "capacity":
        start = time.perf_counter()
        tally = asyncio.run(closed_loop(args.port, payloads, args.seconds, args.concurrency))
        elapsed = time.perf_counter() - start
    else:
        start = time.perf_counter()
        tally = asyncio.run(
            open_loop(args.port, payloads, args.seconds, args.rate, args.max_connections)
        )
        elapsed = time.perf_counter() - start
    args.out.write_text(json.dumps(summarise(tally, elapsed), indent=1))


if __name__ == "__main__":
    main()
