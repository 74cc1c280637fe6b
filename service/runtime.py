"""One ONNX Runtime session per model version: providers, threads, checks and warm-up.

The ``.onnx`` files carry the ``ai.kanmoe`` spline ops as ONNX functions, so the stock ORT
package (CPU or GPU build) runs them; nothing here needs torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kanmoe.service.model_spec import INPUT_NAME, OUTPUT_NAME, ModelSpec

log = logging.getLogger("kanmoe.service")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ModelLoadError(RuntimeError):
    """A version's ONNX file cannot be opened or does not match its sidecar."""


def requested_providers(choice: str) -> list[str]:
    """Providers to ask ORT for: ``auto`` puts CUDA first when this ORT build has it."""
    available = ort.get_available_providers()
    if choice == "cpu":
        return [CPU]
    if choice == "cuda" or (choice == "auto" and CUDA in available):
        return [CUDA, CPU]
    return [CPU]


class OnnxModel:
    """An ORT session plus the checks that its graph is the one the sidecar describes."""

    def __init__(
        self, path: str | Path, spec: ModelSpec, providers: str = "auto", intra_op_threads: int = 0
    ) -> None:
        self.path = Path(path)
        self.spec = spec
        options = ort.SessionOptions()
        options.log_severity_level = 3  # ORT's own warnings (e.g. CUDA fallback) become our log
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        asked = requested_providers(providers)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=asked)
        except Exception as exc:  # ORT raises several private exception types
            raise ModelLoadError(f"{self.path}: ONNX Runtime cannot load it: {exc}") from None
        self.providers: list[str] = list(self.session.get_providers())
        if CUDA in asked and CUDA not in self.providers:
            log.warning("%s: CUDA execution provider asked for but not active", self.path)
        self._check_graph()
        self.output_names = spec.output_names
        self.base_output_names = spec.base_output_names

    @property
    def on_gpu(self) -> bool:
        return CUDA in self.providers

    def _check_graph(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if set(inputs) != {INPUT_NAME}:
            raise ModelLoadError(
                f"{self.path}: expected one input named {INPUT_NAME!r}, found {sorted(inputs)}"
            )
        rank = len(inputs[INPUT_NAME].shape)
        want_rank = 3 if self.spec.is_sequence else 2
        if rank != want_rank:
            raise ModelLoadError(
                f"{self.path}: input rank {rank} but kanmoe.json says rank {want_rank}"
            )
        last = inputs[INPUT_NAME].shape[-1]
        if isinstance(last, int) and last != self.spec.n_features:
            raise ModelLoadError(
                f"{self.path}: input has {last} features but kanmoe.json names "
                f"{self.spec.n_features}"
            )
        missing = [n for n in self.spec.output_names if n not in outputs]
        if OUTPUT_NAME not in outputs or missing:
            raise ModelLoadError(f"{self.path}: graph lacks outputs {missing or [OUTPUT_NAME]}")

    def _fetch(self, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, self.session.run(names, {INPUT_NAME: x}), strict=True))

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on float32 rows; returns the prediction and the gates by name."""
        return self._fetch(self.base_output_names, x)

    def run_full(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Like :meth:`run`, plus every other output (per-expert outputs for ``explain``)."""
        return self._fetch(self.output_names, x)

    def warm_up(self) -> None:
        """One run on in-range rows so the first request does not pay for lazy initialisation."""
        spec = self.spec
        if spec.feature_ranges:
            row = np.array([(lo + hi) / 2 for lo, hi in spec.feature_ranges.values()], np.float32)
        else:
            row = np.zeros(spec.n_features, np.float32)
        x = np.tile(row, (2, spec.seq_len, 1)) if spec.is_sequence else np.tile(row, (2, 1))
        x = x.astype(np.float32)
        if self.output_names != self.base_output_names:
            self.run_full(x)
        out = self.run(x)
        if not np.isfinite(out[OUTPUT_NAME]).all():
            raise ModelLoadError(f"{self.path}: warm-up produced non-finite outputs")
