"""The v2 codec against the real tritonclient: its request encoder and its response parser.

tritonclient's ``generate_request_body`` is the independent reference for what arrives on the
wire, and ``parse_response_body`` for what a client reads back; every malformed request must
come back as ProtocolError with the right status and a message that names the problem.
"""

from __future__ import annotations

import gzip
import math
import warnings
import zlib

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

from kanmoe.service.v2_codec import (
    InferRequest,
    ProtocolError,
    RequestedOutput,
    check_requested_outputs,
    decode_infer_request,
    encode_infer_response,
    error_body,
    pick_encoding,
)

LIMIT = 1 << 20
MODEL_OUTPUTS = ["output", "gate_weights"]
ALL_DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def _array(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random values that include the dtype's extremes (and -0.0 / subnormals for floats)."""
    dtype = np.dtype(ALL_DTYPES[datatype])
    n = math.prod(shape)
    if dtype.kind == "b":
        flat = rng.integers(0, 2, n).astype(bool)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        flat = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
        flat[: min(n, 2)] = [info.min, info.max][: min(n, 2)]
    else:
        info = np.finfo(dtype)
        flat = (rng.standard_normal(n) * 1e3).astype(dtype)
        extremes = [info.max, -info.max, info.smallest_subnormal, -0.0]
        flat[: min(n, 4)] = np.array(extremes[: min(n, 4)], dtype=dtype)
    return flat.reshape(shape)


def _client_request(
    arrays: dict[str, tuple[np.ndarray, str, bool]], outputs=None, **kwargs
) -> tuple[bytes, str | None]:
    """The body and Inference-Header-Content-Length tritonclient would send for ``arrays``."""
    inputs = []
    for name, (array, datatype, binary) in arrays.items():
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    body, json_size = InferenceServerClient.generate_request_body(inputs, outputs, **kwargs)
    return body, None if json_size is None else str(json_size)


def _client_read(body: bytes, headers: dict[str, str]):
    """What tritonclient reads from a response with these headers."""
    length = headers.get("inference-header-content-length")
    return InferenceServerClient.parse_response_body(
        body,
        header_length=None if length is None else int(length),
        content_encoding=headers.get("content-encoding"),
    )


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


# ----------------------------------------------------------------------------- requests


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(ALL_DTYPES))
def test_client_request_decodes_to_the_exact_array(datatype, binary, rng):
    x = _array(datatype, (3, 5), rng)
    body, length = _client_request({"x": (x, datatype, binary)})
    got = decode_infer_request(body, length, None, LIMIT).inputs["x"]
    assert got.dtype == x.dtype and got.shape == x.shape
    np.testing.assert_array_equal(got, x)
    assert np.array_equal(np.signbit(got), np.signbit(x))  # -0.0 survives both ways


def test_mixed_binary_and_json_inputs_take_their_own_blobs(rng):
    a = _array("FP32", (2, 8), rng)
    b = _array("INT64", (4,), rng)
    c = _array("FP64", (1, 3), rng)
    e = np.zeros((0, 8), np.float32)  # an empty binary tensor claims zero bytes
    body, length = _client_request(
        {
            "a": (a, "FP32", True),
            "b": (b, "INT64", False),
            "e": (e, "FP32", True),
            "c": (c, "FP64", True),
        }
    )
    assert length is not None and int(length) < len(body)
    got = decode_infer_request(body, length, None, LIMIT).inputs
    assert list(got) == ["a", "b", "e", "c"]
    for name, want in {"a": a, "b": b, "e": e, "c": c}.items():
        np.testing.assert_array_equal(got[name], want)
        assert got[name].shape == want.shape


def test_request_fields_id_parameters_and_default_outputs(rng):
    x = _array("FP32", (1, 8), rng)
    body, length = _client_request(
        {"input": (x, "FP32", False)},
        request_id="r-é✓",
        sequence_id=7,
        priority=2,
        parameters={"tenant": "a"},
    )
    req = decode_infer_request(body, length, None, LIMIT)
    assert req.id == "r-é✓"
    assert req.outputs is None and req.binary_default is True  # the client's default
    assert req.parameters["tenant"] == "a" and req.parameters["priority"] == 2
    assert req.parameters["sequence_id"] == 7


