"""The Open Inference Protocol v2 routes, driven by the real tritonclient against kanmoe serve.

The clients are used unchanged (sync over geventhttpclient, aio over aiohttp): whatever they
need from a server is what this file checks. Inference results are compared with running the
shipped ONNX file directly in onnxruntime.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import zlib

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import tritonclient.http as th
import tritonclient.http.aio as th_aio
from tritonclient.utils import InferenceServerException

from kanmoe.paths import CALIFORNIA_HOUSING_CSV
from tests.serving import DEFAULT_MODEL, DEFAULT_REPOSITORY

MODEL_FILE = DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "model.onnx"
FEATURES = json.loads((MODEL_FILE.parent / "kanmoe.json").read_text())["feature_names"]
OUTPUTS = ["output", "gate_weights", "expert_outputs"]


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    frame = pd.read_csv(CALIFORNIA_HOUSING_CSV, nrows=40)
    return frame[FEATURES].to_numpy(np.float32)


@pytest.fixture(scope="module")
def reference(rows) -> dict[str, np.ndarray]:
    """The ONNX file's own answer for ``rows``, run directly in onnxruntime."""
    session = ort.InferenceSession(str(MODEL_FILE), providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUTS, session.run(OUTPUTS, {"input": rows}), strict=True))


@pytest.fixture(scope="module")
def client(default_server):
    c = th.InferenceServerClient(default_server.address, network_timeout=30.0)
    yield c
    c.close()


def _input(x: np.ndarray, binary: bool, datatype: str = "FP32") -> th.InferInput:
    tensor = th.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def _assert_matches(result, reference: dict[str, np.ndarray], names=OUTPUTS) -> None:
    for name in names:
        got = result.as_numpy(name)
        assert got is not None, f"{name} missing from {result.get_response()}"
        assert got.dtype == np.float32 and got.shape == reference[name].shape
        # the server batches rows with other requests: allow float32 reduction-order noise
        np.testing.assert_allclose(got, reference[name], rtol=1e-5, atol=1e-6)


def _post_raw(server, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", f"/v2/models/{DEFAULT_MODEL}/infer", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# ----------------------------------------------------------------------------- metadata


def test_health_readiness_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(DEFAULT_MODEL)
    assert client.is_model_ready(DEFAULT_MODEL, "1")
    assert not client.is_model_ready("nothing")
    assert not client.is_model_ready(DEFAULT_MODEL, "9")

    server = client.get_server_metadata()
    assert server["name"] == "kanmoe" and "binary_tensor_data" in server["extensions"]

    for version in ("", "1"):
        meta = client.get_model_metadata(DEFAULT_MODEL, version)
        assert meta["name"] == DEFAULT_MODEL and "1" in meta["versions"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
        assert meta["outputs"] == [
            {"name": "output", "datatype": "FP32", "shape": [-1, 1]},
            {"name": "gate_weights", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "expert_outputs", "datatype": "FP32", "shape": [-1, 3, 1]},
        ]
        config = client.get_model_config(DEFAULT_MODEL, version)
        assert config["name"] == DEFAULT_MODEL
        assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [8]}]
        assert [(o["name"], o["dims"]) for o in config["output"]] == [
            ("output", [1]),
            ("gate_weights", [3]),
            ("expert_outputs", [3, 1]),
        ]

    index = client.get_model_repository_index()
    assert {"name": DEFAULT_MODEL, "version": "1", "state": "READY"}.items() <= index[0].items()


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_model_metadata("nothing"),
        lambda c: c.get_model_metadata(DEFAULT_MODEL, "9"),
        lambda c: c.get_model_config("nothing"),
        lambda c: c.get_model_config(DEFAULT_MODEL, "9"),
        lambda c: c.load_model("nothing"),
    ],
    ids=["metadata", "metadata-version", "config", "config-version", "load"],
)
def test_unknown_models_and_versions_are_404_with_the_servers_message(client, call):
    with pytest.raises(InferenceServerException) as err:
        call(client)
    assert err.value.status() == "404"
    assert "'nothing'" in err.value.message() or "'9'" in err.value.message()
    assert "exception occurred in the client" not in err.value.message()  # a clean {"error"}


# ----------------------------------------------------------------------------- inference

