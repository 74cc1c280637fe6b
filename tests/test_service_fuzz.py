"""Fuzzing a live ``kanmoe serve``: schemathesis over its own OpenAPI document, and
Hypothesis-built requests sent over real HTTP (random shapes, ranks, dtypes, extreme values,
unicode and duplicate feature names, binary headers that lie about sizes).

The rule every case checks: the answer is a 4xx with an ``{"error": ...}`` body, or a 200
equal to what ONNX Runtime computes from the same numbers; never a 5xx, never a hang (every
call has a client timeout). Runs are derandomized, so CI sees the same cases every time.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.serving import DEFAULT_MODEL, DEFAULT_REPOSITORY, copy_repository, start_server

MODEL_FILE = DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "model.onnx"
FEATURES: list[str] = json.loads((MODEL_FILE.parent / "kanmoe.json").read_text())["feature_names"]
N_FEATURES = len(FEATURES)
MAX_ROWS = 4096  # the server's default KANMOE_MAX_REQUEST_ROWS
TIMEOUT = 10.0  # a request that takes longer than this is a hang
V2_TYPES = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES", "BF16",
]  # fmt: skip

# CI budget; `make test-reliability` raises both (the long run).
EXAMPLES = int(os.environ.get("KANMOE_FUZZ_EXAMPLES", "60"))
SCHEMATHESIS_EXAMPLES = int(os.environ.get("KANMOE_SCHEMATHESIS_EXAMPLES", "42"))  # per operation
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its request
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def reference():
    session = ort.InferenceSession(str(MODEL_FILE), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        out, gates = session.run(["output", "gate_weights"], {"input": x})
        return {"output": out, "gate_weights": gates}

    return run


@pytest.fixture(scope="module")
def client(default_server):
    with httpx.Client(base_url=default_server.url, timeout=TIMEOUT) as c:
        yield c


def _is_refusal(response: httpx.Response) -> bool:
    """A 4xx whose body is the service's one-line ``{"error": "..."}``."""
    if not 400 <= response.status_code < 500:
        return False
    body = response.json()
    return isinstance(body.get("error"), str) and bool(body["error"])


def _finite_float32(values: Any) -> np.ndarray | None:
    """``values`` as the float32 array the model would see, or None when that is not possible."""
    try:
        x = np.array(values)
    except (ValueError, TypeError, OverflowError):
        return None
    if x.dtype.kind not in "iuf":
        return None
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    return x if np.isfinite(x).all() else None


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name, expected in want.items():
        np.testing.assert_allclose(
            got[name], expected, rtol=1e-5, atol=1e-5, equal_nan=True, err_msg=name
        )


def _v2_outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    """Decode a v2 answer, JSON ``data`` (NaN arrives as null) or binary blobs."""
    header_length = response.headers.get("inference-header-content-length")
    raw = response.content
    doc = orjson.loads(raw if header_length is None else raw[: int(header_length)])
    offset = len(raw) if header_length is None else int(header_length)
    arrays = {}
    for entry in doc["outputs"]:
        assert entry["datatype"] == "FP32"
        if "data" in entry:
            flat = np.array([math.nan if v is None else v for v in entry["data"]], np.float32)
        else:
            size = entry["parameters"]["binary_data_size"]
            flat = np.frombuffer(raw[offset : offset + size], "<f4")
            offset += size
        arrays[entry["name"]] = flat.reshape(entry["shape"])
    assert offset == len(raw), "bytes after the last blob"
    return arrays


# --------------------------------------------------------------------------- schemathesis

# Requests valid by the schema may still have the wrong width for a given model: acceptance
# of schema-valid data is not a property of predict/infer (every other check still applies).
MODEL_SPECIFIC = ("predict", "infer")


@pytest.fixture(scope="module")
def private_server(tmp_path_factory):
    """Its own repository copy: schemathesis may unload and reload the model."""
    server = start_server(copy_repository(tmp_path_factory.mktemp("fuzz") / "repo"))
    yield server
    server.stop()


