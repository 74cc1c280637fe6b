"""Faults around a live ``kanmoe serve``: model files vanishing or rotting under it, clients
that vanish mid-request, slow-loris bodies, and SIGTERM while it is busy.

(Broken *new* versions next to a serving one are in test_service_ops.py.)
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import struct
import threading
import time
from collections import Counter

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.serving import DEFAULT_MODEL, DEFAULT_REPOSITORY, copy_repository

MODEL_FILE = DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "model.onnx"
PREDICT = f"/v1/models/{DEFAULT_MODEL}/predict"
LOAD = f"/v2/repository/models/{DEFAULT_MODEL}/load"


@pytest.fixture(scope="module")
def reference():
    session = ort.InferenceSession(str(MODEL_FILE), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        (out,) = session.run(["output"], {"input": x})
        return out[:, 0]

    return run


def _rows(seed: int, n: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = np.array([3.9, 28.0, 5.4, 1.1, 1400.0, 3.0, 35.6, -119.6])
    return (rng.normal(size=(n, 8)) + centre).astype(np.float32)


def _predict(url: str, x: np.ndarray, **kw) -> httpx.Response:
    return httpx.post(url + PREDICT, json={"inputs": x.tolist()}, timeout=30, **kw)


def _raw_request(x: np.ndarray) -> bytes:
    body = json.dumps({"inputs": x.tolist()}).encode()
    head = (
        f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a raw socket (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _clean_log(server) -> None:
    log = server.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


# --------------------------------------------------------------------------- model files


def test_model_file_deleted_or_truncated_under_a_serving_version(
    tmp_path, server_factory, reference
):
    """The session lives in memory: deleting or truncating its file changes nothing served,
    and a reload that cannot read the file keeps the loaded version and says why."""
    repo = copy_repository(tmp_path / "repo")
    server = server_factory(repo)
    x = _rows(1)
    want = reference(x)
    model_file = repo / DEFAULT_MODEL / "1" / "model.onnx"
    data = model_file.read_bytes()

    model_file.unlink()
    for _ in range(5):
        r = _predict(server.url, x)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["predictions"], want, rtol=1e-5, atol=1e-6)
    r = httpx.post(server.url + LOAD, timeout=30)
    assert r.status_code == 200 and r.json()["versions"] == {"1": "READY"}, r.text
    assert "is missing" in r.json()["errors"]["1"], r.text
    np.testing.assert_allclose(_predict(server.url, x).json()["predictions"], want, rtol=1e-5)
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200

    model_file.write_bytes(data[: len(data) // 3])  # a half-copied file in its place
    r = httpx.post(server.url + LOAD, timeout=30)
    assert r.status_code == 200 and r.json()["versions"] == {"1": "READY"}, r.text
    assert "cannot load" in r.json()["errors"]["1"], r.text
    np.testing.assert_allclose(_predict(server.url, x).json()["predictions"], want, rtol=1e-5)

    model_file.write_bytes(data)  # the good file back: reloads cleanly, nothing to report
    r = httpx.post(server.url + LOAD, timeout=30)
    assert r.status_code == 200 and r.json()["errors"] == {}, r.text
    np.testing.assert_allclose(_predict(server.url, x).json()["predictions"], want, rtol=1e-5)
    assert "reload failed, keeping the loaded one" in server.log()
    _clean_log(server)


# --------------------------------------------------------------------------- clients


def test_a_client_that_disconnects_mid_request_leaves_its_batch_mates_answered(
    server_factory, reference
):
    # A long batch delay: every request below waits in the same batch for the others.
    server = server_factory(DEFAULT_REPOSITORY, "--max-delay-ms", "400")
    rows = [_rows(10 + k, n=k + 1) for k in range(6)]
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in rows]
    for k, (sock, x) in enumerate(zip(socks, rows, strict=True)):
        request = _raw_request(x)
        if k == 1:
            sock.sendall(request[: len(request) - 10])  # dies before its body is complete
        else:
            sock.sendall(request)
    time.sleep(0.1)
    for k in (0, 1):  # 0 is queued for the batch when it goes away; 1 never finished sending
        socks[k].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        socks[k].close()  # RST, as a killed client does
    for k in range(2, len(rows)):
        status, _, body = _read_response(socks[k])
        assert status == 200, body
        np.testing.assert_allclose(
            json.loads(body)["predictions"], reference(rows[k]), rtol=1e-5, atol=1e-6
        )
        socks[k].close()
    # The rows of every complete request ran (1 + 3 + 4 + 5 + 6), the gone client's too.
    metrics = httpx.get(server.url + "/metrics").text
    (rows_run,) = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("kanmoe_batch_size_sum{")
    ]
    assert rows_run == 19.0, metrics
    r = _predict(server.url, rows[0])
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["predictions"], reference(rows[0]), rtol=1e-5)
    _clean_log(server)


def test_slow_loris_bodies_time_out_with_408_and_free_the_server(server_factory, reference):
    """Headers then nothing, or a body one byte at a time: 408 after the request timeout,
    the connection closed, and normal requests served at full speed meanwhile."""
    timeout_s = 1.0
    server = server_factory(DEFAULT_REPOSITORY, "--request-timeout-s", str(timeout_s))
    x = _rows(2)
    want = reference(x)
    request = _raw_request(x)
    head, body = request.split(b"\r\n\r\n", 1)
    silent = []  # headers only (regression: this used to wait forever)
    trickling = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=15)
        s.sendall(head + b"\r\n\r\n")
        silent.append(s)
        t = socket.create_connection(("127.0.0.1", server.port), timeout=15)
        t.sendall(head + b"\r\n\r\n" + body[:1])
        trickling.append(t)
    start = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        for i in range(1, len(body)):
            if stop.wait(0.2):
                return
            for t in trickling:
                with contextlib.suppress(OSError):  # already answered and closed
                    t.sendall(body[i : i + 1])

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        latencies = []
        while time.monotonic() - start < timeout_s * 1.5:  # while the attack holds connections
            t0 = time.monotonic()
            r = _predict(server.url, x)
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["predictions"], want, rtol=1e-5, atol=1e-6)
        assert max(latencies) < timeout_s, latencies
        for s in silent + trickling:
            status, headers, reply = _read_response(s)
            assert status == 408, reply
            assert "not received within 1.0 s" in json.loads(reply)["error"]
            assert headers.get("connection") == "close"
            assert s.recv(10) == b""  # the server closed it
            s.close()
        assert time.monotonic() - start < timeout_s + 5
    finally:
        stop.set()
        feeder.join()
    _clean_log(server)


def test_a_content_length_shorter_than_the_body_gets_a_4xx(server_factory):
    """The extra bytes read as a broken next request: uvicorn's parser refuses the whole
    connection with a 400 (before the app answers), never a 5xx."""
    server = server_factory(DEFAULT_REPOSITORY)
    body = json.dumps({"inputs": [[1.0] * 8]}).encode()
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body) - 5}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
        s.sendall(head.encode() + body)
        status, headers, reply = _read_response(s)
        assert status == 400, reply
        if headers["content-type"] == "application/json":
            assert "malformed JSON" in json.loads(reply)["error"]
        else:
            assert reply == b"Invalid HTTP request received."
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    _clean_log(server)


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_under_load_completes_in_flight_refuses_new_and_exits_zero(
    server_factory, reference
):
    # Requests wait up to 1 s for their batch, so at any moment many are in flight.
    server = server_factory(DEFAULT_REPOSITORY, "--max-delay-ms", "1000")
    x = _rows(5, n=1)
    want = reference(x)
    results: list[tuple[float, float, str]] = []  # (sent, answered, outcome)
    stop = threading.Event()
    term_at: list[float] = []

    pending: dict[int, float] = {}  # thread id -> when its current request was sent

    def client() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                pending[threading.get_ident()] = t0
                try:
                    r = c.post(
                        server.url + PREDICT,
                        json={"inputs": x.tolist()},
                        headers={"Connection": "close"},  # a new connection per request
                    )
                except httpx.ConnectError:
                    results.append((t0, time.monotonic(), "refused"))
                    if term_at:
                        return
                    continue
                except httpx.TransportError as exc:
                    results.append((t0, time.monotonic(), type(exc).__name__))
                    continue
                outcome = str(r.status_code)
                if r.status_code == 200:
                    got = r.json()["predictions"]
                    outcome += "" if np.allclose(got, want, rtol=1e-5, atol=1e-6) else " wrong"
                elif r.status_code == 503 and r.headers.get("retry-after") != "1":
                    outcome += " without retry-after"
                results.append((t0, time.monotonic(), outcome))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    deadline = time.monotonic() + 10
    while min(pending.values(), default=time.monotonic()) > time.monotonic() - 0.6:
        assert time.monotonic() < deadline, "requests never waited for their batch"
        time.sleep(0.01)  # until some request has waited 0.6 s (the batch delay is 1 s)
    term_at.append(time.monotonic())
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0, server.log()[-3000:]
    stop.set()
    for t in threads:
        t.join(30)
    sigterm = term_at[0]

    before = [r for r in results if r[0] < sigterm]
    assert all(r[2] == "200" for r in before if r[1] < sigterm), "refused before SIGTERM"
    # In flight at SIGTERM: sent half a second before it (so parsed and waiting for its batch
    # even on a busy machine), answered after it. Every one must complete, and right.
    in_flight = [r for r in before if r[0] < sigterm - 0.5 and r[1] > sigterm]
    assert in_flight, "no request was waiting for its batch at SIGTERM"
    assert all(r[2] == "200" for r in in_flight), in_flight
    # New requests: 503 with Retry-After while draining, or no connection once the socket is
    # closed (a connection accepted but not yet read may be closed unanswered). A 200 is a
    # request that got in before the signal was handled; it must still be right.
    outcomes = Counter(r[2] for r in results if r[0] >= sigterm)
    assert set(outcomes) <= {"200", "503", "refused", "RemoteProtocolError", "ReadError"}, outcomes
    assert outcomes["refused"] >= 1, outcomes
    assert all(r[2] in ("200", "503") for r in before), Counter(r[2] for r in before)
    assert "draining" in server.log()
    _clean_log(server)
