"""Open Inference Protocol v2 (KServe/Triton) infer codec: request bytes -> arrays -> response.

A request body is ``<JSON header><blob input0><blob input1>...``: the JSON lists the inputs
(``name``, ``datatype``, ``shape`` and either ``data``, a flat or nested list, or
``parameters.binary_data_size``, the byte length of that input's raw little-endian blob).
The ``Inference-Header-Content-Length`` header gives the JSON's byte length; without it the
whole body is JSON. A ``Content-Encoding`` of gzip or deflate covers the whole body, and the
header length counts the *decompressed* JSON. Responses mirror this: each output is either
JSON ``data`` or a blob, blobs follow the JSON in the order of its ``outputs`` list (the
client finds them by walking that list), and the header length is again the uncompressed
JSON length.

The codec is pure (no HTTP framework): the route hands it bytes and header values and maps
``ProtocolError.status`` to the response code, so every client mistake becomes one
``{"error": ...}`` line. It runs once per request on the hot path, so numeric data never
goes through a per-element Python loop: JSON lists are type-checked with ``set(map(type, ...))``
and converted by ``np.array(..., dtype)``; blobs become ``np.frombuffer`` views.
"""

from __future__ import annotations

import gzip
import math
import sys
import zlib
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import orjson

# v2 datatype -> numpy dtype (little-endian, as the binary extension specifies).
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# Valid v2 datatypes this codec refuses: the models take numeric tensors only.
_UNSUPPORTED = ("BYTES", "BF16")
_DATATYPE_OF: dict[np.dtype, str] = {dt.newbyteorder("="): name for name, dt in _DTYPES.items()}

# Python types a JSON ``data`` list may hold, per numpy kind (orjson yields exactly these).
_ALLOWED_SCALARS: dict[str, frozenset[type]] = {
    "f": frozenset((float, int)),
    "i": frozenset((int,)),
    "u": frozenset((int,)),
    "b": frozenset((bool,)),
}
_TYPE_WORDS: dict[type, str] = {
    bool: "a boolean",
    str: "a string",
    type(None): "null",
    dict: "an object",
    list: "a nested list mixed with scalars",
    float: "a non-integer number",
    int: "a number",
}

# dtype byte-order codes that must be swapped to send an array little-endian.
_NOT_LITTLE_ENDIAN = (">", "=") if sys.byteorder == "big" else (">",)
# Level 1 keeps response compression cheap: float tensors barely compress at any level.
COMPRESS_LEVEL = 1
# Below this many bytes a response is sent as is even when the client accepts gzip/deflate
# (the aio client always does); compressing ~200 bytes costs more than it saves.
COMPRESS_MIN_BYTES = 512


class ProtocolError(Exception):
    """A malformed or unsupported v2 request; ``status`` is the HTTP code, ``message`` one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class RequestedOutput:
    """One entry of the request's ``outputs``: which tensor, and whether to send it as a blob."""

    name: str
    binary: bool


@dataclass(slots=True)
class InferRequest:
    """A decoded infer request. Arrays from blobs are read-only views over the request body."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None  # None: every model output
    binary_default: bool  # parameters.binary_data_output
    parameters: dict[str, Any]


def error_body(message: str) -> bytes:
    """The v2 error body ``{"error": message}``, the shape tritonclient turns into its message."""
    return orjson.dumps({"error": message})


def _short(value: Any, limit: int = 60) -> str:
    """repr() of a client-supplied value, cut so that a hostile name cannot flood the log."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- decompression


def _inflate(data: bytes, wbits: int, limit: int, what: str) -> bytes:
    """Decompress one zlib/gzip/raw-deflate stream (gzip: all members), never past ``limit``."""
    parts: list[bytes] = []
    size = 0
    while True:
        d = zlib.decompressobj(wbits)
        chunk = d.decompress(data, limit - size + 1)
        size += len(chunk)
        if size > limit:
            raise ProtocolError(
                413, f"decompressed request body exceeds the limit of {limit} bytes"
            )
        parts.append(chunk)
        if not d.eof:
            raise ProtocolError(400, f"request body is truncated {what} data")
        data = d.unused_data
        if not data:
            return b"".join(parts)
        if wbits != 16 + zlib.MAX_WBITS:
            raise ProtocolError(400, f"request body has trailing bytes after the {what} stream")