def _schemathesis_operation(op: Any, url: str, counts: Counter, failures: dict) -> None:
    excluded = [positive_data_acceptance] if op.label.endswith(MODEL_SPECIFIC) else []
    cases = st.one_of([op.as_strategy(generation_mode=m) for m in schemathesis.GenerationMode])

    @settings(FUZZ, max_examples=SCHEMATHESIS_EXAMPLES)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(cases)
        # Random names only ever reach the 404 branch; half the cases use the real model.
        if "name" in case.path_parameters and data.draw(st.booleans()):
            case.path_parameters["name"] = DEFAULT_MODEL
            if "version" in case.path_parameters:
                case.path_parameters["version"] = data.draw(st.sampled_from(["1", "01", "2"]))
        try:
            response = case.call_and_validate(
                base_url=url, timeout=TIMEOUT, excluded_checks=excluded
            )
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis reports a FailureGroup
            failures.setdefault((op.label, type(exc).__name__), f"{op.label}: {exc}"[:3000])
            return
        counts[(op.label, response.status_code)] += 1

    run()


@pytest.mark.slow
def test_every_operation_conforms_to_the_openapi_document(private_server):
    """>= 500 schemathesis cases over every v1 and v2 operation: no 5xx, every answer's
    status, content type, headers and body as documented."""
    doc = httpx.get(private_server.url + "/openapi.json", timeout=TIMEOUT).json()
    schema = schemathesis.openapi.from_dict(doc)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    documented = {
        f"{method.upper()} {path}"
        for path, ops in doc["paths"].items()
        for method in ops
        if path.startswith(("/v1", "/v2"))
    }
    assert len(documented) >= 18 and documented <= labels
    counts: Counter = Counter()
    failures: dict = {}
    for op in operations:
        _schemathesis_operation(op, private_server.url, counts, failures)
    print(f"schemathesis: {sum(counts.values())} cases over {len(labels)} operations: {counts}")
    assert not failures, "\n\n".join(failures.values())
    per_operation = Counter(label for label, _ in counts.elements())
    assert set(per_operation) == labels, labels - set(per_operation)
    assert sum(counts.values()) >= 500, counts
    assert not [key for key in counts if key[1] >= 500]
    # Reached past the 404s: real answers from the model routes, not only refusals.
    assert counts[("GET /v2/models/{name}", 200)] and counts[("POST /v2/repository/index", 200)]
    # Still healthy (after any unload the fuzzer did, one load brings the model back).
    load = httpx.post(f"{private_server.url}/v2/repository/models/{DEFAULT_MODEL}/load")
    assert load.status_code == 200, load.text
    ready = httpx.get(private_server.url + "/v2/health/ready", timeout=TIMEOUT)
    assert ready.status_code == 200, ready.text


def test_the_openapi_document_is_self_contained_and_matches_the_bodies(client):
    """Regression: inlined request schemas had '#/$defs/...' refs that resolve nowhere, and
    the health routes documented a JSON body they never send."""
    doc = client.get("/openapi.json").json()
    assert "#/$defs/" not in json.dumps(doc)
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/{name}/ready"):
        assert "content" not in doc["paths"][path]["get"]["responses"]["200"], path
        assert client.get(path.replace("{name}", DEFAULT_MODEL)).content == b""
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]["responses"]
    assert set(infer["200"]["content"]) == {"application/json", "application/octet-stream"}
    assert infer["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    predict = doc["paths"]["/v1/models/{name}/predict"]["post"]
    body = predict["requestBody"]["content"]["application/json"]["schema"]
    assert {"type": "null"} not in body["properties"]["inputs"].get("anyOf", [])
    null_inputs = client.post(f"/v1/models/{DEFAULT_MODEL}/predict", json={"inputs": None})
    assert null_inputs.status_code == 400  # what the schema now says: null is not allowed


# --------------------------------------------------------------------------- values

# Finite doubles across the whole range (float32 overflow to inf, subnormals, -0.0), ints of
# every size orjson carries, and the odd non-number.
EXTREMES = st.sampled_from(
    [0.0, -0.0, 1e-45, -1e-45, 5e-324, 3.4028235e38, 3.5e38, -3.5e38, 1e300, -1e300, 2**63]
)
NUMBERS = (
    st.floats(-1e4, 1e4, width=32)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-(2**63), 2**64 - 1)
    | EXTREMES
)
MODERATE = st.floats(-1e4, 1e4, width=32) | st.integers(-1000, 1000)
JUNK = st.none() | st.booleans() | st.text(max_size=3) | st.just([1.0]) | st.just({})
VALUES = NUMBERS | JUNK