INFER_CASES = {
    # id: (binary input, requested outputs [(name, binary)] or None, request enc, response enc)
    "json-in-default-out": (False, None, None, None),
    "binary-in-default-out": (True, None, None, None),
    "binary-in-json-out": (True, [("output", False), ("gate_weights", False)], None, None),
    "mixed-out-reversed": (False, [("gate_weights", True), ("output", False)], None, None),
    "gzip-both-ways": (True, None, "gzip", "gzip"),
    "deflate-both-ways": (False, [("output", True), ("gate_weights", False)], "deflate", "deflate"),
    "gzip-in-deflate-out": (True, [("gate_weights", True)], "gzip", "deflate"),
}


@pytest.mark.parametrize("case", list(INFER_CASES))
def test_infer_equals_the_onnx_file(client, rows, reference, case):
    binary_in, requested, request_enc, response_enc = INFER_CASES[case]
    outputs = None
    if requested is not None:
        outputs = [th.InferRequestedOutput(n, binary_data=b) for n, b in requested]
    result = client.infer(
        DEFAULT_MODEL,
        [_input(rows, binary_in)],
        outputs=outputs,
        request_id=f"req-{case}",
        request_compression_algorithm=request_enc,
        response_compression_algorithm=response_enc,
    )
    names = OUTPUTS if requested is None else [n for n, _ in requested]
    _assert_matches(result, reference, names)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == names  # only what was asked, in order
    assert response["model_name"] == DEFAULT_MODEL and response["model_version"] == "1"
    assert response["id"] == f"req-{case}"


def test_versioned_infer_and_async_infer(client, rows, reference):
    result = client.infer(DEFAULT_MODEL, [_input(rows, True)], model_version="1")
    _assert_matches(result, reference)
    pending = [
        client.async_infer(DEFAULT_MODEL, [_input(rows[i : i + 1], i % 2 == 0)]) for i in range(8)
    ]
    for i, job in enumerate(pending):
        _assert_matches(job.get_result(), {k: v[i : i + 1] for k, v in reference.items()})


@pytest.mark.parametrize("accept", ["gzip", "deflate"])
def test_large_infer_responses_are_compressed_when_asked(default_server, rows, reference, accept):
    """On the wire: Content-Encoding set, header length = uncompressed JSON, client reads it."""
    body, json_size = th.InferenceServerClient.generate_request_body([_input(rows, True)])
    headers = {"Inference-Header-Content-Length": str(json_size), "Accept-Encoding": accept}
    status, got_headers, raw = _post_raw(default_server, body, headers)
    assert status == 200 and got_headers["content-encoding"] == accept
    plain = gzip.decompress(raw) if accept == "gzip" else zlib.decompress(raw)
    length = int(got_headers["inference-header-content-length"])
    assert json.loads(plain[:length])["outputs"][0]["name"] == "output"
    result = th.InferenceServerClient.parse_response_body(
        raw, header_length=length, content_encoding=accept
    )
    _assert_matches(result, reference)


# ----------------------------------------------------------------------------- errors


def test_encoding_errors_come_back_as_plain_json_errors(default_server, rows):
    """415 / 413 / 400 from the codec reach the client as uncompressed {"error"} bodies."""
    body, json_size = th.InferenceServerClient.generate_request_body([_input(rows, True)])
    length = {"Inference-Header-Content-Length": str(json_size), "Accept-Encoding": "gzip"}
    bomb = gzip.compress(b" " * (16 * 1024 * 1024 + 1), compresslevel=1)
    cases = [
        (body, {"Content-Encoding": "br"}, 415, "unsupported Content-Encoding 'br'"),
        (bomb, {"Content-Encoding": "gzip"}, 413, "decompressed request body exceeds the limit"),
        (body[:-3], {}, 400, "binary data runs past the end of the body"),
        (zlib.compress(body)[:-4], {"Content-Encoding": "deflate"}, 400, "deflate"),
    ]
    for payload, extra, status, fragment in cases:
        got_status, headers, raw = _post_raw(default_server, payload, {**length, **extra})
        assert got_status == status, raw
        assert "content-encoding" not in headers  # the client never decompresses errors
        assert fragment in json.loads(raw)["error"]


def _nan_in_row_0(x: np.ndarray) -> np.ndarray:
    y = x[:2].copy()
    y[0, 2] = np.nan  # AveRooms
    return y