def _decompress(body: bytes, content_encoding: str, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (codings listed in the order they were applied)."""
    for coding in reversed([c.strip().lower() for c in content_encoding.split(",")]):
        try:
            if coding in ("", "identity"):
                continue
            if coding in ("gzip", "x-gzip"):
                body = _inflate(body, 16 + zlib.MAX_WBITS, limit, "gzip")
            elif coding == "deflate":
                try:
                    body = _inflate(body, zlib.MAX_WBITS, limit, "deflate")
                except zlib.error:  # some clients send raw deflate without the zlib wrapper
                    body = _inflate(body, -zlib.MAX_WBITS, limit, "deflate")
            else:
                raise ProtocolError(
                    415, f"unsupported Content-Encoding {_short(coding)}; use gzip or deflate"
                )
        except zlib.error as exc:
            raise ProtocolError(400, f"request body is not valid {coding} data: {exc}") from None
    return body


# --------------------------------------------------------------------------- request


def decode_infer_request(
    body: bytes,
    header_length: str | None,
    content_encoding: str | None,
    max_body_bytes: int,
) -> InferRequest:
    """Decode a v2 infer body into arrays of their declared shape and dtype.

    ``header_length`` and ``content_encoding`` are the raw header values (None when absent).
    Raises ProtocolError (400 malformed, 413 too large, 415 unknown encoding) for any bad input.
    NaN/Inf are passed through: finiteness is the model layer's check.
    """
    if len(body) > max_body_bytes:
        raise ProtocolError(413, f"request body exceeds the limit of {max_body_bytes} bytes")
    if content_encoding:
        body = _decompress(body, content_encoding, max_body_bytes)
    view = memoryview(body)
    if header_length is None:
        json_part, blobs = view, view[:0]
    else:
        text = header_length.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 20):
            raise ProtocolError(
                400, f"Inference-Header-Content-Length {_short(header_length)} is not an integer"
            )
        n = int(text)
        if not 0 < n <= len(body):
            raise ProtocolError(
                400,
                f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes",
            )
        json_part, blobs = view[:n], view[n:]
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(400, f"request JSON is invalid: {exc}") from None
    if type(doc) is not dict:
        raise ProtocolError(400, "request JSON must be an object with an 'inputs' list")

    request_id = doc.get("id")
    if request_id is not None and type(request_id) is not str:
        raise ProtocolError(400, "id must be a string")
    parameters = doc.get("parameters", {})
    if type(parameters) is not dict:
        raise ProtocolError(400, "parameters must be an object")
    binary_default = parameters.get("binary_data_output", False)
    if type(binary_default) is not bool:
        raise ProtocolError(400, "parameters.binary_data_output must be true or false")

    inputs = _decode_inputs(doc.get("inputs"), blobs, header_length is not None)
    outputs = _decode_outputs(doc.get("outputs"), binary_default)
    return InferRequest(request_id, inputs, outputs, binary_default, parameters)


def _where(i: int, name: str) -> str:
    """How messages name an input: its position and its name (built only on the error path)."""
    return f"inputs[{i}] {_short(name)}"


def _decode_inputs(entries: Any, blobs: memoryview, has_header: bool) -> dict[str, np.ndarray]:
    if type(entries) is not list or not entries:
        raise ProtocolError(400, "inputs must be a non-empty list")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for i, entry in enumerate(entries):
        if type(entry) is not dict:
            raise ProtocolError(400, f"inputs[{i}] must be an object")
        name = entry.get("name")
        if type(name) is not str:
            raise ProtocolError(400, f"inputs[{i}].name must be a string")
        if name in arrays:
            raise ProtocolError(400, f"{_where(i, name)}: duplicate input name")
        dtype = _dtype(entry.get("datatype"), i, name)
        shape = entry.get("shape")
        if (
            type(shape) is not list
            or not set(map(type, shape)) <= {int}
            or min(shape, default=0) < 0
        ):
            raise ProtocolError(
                400, f"{_where(i, name)}: shape must be a list of non-negative integers"
            )
        count = math.prod(shape)
        params = entry.get("parameters")
        if params is not None and type(params) is not dict:
            raise ProtocolError(400, f"{_where(i, name)}: parameters must be an object")
        size = params.get("binary_data_size") if params else None
        if size is None:
            arrays[name] = _from_json(entry.get("data"), dtype, shape, count, i, name)
            continue
        where = _where(i, name)
        if "data" in entry:
            raise ProtocolError(400, f"{where} has both data and parameters.binary_data_size")
        if type(size) is not int or size < 0:
            raise ProtocolError(
                400, f"{where}: parameters.binary_data_size must be a non-negative integer"
            )
        if not has_header:
            raise ProtocolError(
                400,
                f"{where} has binary_data_size but the request has no "
                "Inference-Header-Content-Length header",
            )
        if size != count * dtype.itemsize:
            raise ProtocolError(
                400,
                f"{where}: binary_data_size {size} does not match shape {_short(shape)} "
                f"({count} x {dtype.itemsize} bytes = {count * dtype.itemsize})",
            )
        if offset + size > len(blobs):
            raise ProtocolError(
                400,
                f"{where}: binary data runs past the end of the body "
                f"(needs {size} bytes, {len(blobs) - offset} left)",
            )
        blob = blobs[offset : offset + size]
        offset += size
        if dtype.kind == "b":  # any non-zero byte is true; a bool view of byte 2 is not
            flat = np.frombuffer(blob, np.uint8).astype(np.bool_)
        else:
            flat = np.frombuffer(blob, dtype)
        arrays[name] = _reshape(flat, shape, i, name)
    if offset != len(blobs):
        raise ProtocolError(
            400,
            f"{len(blobs) - offset} bytes after the JSON header are not claimed by any "
            f"input's binary_data_size (claimed {offset} of {len(blobs)})",
        )
    return arrays


def _dtype(datatype: Any, i: int, name: str) -> np.dtype:
    dtype = _DTYPES.get(datatype) if type(datatype) is str else None
    if dtype is not None:
        return dtype
    if datatype in _UNSUPPORTED:
        raise ProtocolError(
            400,
            f"{_where(i, name)}: datatype {datatype} is not supported by this model "
            "(it takes numeric tensors, e.g. FP32)",
        )
    raise ProtocolError(
        400,
        f"{_where(i, name)}: datatype {_short(datatype)} is not a v2 datatype "
        f"({', '.join([*_DTYPES, *_UNSUPPORTED])})",
    )


def _from_json(
    data: Any, dtype: np.dtype, shape: list[int], count: int, i: int, name: str
) -> np.ndarray:
    """A JSON ``data`` list (flat, or nested and rectangular) as an array of ``shape``."""
    if type(data) is not list:
        raise ProtocolError(
            400, f"{_where(i, name)} needs data (a list) or parameters.binary_data_size"
        )
    flat = data
    while flat and type(flat[0]) is list:
        if set(map(type, flat)) != {list}:
            raise ProtocolError(400, f"{_where(i, name)}: data mixes nested lists and scalars")
        if len(set(map(len, flat))) != 1:
            raise ProtocolError(400, f"{_where(i, name)}: data is a ragged nested list")
        flat = list(chain.from_iterable(flat))
    if len(flat) != count:
        raise ProtocolError(
            400,
            f"{_where(i, name)}: shape {_short(shape)} does not match data of {len(flat)} elements",
        )
    bad = set(map(type, flat)) - _ALLOWED_SCALARS[dtype.kind]
    if bad:
        word = min(_TYPE_WORDS.get(t, t.__name__) for t in bad)
        raise ProtocolError(
            400, f"{_where(i, name)}: data holds {word}, not {_DATATYPE_OF[dtype]} values"
        )
    try:
        array = np.array(flat, dtype=dtype)
    except OverflowError:
        raise ProtocolError(
            400, f"{_where(i, name)}: data holds a value out of range for {_DATATYPE_OF[dtype]}"
        ) from None
    except RuntimeWarning:  # float overflow, only raised when warnings are errors: becomes inf
        with np.errstate(over="ignore"):
            array = np.array(flat, dtype=dtype)
    return _reshape(array, shape, i, name)


def _reshape(flat: np.ndarray, shape: list[int], i: int, name: str) -> np.ndarray:
    """``flat`` in ``shape``; numpy refuses empty shapes like [0, 2**63] or > 64 dims: a 400."""
    try:
        return flat.reshape(shape)
    except ValueError as exc:
        raise ProtocolError(
            400, f"{_where(i, name)}: shape {_short(shape)} is invalid: {exc}"
        ) from None


def _decode_outputs(entries: Any, binary_default: bool) -> list[RequestedOutput] | None:
    if entries is None:
        return None
    if type(entries) is not list:
        raise ProtocolError(400, "outputs must be a list")
    requested: list[RequestedOutput] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"outputs[{i}]"
        if type(entry) is not dict or type(entry.get("name")) is not str:
            raise ProtocolError(400, f"{where} must be an object with a string name")
        name = entry["name"]
        if name in seen:
            raise ProtocolError(400, f"{where}: output {_short(name)} is requested twice")
        seen.add(name)
        params = entry.get("parameters", {})
        if type(params) is not dict:
            raise ProtocolError(400, f"{where}.parameters must be an object")
        binary = params.get("binary_data", binary_default)
        if type(binary) is not bool:
            raise ProtocolError(400, f"{where}.parameters.binary_data must be true or false")
        if params.get("classification") not in (None, 0):
            raise ProtocolError(400, f"{where}: the classification extension is not supported")
        requested.append(RequestedOutput(name, binary))
    return requested


def check_requested_outputs(request: InferRequest, available: list[str]) -> None:
    """Refuse (400) a request for an output the model lacks, before the model runs."""
    if request.outputs is None:
        return
    for output in request.outputs:
        if output.name not in available:
            raise ProtocolError(
                400, f"unknown output {_short(output.name)}; the model has: {', '.join(available)}"
            )


# --------------------------------------------------------------------------- response


def pick_encoding(accept_encoding: str | None) -> str | None:
    """gzip or deflate if ``Accept-Encoding`` allows one (highest q; gzip on ties), else None."""
    if not accept_encoding:
        return None
    q: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, _, rest = item.partition(";")
        weight = 1.0
        rest = rest.strip()
        if rest.startswith(("q=", "Q=")):
            try:
                weight = float(rest[2:])
            except ValueError:
                weight = 0.0
        q[coding.strip().lower()] = weight
    star = q.get("*", 0.0)
    best = max(("gzip", "deflate"), key=lambda c: q.get(c, star))  # max keeps the first on ties
    return best if q.get(best, star) > 0 else None


def encode_infer_response(
    model: str,
    version: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
    order: list[str],
    accept_encoding: str | None,
    *,
    compress_min_bytes: int = COMPRESS_MIN_BYTES,
) -> tuple[bytes, dict[str, str]]:
    """Encode the model's ``outputs`` as the v2 response to ``request``: (body, headers).

    Sends the outputs the request named (in its order), else every name in ``order``; each as a
    blob or as flat JSON ``data`` as requested. Compresses with gzip/deflate when
    ``accept_encoding`` allows it and the body has at least ``compress_min_bytes`` bytes.
    JSON has no NaN/Inf: in ``data`` they become ``null`` (tritonclient reads NaN back);
    blobs carry them exactly.
    """
    if request.outputs is None:
        selected = [(name, request.binary_default) for name in order]
    else:
        selected = [(o.name, o.binary) for o in request.outputs]
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in selected:
        array = outputs.get(name)
        if array is None:
            raise ValueError(f"no array for requested output {name!r}")
        datatype = _DATATYPE_OF.get(array.dtype) or _DATATYPE_OF.get(array.dtype.newbyteorder("="))
        if datatype is None:
            raise ValueError(f"output {name!r} has dtype {array.dtype}, which v2 cannot carry here")
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            if array.dtype.byteorder in _NOT_LITTLE_ENDIAN:
                array = array.astype(array.dtype.newbyteorder("<"))
            blob = array.tobytes()
            blobs.append(blob)
            entry["parameters"] = {"binary_data_size": len(blob)}
        else:
            if not array.dtype.isnative:
                array = array.astype(array.dtype.newbyteorder("="))
            entry["data"] = array.ravel()
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = entries
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    headers: dict[str, str] = {}
    if blobs:
        body = b"".join([header, *blobs])
        headers["content-type"] = "application/octet-stream"
        headers["inference-header-content-length"] = str(len(header))
    else:
        body = header
        headers["content-type"] = "application/json"
    encoding = pick_encoding(accept_encoding) if len(body) >= compress_min_bytes else None
    if encoding == "gzip":
        body = gzip.compress(body, compresslevel=COMPRESS_LEVEL, mtime=0)
        headers["content-encoding"] = "gzip"
    elif encoding == "deflate":
        body = zlib.compress(body, COMPRESS_LEVEL)
        headers["content-encoding"] = "deflate"
    return body, headers