def test_requested_outputs_keep_order_and_binary_flags(rng):
    x = _array("FP32", (1, 8), rng)
    outputs = [
        InferRequestedOutput("gate_weights", binary_data=True),
        InferRequestedOutput("output", binary_data=False),
    ]
    body, length = _client_request({"input": (x, "FP32", True)}, outputs=outputs)
    req = decode_infer_request(body, length, None, LIMIT)
    assert req.outputs == [RequestedOutput("gate_weights", True), RequestedOutput("output", False)]
    assert req.binary_default is False and req.id is None


@pytest.mark.parametrize(
    "encoding,compress",
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", _raw_deflate),
        ("gzip", lambda b: gzip.compress(b[:100]) + gzip.compress(b[100:])),  # two members
        ("GZip ", gzip.compress),
        ("identity", lambda b: b),
        ("deflate, gzip", lambda b: gzip.compress(zlib.compress(b))),  # applied in listed order
    ],
    ids=["gzip", "deflate-zlib", "deflate-raw", "gzip-2-members", "case", "identity", "stacked"],
)
def test_compressed_requests_split_at_the_uncompressed_header_length(encoding, compress, rng):
    x = _array("FP32", (4, 8), rng)
    y = _array("UINT16", (3,), rng)
    body, length = _client_request({"x": (x, "FP32", True), "y": (y, "UINT16", False)})
    got = decode_infer_request(compress(body), length, encoding, LIMIT).inputs
    np.testing.assert_array_equal(got["x"], x)
    np.testing.assert_array_equal(got["y"], y)


def test_nested_json_data_is_accepted_when_rectangular():
    doc = {
        "inputs": [
            {"name": "x", "datatype": "INT32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]}
        ]
    }
    got = decode_infer_request(orjson.dumps(doc), None, None, LIMIT).inputs["x"]
    np.testing.assert_array_equal(got, np.arange(1, 7, dtype=np.int32).reshape(2, 3))


def test_fp32_overflow_becomes_inf_for_the_model_layer_to_reject():
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1e39, 1.0]}]}
    for action in ("ignore", "error"):  # the fast path and the warnings-are-errors path
        with warnings.catch_warnings():
            warnings.simplefilter(action)
            got = decode_infer_request(orjson.dumps(doc), None, None, LIMIT).inputs["x"]
        assert got.dtype == np.float32 and np.isinf(got[0]) and got[1] == 1.0


# ----------------------------------------------------------------------------- responses


def _request(outputs=None, binary_default=True, request_id=None) -> InferRequest:
    return InferRequest(request_id, {}, outputs, binary_default, {})


def _model_outputs(rng: np.random.Generator, rows: int = 3) -> dict[str, np.ndarray]:
    return {
        "output": _array("FP32", (rows, 1), rng),
        "gate_weights": rng.dirichlet(np.ones(3), rows).astype(np.float32),
    }


