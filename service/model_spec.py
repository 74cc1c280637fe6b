"""What the service knows about one model version, read from its ``kanmoe.json`` sidecar.

The sidecar is written by ``kanmoe export`` (``kanmoe.export.repository.model_info``). Reading
it needs no torch and no ONNX: the service decides names, shapes, ranges and gate layers
from this file and checks them against the ONNX session when the version loads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

SIDECAR_NAME = "kanmoe.json"
MODEL_FILE_NAME = "model.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class ModelSpecError(ValueError):
    """A version's sidecar is missing, unreadable or inconsistent; the message names it."""


@dataclass(frozen=True)
class GateLayer:
    """One MoE layer's gate: its graph output and the names of its experts, in column order."""

    layer: str
    output: str
    experts: tuple[str, ...]
    # Mean gate weight per expert on the exporter's reference rows (test split); None if absent.
    reference_shares: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Explain:
    """How v1 ``explain`` splits a prediction: ``offset + sum_e gate_e * (expert_e - offset)``.

    ``output`` holds the final MoE layer's per-expert predictions ``(rows, E, targets)`` in
    raw target units, ``layer`` names its gate; ``offset`` is one value per target.
    """

    layer: str
    output: str
    offset: tuple[float, ...]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    feature_names: tuple[str, ...]
    target_names: tuple[str, ...]
    gates: tuple[GateLayer, ...]
    is_sequence: bool = False
    seq_len: int | None = None
    # Raw (unstandardised) training range per feature: (min, max); None if the export lacks it.
    feature_ranges: dict[str, tuple[float, float]] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    kanmoe_version: str = ""
    config_hash: str = ""
    outputs: dict[str, list[int]] = field(default_factory=dict)
    # Per MoE layer: the graph output with each expert's own output (exports since #12).
    expert_outputs: dict[str, str] = field(default_factory=dict)
    explain: Explain | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def n_targets(self) -> int:
        return len(self.target_names)

    @cached_property
    def output_names(self) -> list[str]:
        """Graph outputs in the order the service returns them: prediction first, then gates."""
        names = self.base_output_names
        return names + [n for n in self.outputs if n not in names]

    @cached_property
    def base_output_names(self) -> list[str]:
        """What every run fetches: the prediction and the gates (the metrics read them)."""
        return [OUTPUT_NAME, *(g.output for g in self.gates)]

    def gate_output(self, layer: str) -> str:
        """The graph output holding ``layer``'s gate weights."""
        return next(g.output for g in self.gates if g.layer == layer)

    def explain_unavailable(self) -> str:
        """Why v1 ``explain`` cannot split this model's predictions ("" when it can)."""
        if self.explain is not None:
            return ""
        if not self.gates:
            return "it has no mixture-of-experts layer"
        if not self.expert_outputs:
            return (
                "it was exported without per-expert outputs; re-export it with this kanmoe "
                "(kanmoe export RUN_DIR --force)"
            )
        return (
            "its experts' outputs do not add up to the prediction (log target, or layers "
            "after the last mixture-of-experts layer)"
        )

    def input_shape(self) -> list[int]:
        """v2 metadata shape of ``input`` (-1 for dynamic axes)."""
        if self.is_sequence:
            return [-1, -1, self.n_features]
        return [-1, self.n_features]

    def output_shape(self, name: str) -> list[int]:
        dims = self.outputs.get(name)
        if dims is None:
            raise KeyError(name)
        return [-1, *dims]


def _names(info: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    value = info.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ModelSpecError(f"{path}: '{key}' must be a non-empty list of strings")
    if len(set(value)) != len(value):
        raise ModelSpecError(f"{path}: '{key}' has duplicate names")
    return tuple(value)


def _ranges(info: dict[str, Any], features: tuple[str, ...], path: Path):
    raw = info.get("feature_ranges")
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != set(features):
        raise ModelSpecError(f"{path}: 'feature_ranges' must map every feature to [min, max]")
    out: dict[str, tuple[float, float]] = {}
    for name in features:
        pair = raw[name]
        if (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in pair)
            or pair[0] > pair[1]
        ):
            raise ModelSpecError(f"{path}: feature_ranges[{name!r}] must be [min, max], finite")
        out[name] = (float(pair[0]), float(pair[1]))
    return out