BAD_INFERS = {
    # id: (x -> (model, inputs, infer kwargs), status, fragment of the server's message)
    "unknown model": (
        lambda x: ("nothing", [_input(x, True)], {}),
        "404",
        "unknown model 'nothing'",
    ),
    "unknown version": (
        lambda x: (DEFAULT_MODEL, [_input(x, True)], {"model_version": "9"}),
        "404",
        "no version '9'",
    ),
    "bad shape": (
        lambda x: (DEFAULT_MODEL, [_input(x[:, :7].copy(), False)], {}),
        "400",
        "got [40, 7]",
    ),
    "unknown output": (
        lambda x: (DEFAULT_MODEL, [_input(x, True)], {"outputs": [th.InferRequestedOutput("x")]}),
        "400",
        "unknown output 'x'; the model has: output, gate_weights",
    ),
    "FP64 input": (
        lambda x: (DEFAULT_MODEL, [_input(x.astype(np.float64), True, "FP64")], {}),
        "400",
        "datatype must be FP32",
    ),
    "BYTES input": (
        lambda x: (DEFAULT_MODEL, [_input(np.array([[b"a"]], dtype=object), True, "BYTES")], {}),
        "400",
        "inputs[0] 'input': datatype BYTES is not supported by this model",
    ),
    "NaN row": (
        lambda x: (DEFAULT_MODEL, [_input(_nan_in_row_0(x), True)], {}),
        "400",
        "row[0] feature 'AveRooms' is not finite",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INFERS))
def test_bad_infers_raise_with_the_servers_message(client, rows, case):
    build, status, fragment = BAD_INFERS[case]
    model, inputs, kwargs = build(rows)
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, inputs, **kwargs)
    assert err.value.status() == status, err.value.message()
    assert fragment in err.value.message()
    assert "exception occurred in the client" not in err.value.message()


# ----------------------------------------------------------------------------- aio client


def test_aio_client_metadata_infer_and_errors(default_server, rows, reference):
    """The aio client always sends Accept-Encoding: gzip, deflate, br and decompresses itself."""

    async def main():
        async with th_aio.InferenceServerClient(default_server.address) as c:
            assert await c.is_server_live() and await c.is_model_ready(DEFAULT_MODEL)
            assert not await c.is_model_ready("nothing")
            meta = await c.get_model_metadata(DEFAULT_MODEL)  # must not come back compressed
            assert meta["inputs"][0]["shape"] == [-1, 8]
            assert (await c.get_model_config(DEFAULT_MODEL))["name"] == DEFAULT_MODEL
            results = await asyncio.gather(
                c.infer(DEFAULT_MODEL, [_input(rows, True)]),
                c.infer(
                    DEFAULT_MODEL,
                    [_input(rows, False)],
                    outputs=[th_aio.InferRequestedOutput("gate_weights", binary_data=False)],
                    request_compression_algorithm="gzip",
                ),
                *(c.infer(DEFAULT_MODEL, [_input(rows[i : i + 1], True)]) for i in range(6)),
            )
            with pytest.raises(InferenceServerException) as err:
                await c.infer(DEFAULT_MODEL, [_input(rows, True)], model_version="9")
            return results, err.value

    results, error = asyncio.run(main())
    _assert_matches(results[0], reference)
    _assert_matches(results[1], reference, ["gate_weights"])
    for i, result in enumerate(results[2:]):
        _assert_matches(result, {k: v[i : i + 1] for k, v in reference.items()})
    assert error.status() == "404" and "9" in error.message()


# ----------------------------------------------------------------------------- repository


def test_unload_then_load_through_the_client(server_factory, rows, reference):
    server = server_factory()  # private: unloading must not disturb the shared server
    c = th.InferenceServerClient(server.address, network_timeout=30.0)
    try:
        c.unload_model(DEFAULT_MODEL)
        assert not c.is_model_ready(DEFAULT_MODEL)
        assert not c.is_server_ready()
        with pytest.raises(InferenceServerException) as err:
            c.infer(DEFAULT_MODEL, [_input(rows, True)])
        assert err.value.status() == "404"
        states = {(e["name"], e.get("state")) for e in c.get_model_repository_index()}
        assert (DEFAULT_MODEL, "UNAVAILABLE") in states

        c.load_model(DEFAULT_MODEL)
        assert c.is_model_ready(DEFAULT_MODEL) and c.is_server_ready()
        _assert_matches(c.infer(DEFAULT_MODEL, [_input(rows, True)]), reference)
    finally:
        c.close()