@pytest.mark.parametrize("accept", [None, "gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_client_reads_back_every_output_exactly(binary, accept, rng):
    outs = _model_outputs(rng, rows=50)
    req = _request(binary_default=binary, request_id="r1")
    body, headers = encode_infer_response(
        "california_kamoe", "1", req, outs, MODEL_OUTPUTS, accept, compress_min_bytes=0
    )
    assert headers.get("content-encoding") == accept
    assert ("inference-header-content-length" in headers) is binary
    result = _client_read(body, headers)
    for name, want in outs.items():
        got = result.as_numpy(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    doc = result.get_response()
    assert [o["name"] for o in doc["outputs"]] == MODEL_OUTPUTS
    assert doc["model_name"] == "california_kamoe" and doc["model_version"] == "1"
    assert doc["id"] == "r1"


def test_json_data_is_flat_and_header_length_counts_the_uncompressed_json(rng):
    outs = _model_outputs(rng, rows=64)
    body, headers = encode_infer_response(
        "m", "1", _request(binary_default=True), outs, MODEL_OUTPUTS, "gzip", compress_min_bytes=0
    )
    raw = gzip.decompress(body)
    n = int(headers["inference-header-content-length"])
    doc = orjson.loads(raw[:n])
    assert len(raw) - n == sum(a.nbytes for a in outs.values())
    body, headers = encode_infer_response(
        "m", "1", _request(binary_default=False), outs, MODEL_OUTPUTS, None
    )
    doc = orjson.loads(body)
    assert "inference-header-content-length" not in headers
    assert all(type(v) is float for o in doc["outputs"] for v in o["data"])  # flat, not nested


def test_blobs_follow_the_requested_output_order_and_flags(rng):
    outs = _model_outputs(rng)
    outs["output"] = np.arange(3, dtype=np.float32).reshape(3, 1)
    for order in (["gate_weights", "output"], ["output", "gate_weights"]):
        req = _request([RequestedOutput(n, True) for n in order], binary_default=False)
        body, headers = encode_infer_response("m", "1", req, outs, MODEL_OUTPUTS, None)
        result = _client_read(body, headers)
        assert [o["name"] for o in result.get_response()["outputs"]] == order
        for name in order:
            np.testing.assert_array_equal(result.as_numpy(name), outs[name])
    req = _request([RequestedOutput("gate_weights", False)])
    body, headers = encode_infer_response("m", "1", req, outs, MODEL_OUTPUTS, None)
    result = _client_read(body, headers)
    np.testing.assert_array_equal(result.as_numpy("gate_weights"), outs["gate_weights"])
    assert result.as_numpy("output") is None  # only what was asked for


@pytest.mark.parametrize("datatype", list(ALL_DTYPES))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_numeric_dtype_round_trips_through_the_client(datatype, binary, rng):
    x = _array(datatype, (2, 3), rng)
    if x.dtype.kind == "f":
        x.flat[4] = np.nan  # NaN survives both ways (JSON null reads back as NaN)
    body, headers = encode_infer_response(
        "m", "1", _request(binary_default=binary), {"y": x}, ["y"], None
    )
    got = _client_read(body, headers).as_numpy("y")
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, x)


def test_infinities_are_exact_in_blobs_and_null_in_json():
    y = np.array([[np.inf, -np.inf, 1.5]], dtype=np.float32)
    body, headers = encode_infer_response(
        "m", "1", _request(binary_default=True), {"y": y}, ["y"], None
    )
    np.testing.assert_array_equal(_client_read(body, headers).as_numpy("y"), y)
    body, headers = encode_infer_response(
        "m", "1", _request(binary_default=False), {"y": y}, ["y"], None
    )
    assert orjson.loads(body)["outputs"][0]["data"] == [None, None, 1.5]  # JSON has no Infinity
    np.testing.assert_array_equal(
        _client_read(body, headers).as_numpy("y"), [[np.nan, np.nan, 1.5]]
    )


def test_big_endian_arrays_are_sent_little_endian(rng):
    x = _array("FP64", (2, 2), rng)
    for binary in (True, False):
        body, headers = encode_infer_response(
            "m", "1", _request(binary_default=binary), {"y": x.astype(">f8")}, ["y"], None
        )
        np.testing.assert_array_equal(_client_read(body, headers).as_numpy("y"), x)


def test_small_responses_and_unknown_encodings_are_not_compressed(rng):
    outs = _model_outputs(rng, rows=1)
    for accept, min_bytes in (("gzip", 512), ("br", 0), ("identity", 0), ("gzip;q=0", 0)):
        body, headers = encode_infer_response(
            "m", "1", _request(), outs, MODEL_OUTPUTS, accept, compress_min_bytes=min_bytes
        )
        assert "content-encoding" not in headers, accept
        np.testing.assert_array_equal(
            _client_read(body, headers).as_numpy("output"), outs["output"]
        )


@pytest.mark.parametrize(
    "accept,want",
    [
        (None, None),
        ("", None),
        ("br", None),
        ("gzip, deflate, br", "gzip"),
        ("deflate", "deflate"),
        ("gzip;q=0.5, deflate;q=0.8", "deflate"),
        ("gzip;q=0, deflate", "deflate"),
        ("*", "gzip"),
        ("*;q=0", None),
        ("br;q=1.0, *;q=0.1", "gzip"),
        ("GZIP", "gzip"),
        ("gzip;q=oops", None),
    ],
)
def test_pick_encoding_follows_q_values(accept, want):
    assert pick_encoding(accept) == want


def test_error_body_is_what_the_client_reads_as_the_message():
    assert orjson.loads(error_body('bad "x"\n')) == {"error": 'bad "x"\n'}


def test_check_requested_outputs_names_the_available_ones():
    check_requested_outputs(_request(), MODEL_OUTPUTS)
    check_requested_outputs(_request([RequestedOutput("output", True)]), MODEL_OUTPUTS)
    with pytest.raises(ProtocolError) as err:
        check_requested_outputs(_request([RequestedOutput("x", True)]), MODEL_OUTPUTS)
    assert err.value.status == 400
    assert err.value.message == "unknown output 'x'; the model has: output, gate_weights"


def test_encoder_refuses_a_missing_output_array(rng):
    with pytest.raises(ValueError, match="gate_weights"):
        encode_infer_response(
            "m", "1", _request(), {"output": np.zeros((1, 1), np.float32)}, MODEL_OUTPUTS, None
        )


# ----------------------------------------------------------------------------- malformed requests


def _doc(**input_fields) -> dict:
    entry = {"name": "input", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}
    entry.update(input_fields)
    return {"inputs": [{k: v for k, v in entry.items() if v is not ...}]}


def _json(doc) -> tuple[bytes, None, None]:
    return orjson.dumps(doc), None, None


def _binary(
    entry_fields: dict, blob: bytes, length_delta: int = 0, **top
) -> tuple[bytes, str, None]:
    entry = {
        "name": "input",
        "datatype": "FP32",
        "shape": [2, 2],
        "parameters": {"binary_data_size": 16},
    }
    entry.update(entry_fields)
    header = orjson.dumps({"inputs": [entry], **top})
    return header + blob, str(len(header) + length_delta), None


BLOB16 = np.arange(4, dtype=np.float32).tobytes()
TWO_INPUTS = {"inputs": [_doc()["inputs"][0], _doc()["inputs"][0]]}

MALFORMED = {
    # JSON and top level
    "not json": ((b"{nope", None, None), 400, "request JSON is invalid"),
    "not utf-8": ((b'{"id": "\xff"}', None, None), 400, "request JSON is invalid"),
    "empty body": ((b"", None, None), 400, "request JSON is invalid"),
    "array": (_json([1, 2]), 400, "must be an object"),
    "no inputs": (_json({"outputs": []}), 400, "inputs must be a non-empty list"),
    "empty inputs": (_json({"inputs": []}), 400, "inputs must be a non-empty list"),
    "input not object": (_json({"inputs": [3]}), 400, "inputs[0] must be an object"),
    "id number": (_json({**_doc(), "id": 5}), 400, "id must be a string"),
    "parameters list": (_json({**_doc(), "parameters": []}), 400, "parameters must be an object"),
    "binary_data_output str": (
        _json({**_doc(), "parameters": {"binary_data_output": "yes"}}),
        400,
        "binary_data_output must be true or false",
    ),
    # names, datatypes, shapes
    "name missing": (_json(_doc(name=...)), 400, "inputs[0].name must be a string"),
    "name number": (_json(_doc(name=1)), 400, "inputs[0].name must be a string"),
    "duplicate": (_json(TWO_INPUTS), 400, "inputs[1] 'input': duplicate input name"),
    "BYTES": (_json(_doc(datatype="BYTES")), 400, "datatype BYTES is not supported by this model"),
    "BF16": (_json(_doc(datatype="BF16")), 400, "datatype BF16 is not supported by this model"),
    "FLOAT32": (_json(_doc(datatype="FLOAT32")), 400, "'FLOAT32' is not a v2 datatype"),
    "datatype list": (_json(_doc(datatype=["FP32"])), 400, "is not a v2 datatype"),
    "shape missing": (_json(_doc(shape=...)), 400, "shape must be a list of non-negative integers"),
    "shape negative": (_json(_doc(shape=[-1, 4])), 400, "'input': shape must be a list"),
    "shape float": (_json(_doc(shape=[2.0, 2])), 400, "shape must be a list"),
    "shape bool": (_json(_doc(shape=[True, 4])), 400, "shape must be a list"),
    "shape string": (_json(_doc(shape="2,2")), 400, "shape must be a list"),
    "shape huge empty": (
        _json(_doc(shape=[0, 2**63], data=[])),
        400,
        "shape [0, 9223372036854775808] is invalid",
    ),
    "shape 65 dims": (_json(_doc(shape=[0] * 65, data=[])), 400, "is invalid"),
    "shape huge empty binary": (
        _binary({"shape": [2**40, 2**40, 0], "parameters": {"binary_data_size": 0}}, b""),
        400,
        "is invalid",
    ),
    # JSON data
    "count": (
        _json(_doc(shape=[2, 7], data=list(range(16)))),
        400,
        "inputs[0] 'input': shape [2, 7] does not match data of 16 elements",
    ),
    "data missing": (_json(_doc(data=...)), 400, "'input' needs data (a list)"),
    "data scalar": (_json(_doc(shape=[], data=1.0)), 400, "needs data (a list)"),
    "boolean": (_json(_doc(data=[1.0, True, 3.0, 4.0])), 400, "'input': data holds a boolean"),
    "string": (_json(_doc(data=[1.0, "2", 3.0, 4.0])), 400, "data holds a string"),
    "null": (_json(_doc(data=[1.0, None, 3.0, 4.0])), 400, "data holds null"),
    "object": (_json(_doc(data=[1.0, {}, 3.0, 4.0])), 400, "data holds an object"),
    "ragged": (_json(_doc(data=[[1.0, 2.0, 3.0], [4.0]])), 400, "ragged nested list"),
    "mixed nesting": (
        _json(_doc(data=[[1.0, 2.0], 3.0, 4.0])),
        400,
        "mixes nested lists and scalars",
    ),
    "deep scalar mix": (_json(_doc(data=[[1.0, [2.0]], [3.0, 4.0]])), 400, "nested list mixed"),
    "float in INT32": (
        _json(_doc(datatype="INT32", data=[1, 2.5, 3, 4])),
        400,
        "non-integer number",
    ),
    "int in BOOL": (
        _json(_doc(datatype="BOOL", data=[True, 1, False, True])),
        400,
        "holds a number",
    ),
    "UINT8 300": (
        _json(_doc(datatype="UINT8", data=[1, 300, 3, 4])),
        400,
        "out of range for UINT8",
    ),
    "UINT8 -1": (_json(_doc(datatype="UINT8", data=[1, -1, 3, 4])), 400, "out of range for UINT8"),
    "INT64 2**64-1": (
        _json(_doc(datatype="INT64", data=[1, 2**64 - 1, 3, 4])),
        400,
        "out of range for INT64",
    ),
    # binary extension
    "size mismatch": (
        _binary({"parameters": {"binary_data_size": 12}}, BLOB16[:12]),
        400,
        "binary_data_size 12 does not match shape [2, 2] (4 x 4 bytes = 16)",
    ),
    "blob short": (
        _binary({}, BLOB16[:12]),
        400,
        "runs past the end of the body (needs 16 bytes, 12 left)",
    ),
    "blob long": (
        _binary({}, BLOB16 + b"\0"),
        400,
        "1 bytes after the JSON header are not claimed",
    ),
    "data and size": (_binary({"data": [1.0, 2.0, 3.0, 4.0]}, BLOB16), 400, "has both data and"),
    "size negative": (
        _binary({"parameters": {"binary_data_size": -16}}, BLOB16),
        400,
        "non-negative integer",
    ),
    "size string": (
        _binary({"parameters": {"binary_data_size": "16"}}, BLOB16),
        400,
        "non-negative integer",
    ),
    "size no header": (
        (_binary({}, b"")[0], None, None),
        400,
        "has binary_data_size but the request has no Inference-Header-Content-Length",
    ),
    "input parameters list": (_json(_doc(parameters=[1])), 400, "parameters must be an object"),
    "header length text": (
        (b"{}", "abc", None),
        400,
        "Inference-Header-Content-Length 'abc' is not an integer",
    ),
    "header length negative": ((b"{}", "-2", None), 400, "is not an integer"),
    "header length 5000 digits": (
        (b"{}", "9" * 5000, None),
        400,
        "9... is not an integer",
    ),
    "header length underscore": ((b"{}" * 10, "1_0", None), 400, "is not an integer"),
    "header length zero": (
        (b"{}", "0", None),
        400,
        "Inference-Header-Content-Length 0 is outside the body of 2 bytes",
    ),
    "header length past body": (_binary({}, BLOB16, length_delta=17), 400, "is outside the body"),
    "header length short": (_binary({}, BLOB16, length_delta=-1), 400, "request JSON is invalid"),
    # requested outputs
    "outputs dict": (
        _json({**_doc(), "outputs": {"name": "output"}}),
        400,
        "outputs must be a list",
    ),
    "output no name": (
        _json({**_doc(), "outputs": [{}]}),
        400,
        "outputs[0] must be an object with a string name",
    ),
    "output twice": (
        _json({**_doc(), "outputs": [{"name": "o"}, {"name": "o"}]}),
        400,
        "outputs[1]: output 'o' is requested twice",
    ),
    "binary_data str": (
        _json({**_doc(), "outputs": [{"name": "o", "parameters": {"binary_data": 1}}]}),
        400,
        "outputs[0].parameters.binary_data must be true or false",
    ),
    "classification": (
        _json({**_doc(), "outputs": [{"name": "o", "parameters": {"classification": 3}}]}),
        400,
        "classification extension is not supported",
    ),
    # encodings and sizes
    "br": (
        (gzip.compress(b"{}"), None, "br"),
        415,
        "unsupported Content-Encoding 'br'; use gzip or deflate",
    ),
    "gzip garbage": (
        (b"not gzip at all", None, "gzip"),
        400,
        "request body is not valid gzip data",
    ),
    "deflate garbage": ((b"\xff\xfe garbage", None, "deflate"), 400, "not valid deflate data"),
    "gzip truncated": (
        (gzip.compress(orjson.dumps(_doc()))[:-9], None, "gzip"),
        400,
        "truncated gzip data",
    ),
    "gzip empty": ((b"", None, "gzip"), 400, "truncated gzip data"),
    "deflate trailing": (
        (zlib.compress(orjson.dumps(_doc())) + b"xx", None, "deflate"),
        400,
        "trailing bytes",
    ),
    "gzip trailing": (
        (gzip.compress(orjson.dumps(_doc())) + b"xx", None, "gzip"),
        400,
        "not valid gzip data",
    ),
    "zip bomb": (
        (gzip.compress(b" " * (4 * LIMIT)), None, "gzip"),
        413,
        f"exceeds the limit of {LIMIT} bytes",
    ),
    "deflate bomb": (
        (zlib.compress(b" " * (LIMIT + 1)), None, "deflate"),
        413,
        "decompressed request body exceeds",
    ),
    "too big": (
        (b" " * (LIMIT + 1), None, None),
        413,
        f"request body exceeds the limit of {LIMIT} bytes",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_name_the_problem(case):
    (body, length, encoding), status, fragment = MALFORMED[case]
    with pytest.raises(ProtocolError) as err:
        decode_infer_request(body, length, encoding, LIMIT)
    assert err.value.status == status
    assert fragment in err.value.message, err.value.message
    assert "\n" not in err.value.message and str(err.value) == err.value.message


def test_limit_applies_exactly_at_the_decompressed_size():
    body = orjson.dumps(_doc(shape=[1000], data=[0.0] * 1000))
    packed = gzip.compress(body)
    assert len(packed) < len(body) // 10
    assert decode_infer_request(packed, None, "gzip", len(body)).inputs["input"].size == 1000
    with pytest.raises(ProtocolError) as err:
        decode_infer_request(packed, None, "gzip", len(body) - 1)
    assert err.value.status == 413


def test_client_bytes_and_bf16_inputs_are_refused_by_name():
    import ml_dtypes

    for datatype, array in (
        ("BYTES", np.array([[b"a", b"bc"]], dtype=object)),
        ("BF16", np.ones((1, 2), dtype=ml_dtypes.bfloat16)),
    ):
        body, length = _client_request({"words": (array, datatype, True)})
        with pytest.raises(
            ProtocolError, match=f"inputs\\[0\\] 'words': datatype {datatype} is not supported"
        ):
            decode_infer_request(body, length, None, LIMIT)


def test_long_names_are_cut_in_messages():
    with pytest.raises(ProtocolError) as err:
        decode_infer_request(orjson.dumps(_doc(name="n" * 10_000, datatype="X")), None, None, LIMIT)
    assert len(err.value.message) < 300


# ----------------------------------------------------------------------------- property tests

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=30,
)
header_lengths = (
    st.none() | st.integers(-3, 400).map(str) | st.text(max_size=4) | st.sampled_from(["9" * 5000])
)
encodings = (
    st.none()
    | st.text(max_size=8)
    | st.sampled_from(["gzip", "deflate", "identity", "gzip, deflate"])
)


def _decodes_or_refuses(body: bytes, length: str | None, encoding: str | None) -> None:
    try:
        req = decode_infer_request(body, length, encoding, 4096)
    except ProtocolError as err:
        assert 400 <= err.status < 500 and err.message
        event(f"refused {err.status}")
        return
    event("decoded")
    for array in req.inputs.values():
        assert isinstance(array, np.ndarray)


@FUZZ
@given(st.binary(max_size=300), header_lengths, encodings)
def test_random_bytes_only_raise_protocol_errors(body, length, encoding):
    _decodes_or_refuses(body, length, encoding)


@FUZZ
@given(json_values, st.sampled_from([None, "gzip", "deflate"]))
def test_random_json_only_raises_protocol_errors(doc, encoding):
    body = orjson.dumps(doc)
    body = {None: body, "gzip": gzip.compress(body), "deflate": zlib.compress(body)}[encoding]
    _decodes_or_refuses(body, None, encoding)


@st.composite
def client_like_requests(draw):
    """A valid request (JSON and binary inputs of every dtype) with at most one field broken."""
    entries, blobs, arrays = [], [], {}
    for k in range(draw(st.integers(1, 3))):
        datatype = draw(st.sampled_from(list(ALL_DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        x = _array(datatype, tuple(shape), np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
        entry = {"name": f"in{k}", "datatype": datatype, "shape": shape}
        if draw(st.booleans()):
            entry["parameters"] = {"binary_data_size": x.nbytes}
            blobs.append(x.tobytes())
        else:
            entry["data"] = x.ravel().tolist()
        entries.append(entry)
        arrays[entry["name"]] = x
    broken = draw(st.none() | st.sampled_from(["entry", "blob", "length"]))
    delta = 0
    if broken == "entry":
        entry = draw(st.sampled_from(entries))
        key = draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters"]))
        weird = st.sampled_from(["BYTES", "INT8", [1], [-1], [0, 2**63], [0] * 65, [2**62] * 3])
        entry[key] = draw(json_values | weird)
    elif broken == "blob":
        blobs.append(draw(st.binary(min_size=1, max_size=8)))
    elif broken == "length":
        delta = draw(st.sampled_from([-2, -1, 1, 2]))
    header = orjson.dumps({"inputs": entries})
    body = header + b"".join(blobs)
    return body, str(len(header) + delta), arrays, broken


@FUZZ
@given(client_like_requests())
def test_valid_requests_decode_exactly_and_broken_ones_only_raise_protocol_errors(case):
    body, length, arrays, broken = case
    if broken is not None:
        _decodes_or_refuses(body, length, None)
        return
    got = decode_infer_request(body, length, None, 1 << 16).inputs
    event("decoded")
    assert list(got) == list(arrays)
    for name, want in arrays.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape
        np.testing.assert_array_equal(got[name], want)