def _gates(info: dict[str, Any], path: Path) -> tuple[GateLayer, ...]:
    experts = info.get("expert_names") or {}
    outputs = info.get("gate_outputs") or {}
    reference = info.get("gate_reference") or {}
    if not isinstance(experts, dict) or not isinstance(outputs, dict):
        raise ModelSpecError(f"{path}: 'expert_names' and 'gate_outputs' must be objects")
    if set(experts) != set(outputs):
        raise ModelSpecError(f"{path}: 'expert_names' and 'gate_outputs' name different layers")
    gates = []
    for layer, names in experts.items():
        if not isinstance(names, list) or not names:
            raise ModelSpecError(f"{path}: expert_names[{layer!r}] must be a non-empty list")
        shares = None
        ref = reference.get(layer) if isinstance(reference, dict) else None
        if isinstance(ref, dict) and isinstance(ref.get("shares"), list):
            if len(ref["shares"]) != len(names):
                raise ModelSpecError(f"{path}: gate_reference[{layer!r}] has the wrong length")
            shares = tuple(float(v) for v in ref["shares"])
        gates.append(GateLayer(layer, str(outputs[layer]), tuple(map(str, names)), shares))
    return tuple(gates)


def _explain(info: dict[str, Any], gates: tuple[GateLayer, ...], path: Path):
    """``expert_outputs`` and ``explain`` from the sidecar, checked against the gates."""
    experts = info.get("expert_outputs") or {}
    layers = {g.layer: g for g in gates}
    if not isinstance(experts, dict) or not set(experts) <= set(layers):
        raise ModelSpecError(f"{path}: 'expert_outputs' must map MoE layers to output names")
    raw = info.get("explain")
    if raw is None:
        return {str(k): str(v) for k, v in experts.items()}, None
    offset = raw.get("offset") if isinstance(raw, dict) else None
    if (
        not isinstance(raw, dict)
        or raw.get("layer") not in layers
        or experts.get(raw["layer"]) != raw.get("output")
        or not isinstance(offset, list)
        or not all(isinstance(v, int | float) and math.isfinite(v) for v in offset)
    ):
        raise ModelSpecError(
            f"{path}: 'explain' must name a layer of 'expert_outputs', its output and a "
            "finite offset per target"
        )
    found = Explain(str(raw["layer"]), str(raw["output"]), tuple(float(v) for v in offset))
    return {str(k): str(v) for k, v in experts.items()}, found


def load_spec(version_dir: str | Path, name: str | None = None) -> ModelSpec:
    """Read ``version_dir/kanmoe.json``; the directory names give model name and version."""
    version_dir = Path(version_dir)
    path = version_dir / SIDECAR_NAME
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelSpecError(f"{path} is missing (export the model with `kanmoe export`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(info, dict):
        raise ModelSpecError(f"{path}: expected a JSON object")
    features = _names(info, "feature_names", path)
    targets = _names(info, "target_names", path)
    is_sequence = bool(info.get("is_sequence", False))
    seq_len = info.get("seq_len")
    if is_sequence and not (isinstance(seq_len, int) and seq_len > 0):
        raise ModelSpecError(f"{path}: a sequence model needs a positive 'seq_len'")
    outputs = info.get("outputs") or {}
    if not isinstance(outputs, dict):
        raise ModelSpecError(f"{path}: 'outputs' must be an object")
    gates = _gates(info, path)
    expert_outputs, explain = _explain(info, gates, path)
    if explain is not None and len(explain.offset) != len(targets):
        raise ModelSpecError(f"{path}: 'explain' offset needs one value per target")
    return ModelSpec(
        name=name or version_dir.parent.name,
        version=version_dir.name,
        feature_names=features,
        target_names=targets,
        gates=gates,
        is_sequence=is_sequence,
        seq_len=int(seq_len) if is_sequence else None,
        feature_ranges=_ranges(info, features, path),
        metrics=info.get("metrics") or {},
        kanmoe_version=str(info.get("kanmoe_version", "")),
        config_hash=str(info.get("config_hash", "")),
        outputs={str(k): list(v) for k, v in outputs.items()},
        expert_outputs=expert_outputs,
        explain=explain,
        raw=info,
    )