MUTATIONS = ["datatype", "shape", "rows", "value", "value", "short", "name", "twice", "nested"]


@st.composite
def v2_json_requests(draw: st.DrawFn) -> tuple[dict, str, list[int], list]:
    """A valid one-input request, then up to three mutations (some of which keep it valid)."""
    shape = [draw(st.integers(1, 5)), N_FEATURES]
    values: list = draw(
        st.lists(
            MODERATE,
            min_size=shape[0] * N_FEATURES,
            max_size=shape[0] * N_FEATURES,
        )
    )
    datatype, name, twice, nested = "FP32", "input", False, False
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        if mutation == "datatype":
            datatype = draw(st.sampled_from([*V2_TYPES, "fp32", "FLOAT", ""]))
        elif mutation in ("shape", "rows"):
            if mutation == "shape":
                shape = draw(st.lists(st.integers(0, 9), max_size=4))
            else:
                shape = [draw(st.sampled_from([0, MAX_ROWS, MAX_ROWS + 1])), N_FEATURES]
            count = math.prod(shape)
            values = [values[k % len(values)] for k in range(count)] if values else []
        elif mutation == "value" and values:
            k = draw(st.integers(0, len(values) - 1))
            values[k] = draw(NUMBERS | JUNK | st.floats(allow_nan=True, allow_infinity=True))
        elif mutation == "short" and values:
            values = values[:-1]
        elif mutation == "name":
            name = draw(st.sampled_from(["Input", "", "input\u0301", "input "]))
        elif mutation == "twice":
            twice = True
        elif mutation == "nested":
            nested = True
    data: list = values
    if nested and len(shape) >= 2 and shape[-1] and len(values) == math.prod(shape):
        data = [values[k : k + shape[-1]] for k in range(0, len(values), shape[-1])]
    tensor = {"name": name, "datatype": datatype, "shape": shape, "data": data}
    body: dict[str, Any] = {"inputs": [tensor, dict(tensor)] if twice else [tensor]}
    if draw(st.booleans()):
        body["parameters"] = {"binary_data_output": draw(st.booleans())}
    return body, datatype, shape, values


