"""Parity of an exported model against torch, in ONNX Runtime and onnx's ReferenceEvaluator.

Error measure: for every output, ``max |onnx - torch| / max(1, max |torch|)`` (absolute
error for outputs of magnitude <= 1, such as gate weights; relative to the largest value
otherwise). One tolerance per output kind, so the check does not flake:
- model outputs (``output``): 1e-5 relative to their scale (float32 rounding of the heads);
- gate weights (``gate_weights*``): 1e-4 absolute. They are shares in [0, 1]; the gate's
  LayerNorm over a few logits amplifies float32 rounding, and 7.9e-5 was measured on the
  13,209 training rows of the default model, so 1e-5 would fail on real data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from kanmoe.errors import ExportError
from kanmoe.export.exporter import INPUT_NAME
from kanmoe.export.onnx_bodies import LOOKUP_CHUNK_ROWS

DEFAULT_TOLERANCE = 1e-5  # model outputs, relative to their scale
GATE_TOLERANCE = 1e-4  # gate weights (shares in [0, 1]), absolute
GATE_PREFIX = "gate_weights"


def tolerance_for(
    name: str, tolerance: float = DEFAULT_TOLERANCE, gate_tolerance: float = GATE_TOLERANCE
) -> float:
    """The tolerance that applies to the output called ``name``."""
    return gate_tolerance if name.startswith(GATE_PREFIX) else tolerance


DEFAULT_BATCH_SIZES = (1, 7, 256)
#: ORT-only extra batch: more rows than one block of the chunked lookup body.
LARGE_BATCH = 2 * LOOKUP_CHUNK_ROWS + 1


@dataclass
class CaseResult:
    """One (runtime, input set) comparison: max scaled error per output."""

    runtime: str
    inputs: str
    batch: int
    errors: dict[str, float]

    @property
    def max_error(self) -> float:
        return max(self.errors.values())


@dataclass
class VerifyReport:
    tolerance: float
    gate_tolerance: float = GATE_TOLERANCE
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((c.max_error for c in self.cases), default=0.0)

    @property
    def ok(self) -> bool:
        return all(
            err <= tolerance_for(name, self.tolerance, self.gate_tolerance)
            for c in self.cases
            for name, err in c.errors.items()
        )

    def summary(self) -> str:
        """One line per case: runtime, inputs, batch and the error of each output."""
        lines = [
            f"max scaled error {self.max_error:.3g} (tolerance {self.tolerance:g} for model "
            f"outputs, {self.gate_tolerance:g} for gate weights)"
        ]
        for c in self.cases:
            errs = ", ".join(f"{k}={v:.2e}" for k, v in c.errors.items())
            lines.append(f"  {c.runtime:>4} {c.inputs:>6} batch={c.batch:<4} {errs}")
        return "\n".join(lines)


def ort_session(model: onnx.ModelProto):
    """A CPU ONNX Runtime session for an in-memory model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def reference_evaluator(model: onnx.ModelProto):
    """``ReferenceEvaluator`` for the model; inlines functions first when overloads are used.

    ReferenceEvaluator ignores ``FunctionProto.overload``; ``onnx.inliner`` honours it.
    """
    from onnx import inliner
    from onnx.reference import ReferenceEvaluator

    if any(f.overload for f in model.functions):
        model = inliner.inline_local_functions(model)
    return ReferenceEvaluator(model)


def random_inputs(servable: Any, batch: int, seed: int, real: np.ndarray | None = None):
    """Raw-scale random features: around the real data's mean/std if given, else the model's."""
    rng = np.random.default_rng(seed)
    if real is not None and len(real):
        flat = real.reshape(-1, real.shape[-1])
        mean, std = flat.mean(0), flat.std(0) + 1e-6
    else:
        mean = servable.x_mean.detach().cpu().numpy()
        std = servable.x_std.detach().cpu().numpy()
    shape = (
        (batch, int(servable.seq_len), servable.n_features)
        if servable.is_sequence
        else (
            batch,
            servable.n_features,
        )
    )
    return (rng.standard_normal(shape) * std + mean).astype(np.float32)


def _torch_outputs(servable: Any, x: np.ndarray, output_names: list[str], meta: dict):
    import torch

    expert_outputs = json.loads(meta.get("expert_outputs", "{}"))
    with torch.no_grad():
        if expert_outputs:
            y, gates, experts = servable.forward_explained(torch.from_numpy(x))
        else:
            (y, gates), experts = servable(torch.from_numpy(x)), {}
    by_name = {"output": y}
    for layer, name in json.loads(meta.get("gate_outputs", "{}")).items():
        by_name[name] = gates[layer]
    for layer, name in expert_outputs.items():
        by_name[name] = experts[layer]
    return [by_name[n].detach().cpu().numpy() for n in output_names]


def _scaled_errors(got: list[np.ndarray], want: list[np.ndarray], names: list[str]):
    errors = {}
    for name, g, w in zip(names, got, want, strict=True):
        if g.shape != w.shape:
            raise ExportError(f"output {name!r}: ONNX shape {g.shape} != torch shape {w.shape}")
        scale = max(1.0, float(np.abs(w).max(initial=0.0)))
        errors[name] = float(np.abs(g.astype(np.float64) - w).max(initial=0.0)) / scale
    return errors


def verify_model(
    servable: Any,
    model: onnx.ModelProto,
    real_inputs: np.ndarray | None = None,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    tolerance: float = DEFAULT_TOLERANCE,
    gate_tolerance: float = GATE_TOLERANCE,
    reference: bool = True,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> VerifyReport:
    """Compare ORT (and ReferenceEvaluator) against torch on random and real inputs.

    real_inputs: raw feature rows ``(N, F)`` or windows ``(N, T, F)``; the first
    ``max(batch_sizes)`` rows are used. Raises :class:`ExportError` with the figures when
    an error exceeds ``tolerance`` (unless ``raise_on_failure`` is False).
    """
    servable = servable.eval()
    meta = {p.key: p.value for p in model.metadata_props}
    names = [o.name for o in model.graph.output]
    sess = ort_session(model)
    ref = reference_evaluator(model) if reference else None
    report = VerifyReport(tolerance=tolerance, gate_tolerance=gate_tolerance)
    input_sets: list[tuple[str, np.ndarray]] = []
    for i, batch in enumerate(batch_sizes):
        input_sets.append(("random", random_inputs(servable, batch, seed + i, real_inputs)))
    if real_inputs is not None and len(real_inputs):
        real = np.ascontiguousarray(real_inputs[: max(batch_sizes)], dtype=np.float32)
        input_sets.append(("real", real))
    for label, x in input_sets:
        want = _torch_outputs(servable, x, names, meta)
        got = sess.run(names, {INPUT_NAME: x})
        report.cases.append(CaseResult("ort", label, len(x), _scaled_errors(got, want, names)))
        if ref is not None:
            got = ref.run(names, {INPUT_NAME: x})
            report.cases.append(CaseResult("ref", label, len(x), _scaled_errors(got, want, names)))
    # ORT only: a batch above the lookup body's block size takes its Scan-over-blocks path
    x = random_inputs(servable, LARGE_BATCH, seed + len(batch_sizes), real_inputs)
    got = sess.run(names, {INPUT_NAME: x})
    want = _torch_outputs(servable, x, names, meta)
    report.cases.append(CaseResult("ort", "random", len(x), _scaled_errors(got, want, names)))
    if raise_on_failure and not report.ok:
        raise ExportError(f"ONNX output differs from torch:\n{report.summary()}")
    return report
