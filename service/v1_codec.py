"""The v1 JSON API: named-feature instances or positional inputs in, predictions and gates out.

Request: ``{"instances": [{"MedInc": 8.3, ...}, ...]}`` or ``{"inputs": [[...], ...]}``.
Sequence models take one window per instance: ``{"inputs": [[[step features] x seq_len]]}``
or named features each holding ``seq_len`` values. Values are raw, in training units.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any

import numpy as np
import orjson

from kanmoe.service.errors import ServiceError, bad_request
from kanmoe.service.model_spec import OUTPUT_NAME, ModelSpec


def parse_json(body: bytes) -> Any:
    if not body:
        raise bad_request("empty request body; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"malformed JSON: {exc}") from None


def numeric_array(data: Any, where: str) -> np.ndarray:
    """``data`` as a float32 array; rejects strings, booleans, nulls and ragged lists."""
    try:
        arr = np.array(data)
    except (ValueError, TypeError):
        raise bad_request(f"{where}: rows have different lengths (ragged)") from None
    if arr.dtype.kind not in "iuf":
        if arr.dtype.kind == "b":
            raise bad_request(f"{where}: booleans are not numbers")
        raise bad_request(f"{where}: every value must be a number")
    if _holds_bool(data, arr.ndim):  # numpy reads true as 1 beside numbers: refuse it too
        raise bad_request(f"{where}: booleans are not numbers")
    with np.errstate(over="ignore"):
        return arr.astype(np.float32)


def _holds_bool(data: Any, ndim: int) -> bool:
    """Whether the rectangular nested list ``data`` (``ndim`` deep) holds a JSON boolean."""
    flat: Any = [data] if ndim == 0 else data
    for _ in range(ndim - 1):
        flat = chain.from_iterable(flat)
    return bool in set(map(type, flat))


def check_finite(x: np.ndarray, spec: ModelSpec, where: str) -> None:
    """400 naming the first row and feature holding NaN or ±Inf (also float32 overflow)."""
    if x.size <= 64:  # a few rows: Python floats beat two numpy calls
        if all(map(math.isfinite, x.ravel().tolist())):
            return
    elif np.isfinite(x).all():
        return
    finite = np.isfinite(x)
    bad = np.argwhere(~finite)[0]
    row, feature = int(bad[0]), spec.feature_names[int(bad[-1])]
    raise bad_request(
        f"{where}[{row}] feature {feature!r} is not finite ({x[tuple(bad)]}); "
        "values must be finite float32 numbers"
    )


def check_shape(x: np.ndarray, spec: ModelSpec, where: str, max_rows: int) -> np.ndarray:
    if x.ndim == 0 or x.shape[0] == 0:
        raise bad_request(f"{where}: empty batch; send at least one row")
    if x.shape[0] > max_rows:
        raise ServiceError(413, f"{where}: {x.shape[0]} rows, more than the limit of {max_rows}")
    if spec.is_sequence:
        if x.ndim != 3 or x.shape[2] != spec.n_features or x.shape[1] < 1:
            raise bad_request(
                f"{where}: expected shape [rows, steps, {spec.n_features}] (one window of "
                f"{spec.seq_len} steps per row), got {list(x.shape)}"
            )
    elif x.ndim != 2 or x.shape[1] != spec.n_features:
        raise bad_request(
            f"{where}: expected shape [rows, {spec.n_features}] "
            f"({', '.join(spec.feature_names)}), got {list(x.shape)}"
        )
    return x


def _from_instances(instances: Any, spec: ModelSpec) -> np.ndarray:
    if not isinstance(instances, list):
        raise bad_request("'instances' must be a list of objects keyed by feature name")
    if not instances:
        raise bad_request("instances: empty batch; send at least one row")
    names = spec.feature_names
    wanted = set(names)
    rows = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise bad_request(f"instances[{i}] must be an object keyed by feature name")
        if inst.keys() != wanted:
            missing = [n for n in names if n not in inst]
            unknown = sorted(set(inst) - wanted)
            parts = []
            if missing:
                parts.append(f"missing features {missing}")
            if unknown:
                parts.append(f"unknown features {unknown}")
            raise bad_request(f"instances[{i}]: {'; '.join(parts)}; expected {list(names)}")
        rows.append([inst[n] for n in names])
    x = numeric_array(rows, "instances")
    if spec.is_sequence and x.ndim == 3:
        x = np.ascontiguousarray(x.transpose(0, 2, 1))  # (rows, features, steps) -> steps first
    return x


def parse_v1_request(body: bytes, spec: ModelSpec, max_rows: int) -> tuple[np.ndarray, bool]:
    """(float32 rows, explain flag) from a v1 body, or a ServiceError naming the problem."""
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise bad_request("the body must be a JSON object with 'instances' or 'inputs'")
    unknown = set(payload) - {"instances", "inputs", "explain"}
    if unknown:
        raise bad_request(
            f"unknown keys {sorted(unknown)}; use 'instances' or 'inputs' (and 'explain')"
        )
    explain = payload.get("explain", False)
    if not isinstance(explain, bool):
        raise bad_request("'explain' must be true or false")
    if ("instances" in payload) == ("inputs" in payload):
        raise bad_request("send exactly one of 'instances' (named features) or 'inputs' (rows)")
    if "instances" in payload:
        where = "instances"
        x = _from_instances(payload["instances"], spec)
    else:
        where = "inputs"
        if not isinstance(payload["inputs"], list):
            raise bad_request("'inputs' must be a list of rows")
        x = numeric_array(payload["inputs"], where)
    x = check_shape(x, spec, where, max_rows)
    check_finite(x, spec, where)
    return x, explain


def explanation(spec: ModelSpec, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Each expert's own prediction and its share of the row's prediction, raw target units.

    ``contributions[e] = gate_e * (expert_e - offset)``, so ``offset + sum(contributions)``
    is the prediction (to float32 rounding). Single-target models drop the target axis.
    """
    info = spec.explain
    assert info is not None
    experts = outputs[info.output]  # (rows, E, targets)
    weights = outputs[spec.gate_output(info.layer)]  # (rows, E)
    if spec.n_targets == 1:
        offset: Any = info.offset[0]
        predictions = experts[:, :, 0].tolist()
        if experts.size <= 64:  # a few rows: Python floats (float64 too) beat numpy's calls
            contributions = [
                [w * (e - offset) for w, e in zip(wr, er, strict=True)]
                for wr, er in zip(weights.tolist(), predictions, strict=True)
            ]
        else:
            wide = experts[:, :, 0].astype(np.float64)
            contributions = (weights.astype(np.float64) * (wide - offset)).tolist()
    else:
        offset = list(info.offset)
        wide = experts.astype(np.float64)
        predictions = experts.tolist()
        shares = weights.astype(np.float64)[:, :, None] * (wide - np.asarray(offset))
        contributions = shares.tolist()
    return {
        "layer": info.layer,
        "offset": offset,
        "expert_predictions": predictions,
        "contributions": contributions,
    }


def encode_v1_response(
    spec: ModelSpec, version: str, outputs: dict[str, np.ndarray], explain: bool = False
) -> bytes:
    pred = outputs[OUTPUT_NAME]
    predictions = pred[:, 0].tolist() if spec.n_targets == 1 else pred.tolist()
    gates: dict[str, Any] = {}
    for g in spec.gates:
        w = outputs[g.output]
        gates[g.layer] = (w[:, -1, :] if w.ndim == 3 else w).tolist()
    body = {
        "model": spec.name,
        "version": version,
        "targets": list(spec.target_names),
        "predictions": predictions,
        "gate_weights": gates,
        "experts": {g.layer: list(g.experts) for g in spec.gates},
    }
    if explain:
        body["explanation"] = explanation(spec, outputs)
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