def test_v2_json_tensors_get_a_4xx_or_the_models_answer(client, reference):
    seen: Counter = Counter()

    @FUZZ
    @given(v2_json_requests())
    def check(case):
        body, datatype, shape, values = case
        response = client.post(f"/v2/models/{DEFAULT_MODEL}/infer", content=orjson.dumps(body))
        tensor = body["inputs"][0]
        x = _finite_float32(values)
        valid = (
            len(body["inputs"]) == 1
            and tensor["name"] == "input"
            and datatype == "FP32"
            and len(shape) == 2
            and 1 <= shape[0] <= MAX_ROWS
            and shape[1] == N_FEATURES
            and x is not None
            and x.size == math.prod(shape)
            and all(type(v) in (int, float) for v in values)
        )
        if not valid:
            assert _is_refusal(response), (response.status_code, response.text[:300])
            seen[response.status_code // 100] += 1
            return
        assert response.status_code == 200, response.text[:300]
        _assert_same(_v2_outputs(response), reference(x.reshape(shape)))
        seen[2] += 1

    check()
    assert seen[2] >= 5 and seen[4] >= 5, seen  # both branches were reached


@st.composite
def v2_binary_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str], np.ndarray, str | None]:
    rows = draw(st.integers(1, 6))
    values = draw(
        st.lists(
            st.floats(width=32, allow_nan=False, allow_infinity=False),
            min_size=rows * N_FEATURES,
            max_size=rows * N_FEATURES,
        )
    )
    x = np.array(values, np.float32).reshape(rows, N_FEATURES)
    lie = draw(
        st.sampled_from(
            [None, None, None, "size", "header", "shape", "trailing", "truncated", "dtype", "nan"]
        )
    )
    blob = x.tobytes()
    size, shape, datatype = len(blob), [rows, N_FEATURES], "FP32"
    if lie == "size":
        size += draw(st.sampled_from([-4, -1, 1, 4, 10**12, -(10**6)]))
    elif lie == "shape":
        shape = draw(st.sampled_from([[rows, N_FEATURES + 1], [rows * 2, N_FEATURES], [rows]]))
    elif lie == "dtype":
        datatype = draw(st.sampled_from(["FP64", "FP16", "INT32", "UINT8"]))
    elif lie == "nan":
        x = x.copy()
        x[draw(st.integers(0, rows - 1)), draw(st.integers(0, N_FEATURES - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
        blob = x.tobytes()
    binary_out = draw(st.booleans())
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": size},
                }
            ],
            "parameters": {"binary_data_output": binary_out},
        }
    )
    body = header + blob
    header_length = len(header)
    if lie == "header":
        header_length += draw(st.sampled_from([-1, 1, 7, -len(header), 10**6]))
    elif lie == "trailing":
        body += draw(st.binary(min_size=1, max_size=9))
    elif lie == "truncated":
        body = body[: len(body) - draw(st.integers(1, len(blob)))]
    headers = {
        "inference-header-content-length": str(header_length),
        "content-type": "application/octet-stream",
    }
    return body, headers, x, lie


def test_v2_binary_headers_that_lie_get_a_4xx(client, reference):
    seen: Counter = Counter()

    @FUZZ
    @given(v2_binary_requests())
    def check(case):
        body, headers, x, lie = case
        response = client.post(f"/v2/models/{DEFAULT_MODEL}/infer", content=body, headers=headers)
        if lie is not None:
            assert _is_refusal(response), (lie, response.status_code, response.text[:300])
            seen[response.status_code // 100] += 1
            return
        assert response.status_code == 200, response.text[:300]
        _assert_same(_v2_outputs(response), reference(x))
        seen[2] += 1

    check()
    assert seen[2] >= 5 and seen[4] >= 5, seen  # both branches were reached


# Feature names: the real ones, near misses, unicode (combining marks, RTL, emoji, NUL) and
# lone surrogates, which cannot be encoded as UTF-8 and so make the body invalid JSON text.
NAMES = (
    st.sampled_from(FEATURES)
    | st.sampled_from(["medinc", "MedInc ", "MedInc\u0000", "Me\u0301dInc", "\u202eMedInc", "💥"])
    | st.text(max_size=6)
)


@st.composite
def v1_instances(draw: st.DrawFn) -> bytes:
    """Raw JSON text (duplicate keys are legal JSON text), usually close to a valid request."""
    objects = []
    for _ in range(draw(st.integers(1, 4))):
        pairs = [(name, draw(st.floats(-10, 10, width=32))) for name in FEATURES]
        for _ in range(draw(st.integers(0, 3))):
            action = draw(st.sampled_from(["duplicate", "add", "drop", "value"]))
            if action == "duplicate":
                pairs.append((draw(st.sampled_from(FEATURES)), draw(VALUES)))
            elif action == "add":
                pairs.append((draw(NAMES), draw(VALUES)))
            elif action == "drop" and pairs:
                pairs.pop(draw(st.integers(0, len(pairs) - 1)))
            elif pairs:
                i = draw(st.integers(0, len(pairs) - 1))
                pairs[i] = (pairs[i][0], draw(VALUES))
        pairs = draw(st.permutations(pairs))
        members = ",".join(
            f"{json.dumps(k, ensure_ascii=draw(st.booleans()))}:{json.dumps(v)}" for k, v in pairs
        )
        objects.append("{" + members + "}")
    return ('{"instances":[' + ",".join(objects) + "]}").encode("utf-8", "surrogatepass")


def test_v1_unicode_and_duplicate_feature_names_get_a_4xx_or_the_answer(client, reference):
    seen: Counter = Counter()

    @FUZZ
    @given(v1_instances())
    def check(body):
        response = client.post(f"/v1/models/{DEFAULT_MODEL}/predict", content=body)
        try:
            payload = orjson.loads(body)  # JSON text semantics: the last duplicate wins
        except orjson.JSONDecodeError:
            payload = None
        rows = payload["instances"] if payload else []
        valid = bool(rows) and all(set(row) == set(FEATURES) for row in rows)
        values = [[row[f] for f in FEATURES] for row in rows] if valid else None
        x = _finite_float32(values) if valid else None
        if x is None or not all(type(v) in (int, float) for row in values for v in row):
            assert _is_refusal(response), (response.status_code, response.text[:300])
            seen[response.status_code // 100] += 1
            return
        assert response.status_code == 200, response.text[:300]
        got = response.json()
        want = reference(x)
        np.testing.assert_allclose(got["predictions"], want["output"][:, 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["gate_weights"]["moe"], want["gate_weights"], atol=1e-5)
        seen[2] += 1

    check()
    assert seen[2] >= 5 and seen[4] >= 5, seen  # both branches were reached


def _nested(draw: st.DrawFn, shape: list[int]) -> Any:
    if not shape:
        return draw(NUMBERS if draw(st.integers(0, 9)) == 0 else MODERATE)
    return [_nested(draw, shape[1:]) for _ in range(shape[0])]


@st.composite
def v1_inputs(draw: st.DrawFn) -> Any:
    """Rows of any rank and size; sometimes ragged, sometimes holding one non-number."""
    shape = draw(
        st.just([draw(st.integers(1, 4)), N_FEATURES]) | st.lists(st.integers(0, 9), max_size=4)
    )
    if math.prod(shape) > 2000:
        shape = [2, N_FEATURES]
    data = _nested(draw, shape)
    if isinstance(data, list) and len(data) > 1 and draw(st.integers(0, 5)) == 0:
        data[-1] = data[-1][:-1] if isinstance(data[-1], list) else [data[-1]]  # ragged
    elif len(shape) == 2 and all(shape) and draw(st.integers(0, 3)) == 0:
        data[draw(st.integers(0, shape[0] - 1))][draw(st.integers(0, shape[1] - 1))] = draw(JUNK)
    return data


def test_v1_inputs_of_any_rank_get_a_4xx_or_the_answer(client, reference):
    seen: Counter = Counter()

    @FUZZ
    @given(v1_inputs())
    def check(data):
        response = client.post(f"/v1/models/{DEFAULT_MODEL}/predict", json={"inputs": data})
        x = _finite_float32(data)
        flat = np.array(data, dtype=object).ravel().tolist() if x is not None else []
        if (
            x is None
            or x.ndim != 2
            or x.shape[1] != N_FEATURES
            or not 1 <= x.shape[0] <= MAX_ROWS
            or any(type(v) is bool for v in flat)
        ):
            assert _is_refusal(response), (response.status_code, response.text[:300])
            seen[response.status_code // 100] += 1
            return
        assert response.status_code == 200, response.text[:300]
        want = reference(x)
        np.testing.assert_allclose(response.json()["predictions"], want["output"][:, 0], rtol=1e-5)
        seen[2] += 1

    check()
    assert seen[2] >= 5 and seen[4] >= 5, seen  # both branches were reached


ONES = ",".join(["1"] * (N_FEATURES - 1))
RAW_V1 = {
    # JSON text no Python float can carry: past double range, underflow, 2**65, deep nesting
    "past double range": (f'{{"inputs": [[1e400,{ONES}]]}}', 400, None),
    "5000 digits": (f'{{"inputs": [[{"9" * 5000},{ONES}]]}}', 400, None),
    "underflow to zero": (f'{{"inputs": [[1e-400,{ONES}]]}}', 200, 0.0),
    "2**65": (f'{{"inputs": [[{2**65},{ONES}]]}}', 200, float(2**65)),
    "nested 100000 deep": ('{"inputs": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, None),
}


@pytest.mark.parametrize("case", list(RAW_V1))
def test_number_and_nesting_extremes_in_json_text(client, reference, case):
    text, status, first = RAW_V1[case]
    response = client.post(f"/v1/models/{DEFAULT_MODEL}/predict", content=text.encode())
    assert response.status_code == status, response.text[:300]
    if status != 200:
        assert _is_refusal(response)
        return
    x = np.array([[first] + [1.0] * (N_FEATURES - 1)], np.float32)
    want = reference(x)["output"][:, 0]
    np.testing.assert_allclose(response.json()["predictions"], want, rtol=1e-5, atol=1e-6)


def test_booleans_beside_numbers_are_refused_not_read_as_one(client):
    """Regression (found by the test above): numpy turned [1.0, true, ...] into 1.0s."""
    row = [1.5, True, 2, 1.0, 300.0, 2.5, 37.0, -122.0]
    instance = dict(zip(FEATURES, row, strict=True))
    for body in ({"inputs": [row]}, {"instances": [instance]}):
        r = client.post(f"/v1/models/{DEFAULT_MODEL}/predict", json=body)
        assert r.status_code == 400 and "booleans are not numbers" in r.json()["error"], r.text
    row[1] = 1
    ok = client.post(f"/v1/models/{DEFAULT_MODEL}/predict", json={"inputs": [row]})
    assert ok.status_code == 200, ok.text


ROUTES = st.sampled_from(
    [
        f"/v1/models/{DEFAULT_MODEL}/predict",
        f"/v1/models/{DEFAULT_MODEL}/versions/1/predict",
        f"/v2/models/{DEFAULT_MODEL}/infer",
        f"/v2/models/{DEFAULT_MODEL}/versions/1/infer",
        f"/v2/models/{DEFAULT_MODEL}/versions/7/infer",
        "/v2/models/%F0%9F%92%A5/infer",
        "/v1/models/x/versions/-1/predict",
    ]
)
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=12)


@FUZZ
@given(
    ROUTES,
    st.binary(max_size=400) | st.sampled_from([b"{}", b"[]", b"null", b'{"inputs":[]}']),
    st.dictionaries(
        st.sampled_from(
            [
                "content-type",
                "content-encoding",
                "inference-header-content-length",
                "accept-encoding",
            ]
        ),
        HEADER_TEXT | st.sampled_from(["gzip", "deflate", "application/json", "-1", "99999999"]),
    ),
)
def test_random_bytes_and_headers_never_get_a_5xx(client, route, body, headers):
    raw = {k: v.strip().encode("latin-1") for k, v in headers.items()}  # bytes 128-255 too
    try:
        response = client.post(route, content=body, headers=raw)
    except httpx.LocalProtocolError:  # a header value HTTP cannot carry at all
        reject()
    if response.text == "Invalid HTTP request received.":  # e.g. DEL in a header value:
        assert response.status_code == 400  # uvicorn's parser refused it before the app
        return
    assert _is_refusal(response) or response.status_code == 200, (
        response.status_code,
        response.text[:300],
    )


def test_the_server_is_still_healthy_after_the_fuzzing(client, default_server):
    assert client.get("/v2/health/ready").status_code == 200
    assert default_server.process.poll() is None
    assert "Traceback" not in default_server.log() and "unexpected error" not in (
        default_server.log()
    )
