"""Prometheus metrics of the kanmoe service: latency, batching, and what the gates do.

Per request (route handlers): ``observe_request`` and ``observe_rejection`` update plain
prometheus_client ``Histogram``/``Counter`` objects; a handful of label lookups per request.

Per batch (the micro-batcher, from worker threads): ``observe_batch`` gets the batch's raw
inputs ``(rows, F)`` or ``(rows, T, F)`` and each MoE layer's gate weights ``(rows, E)``, and
records per model version: rows served, batch size, inference time, per-expert gate-weight
histograms, top-1 routing counts, gate entropy, raw inputs outside the training range, and a
window of recent weights for the drift gauge (see :mod:`kanmoe.service.drift`).

Why a hand-written collector for the per-batch metrics: prometheus_client has no bulk
``observe``; feeding its ``Histogram`` row by row costs a Python call per row per expert,
which at >10k rows/s would cost more than the model. Here every per-batch statistic is a
handful of vectorised numpy calls (``np.searchsorted`` into bucket indices, ``np.bincount``
into counts) computed outside the lock, then added to the version's count arrays under one
short lock. :class:`_BatchCollector` turns those arrays into metric families at scrape time.

Labels are bounded: model and version come from the loaded repository (a model name that is
not loaded is recorded as ``_unknown``), route is a template chosen by the caller, status is
a class (``2xx``), layers/experts/features come from the model's sidecar.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.utils import floatToGoString

from kanmoe.service.drift import GateWindow, js_divergence, normalise_shares
from kanmoe.service.model_spec import ModelSpec

_MV = ("model", "version")
# (exposed name, type, labels, help): the single source for the exporter and the README table.
# fmt: off
METRIC_DOCS: list[tuple[str, str, tuple[str, ...], str]] = [
    ("kanmoe_request_duration_seconds", "histogram", ("model", "route", "status"),
     "HTTP request latency by route template and status class (2xx/4xx/5xx)."),
    ("kanmoe_inference_duration_seconds", "histogram", _MV,
     "ONNX Runtime session.run time per micro-batch."),
    ("kanmoe_batch_size", "histogram", _MV,
     "Rows per micro-batch sent to ONNX Runtime."),
    ("kanmoe_queue_depth", "gauge", _MV,
     "Rows waiting in the micro-batcher queue."),
    ("kanmoe_rejected_total", "counter", ("model", "reason"),
     "Requests refused: queue_full, draining, not_ready, too_large, bad_request, timeout."),
    ("kanmoe_rows_total", "counter", _MV,
     "Rows (instances) served."),
    ("kanmoe_expert_gate_weight", "histogram", (*_MV, "layer", "expert"),
     "Gate weight given to each expert, one observation per row served."),
    ("kanmoe_expert_routed_total", "counter", (*_MV, "layer", "expert"),
     "Rows whose largest gate weight (top-1) went to this expert."),
    ("kanmoe_gate_entropy", "histogram", (*_MV, "layer"),
     "Shannon entropy (nats) of each row's normalised gate weights; max ln(experts)."),
    ("kanmoe_input_out_of_range_total", "counter", (*_MV, "feature", "side"),
     "Rows with a raw feature below/above its training range (the splines extrapolate)."),
    ("kanmoe_gate_drift", "gauge", (*_MV, "layer"),
     "Jensen-Shannon divergence (bits, 0..1) of recent mean expert shares from the reference."),
    ("kanmoe_model_info", "gauge", (*_MV, "providers"),
     "Loaded model versions and the ONNX Runtime execution providers in use (value 1)."),
]

GATE_WEIGHT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
# Entropy buckets are these fractions of ln(E), so "near uniform" reads the same for any E.
ENTROPY_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(11))  # 1 .. 1024, then +Inf
INFERENCE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
# fmt: on
UNKNOWN_MODEL = "_unknown"
# The reasons the service refuses a request with (kanmoe_rejected_total{reason}).
REJECTION_REASONS = ("queue_full", "draining", "not_ready", "too_large", "bad_request", "timeout")
_DOCS = {name: (kind, labels, text) for name, kind, labels, text in METRIC_DOCS}
_KINDS = {
    "histogram": HistogramMetricFamily,
    "counter": CounterMetricFamily,
    "gauge": GaugeMetricFamily,
}
_TINY = np.finfo(np.float64).tiny


# Families by metric name; their kinds differ, and each is filled through ``add_metric``.
_Families = dict[str, Any]


def _family(name: str) -> Metric:
    kind, labels, text = _DOCS[name]
    return _KINDS[kind](name, text, labels=list(labels))


def status_class(status: int) -> str:
    """HTTP status -> its class label (``"2xx"``), so status codes cannot multiply series."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


class BucketCounts:
    """Non-cumulative counts and sums of ``series`` histograms that share one bucket layout.

    Index ``i`` counts values in ``(bounds[i-1], bounds[i]]`` (Prometheus ``le`` semantics);
    the last index counts values above every bound (the ``+Inf`` bucket). With ``capped``, the
    last bound is the quantity's maximum and values a rounding error above it count in the
    last finite bucket instead.
    """

    def __init__(self, bounds: Sequence[float], series: int = 1, capped: bool = False) -> None:
        self._search = np.asarray(bounds[:-1] if capped else bounds, dtype=np.float64)
        self._bounds_list = [float(b) for b in bounds]
        self._les = [floatToGoString(b) for b in self._bounds_list] + ["+Inf"]
        self.counts = np.zeros((series, len(bounds) + 1), dtype=np.int64)
        self.sums = np.zeros(series, dtype=np.float64)
        self._offsets = np.arange(series, dtype=np.intp) * (len(bounds) + 1)

    def tally(self, values: np.ndarray) -> np.ndarray:
        """Counts ``(series, buckets)`` of ``values`` ``(rows, series)`` (or ``(rows,)`` for one
        series); pure, needs no lock."""
        idx = np.searchsorted(self._search, values, side="left")
        if values.ndim == 1:  # one series: skip the offsets
            return np.bincount(idx, minlength=self.counts.size)
        idx += self._offsets
        return np.bincount(idx.ravel(), minlength=self.counts.size).reshape(self.counts.shape)

    def observe(self, value: float) -> None:
        """One value into series 0 (scalar path: bisect, no numpy call overhead)."""
        self.counts[0, bisect.bisect_left(self._bounds_list, value)] += 1
        self.sums[0] += value

    def emit(self, family: Any, labels: list[str], series: int = 0) -> None:
        """Add one series to ``family`` with cumulative bucket counts, as exposition wants."""
        cumulative = np.cumsum(self.counts[series]).tolist()
        family.add_metric(
            labels, list(zip(self._les, cumulative, strict=True)), float(self.sums[series])
        )


class _LayerMetrics:
    """One MoE layer of one version: per-expert weight histograms, top-1 counts, entropy, drift."""

    def __init__(
        self, layer: str, experts: Sequence[str], reference: Sequence[float] | None, window: int
    ) -> None:
        self.layer, self.experts = layer, tuple(experts)
        n = len(self.experts)
        self.weights = BucketCounts(GATE_WEIGHT_BUCKETS, n)
        self.max_entropy = float(np.log(n))
        fractions = ENTROPY_FRACTIONS if n > 1 else (1.0,)
        # Capped: entropy never exceeds ln E; rounding may put a uniform row a hair above it.
        self.entropy = BucketCounts([f * self.max_entropy for f in fractions], capped=True)
        self.routed = np.zeros(n, dtype=np.int64)
        self.reference = None if reference is None else normalise_shares(np.asarray(reference))
        self.window = GateWindow(n, window) if reference is not None else None
        self._ones = np.ones(n)  # row sums as a matrix-vector product: cheaper than sum(axis=1)

    def stats(self, w: np.ndarray) -> tuple[np.ndarray, ...]:
        """This batch's statistics of weights ``w`` ``(rows, E)``; pure, needs no lock."""
        routed = np.bincount(w.argmax(axis=1), minlength=len(self.experts))
        # Float64 from here: bucket comparisons as Histogram.observe(float(x)) would make them.
        w = w.astype(np.float64)
        # Entropy of the normalised weights p = w / s: H = ln(s) - sum(w ln w) / s.
        # (0 ln 0 = 0 via the floor; an all-zero row gets entropy 0.)
        s = np.maximum(w @ self._ones, _TINY)
        h = np.maximum(np.log(s) - ((w * np.log(np.maximum(w, _TINY))) @ self._ones) / s, 0.0)
        return self.weights.tally(w), w.sum(axis=0), routed, self.entropy.tally(h), h.sum()

    def apply(self, w: np.ndarray, stats: tuple[np.ndarray, ...]) -> None:
        """Add a batch's statistics; the caller holds the lock."""
        counts, sums, routed, entropy_counts, entropy_sum = stats
        self.weights.counts += counts
        self.weights.sums += sums
        self.routed += routed
        self.entropy.counts += entropy_counts
        self.entropy.sums += entropy_sum
        if self.window is not None:
            self.window.add(w)

    def emit(self, fam: _Families, key: list[str]) -> None:
        for e, expert in enumerate(self.experts):
            labels = [*key, self.layer, expert]
            self.weights.emit(fam["kanmoe_expert_gate_weight"], labels, e)
            fam["kanmoe_expert_routed_total"].add_metric(labels, int(self.routed[e]))
        self.entropy.emit(fam["kanmoe_gate_entropy"], [*key, self.layer])
        shares = self.window.mean_shares() if self.window is not None else None
        if shares is not None:
            drift = js_divergence(shares, self.reference)
            fam["kanmoe_gate_drift"].add_metric([*key, self.layer], drift)


class _VersionMetrics:
    """Everything recorded per batch for one loaded model version."""

    def __init__(self, spec: ModelSpec, providers: Sequence[str], window: int) -> None:
        self.spec = spec
        self.key = [spec.name, spec.version]
        self.providers = ",".join(providers)
        self.layers = [
            _LayerMetrics(g.layer, g.experts, g.reference_shares, window) for g in spec.gates
        ]
        self.inference = BucketCounts(INFERENCE_BUCKETS)
        self.batch_size = BucketCounts(BATCH_SIZE_BUCKETS)
        self.rows = 0
        self.queue_depth = 0.0
        # Batches waiting to be folded into the per-row statistics: (inputs, weights, rows).
        self.pending: list[tuple[np.ndarray, list[np.ndarray], int]] = []
        self.pending_rows = 0
        self.features = spec.feature_names
        self.low = self.high = None  # raw training range per feature, if the export has it
        if spec.feature_ranges is not None:
            # float32 bounds: inputs arrive as float32, and rounding keeps order, so a value
            # at the (float64) training max never counts as above it.
            ranges = np.array([spec.feature_ranges[f] for f in spec.feature_names], np.float32)
            self.low, self.high = ranges[:, 0].copy(), ranges[:, 1].copy()
            self.out_of_range = np.zeros((2, len(ranges)), dtype=np.int64)  # below, above

    def take_pending(self) -> tuple[list[tuple[np.ndarray, list[np.ndarray], int]], int]:
        """The batches not folded yet, leaving none; the caller holds the lock."""
        batches, rows = self.pending, self.pending_rows
        self.pending, self.pending_rows = [], 0
        return batches, rows

    def range_stats(self, x: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """``(side, rows out per feature)`` for each side (0 below, 1 above) with any row out;
        empty without ranges or when every value is inside (the common, cheap case).
        ``x`` was shape-checked by ``observe_batch``."""
        if self.low is None:
            return []
        out = []
        for side, outside in enumerate((x < self.low, x > self.high)):
            if outside.any():
                # A sequence row counts once per feature and side, whatever its steps.
                rows_out = outside.any(axis=1) if x.ndim == 3 else outside
                out.append((side, rows_out.sum(axis=0)))
        return out

    def emit(self, fam: _Families) -> None:
        key = self.key
        self.inference.emit(fam["kanmoe_inference_duration_seconds"], key)
        self.batch_size.emit(fam["kanmoe_batch_size"], key)
        fam["kanmoe_queue_depth"].add_metric(key, self.queue_depth)
        fam["kanmoe_rows_total"].add_metric(key, self.rows)
        fam["kanmoe_model_info"].add_metric([*key, self.providers], 1.0)
        for layer in self.layers:
            layer.emit(fam, key)
        if self.low is not None:
            oor = fam["kanmoe_input_out_of_range_total"]
            for f, feature in enumerate(self.features):
                oor.add_metric([*key, feature, "below"], int(self.out_of_range[0, f]))
                oor.add_metric([*key, feature, "above"], int(self.out_of_range[1, f]))


def _same_series(a: ModelSpec, b: ModelSpec) -> bool:
    """Whether two specs of one version define the same series and statistics."""
    return all(getattr(a, f) == getattr(b, f) for f in ("feature_names", "gates", "feature_ranges"))


_BATCH_FAMILIES = [n for n in _DOCS if n != "kanmoe_rejected_total"]
# Batches are folded into the per-row statistics once this many rows wait (or on a scrape):
# numpy's per-call overhead is paid per fold, not per micro-batch.
FOLD_ROWS = 2048


class _BatchCollector:
    """Turns the per-version arrays into metric families when Prometheus scrapes."""

    def __init__(self, owner: ServiceMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        fam = {name: _family(name) for name in _BATCH_FAMILIES}
        # Formatted under the lock (~0.25 ms per version per scrape): one consistent cut.
        owner = self._owner
        with owner._lock:
            for version in owner._versions.values():
                owner._fold(version, *version.take_pending())
                version.emit(fam)
            requests = fam["kanmoe_request_duration_seconds"]
            for labels, counts in owner._request_counts.items():
                counts.emit(requests, list(labels))
        return list(fam.values())


class ServiceMetrics:
    """All of the service's metrics on one registry; safe to call from several threads."""

    def __init__(self, registry: CollectorRegistry | None = None, drift_window: int = 2048) -> None:
        if drift_window < 1:
            raise ValueError(f"drift_window must be >= 1 row, got {drift_window}")
        # A fresh registry by default, never the global one: tests and several apps coexist.
        self.registry = registry if registry is not None else CollectorRegistry()
        self.drift_window = drift_window
        self._lock = threading.RLock()  # collect() folds pending batches under it
        self._versions: dict[tuple[str, str], _VersionMetrics] = {}
        self._models: dict[str, int] = {}  # model -> number of loaded versions
        self._request_series: dict[str, set[tuple[str, str, str]]] = {}
        self._rejection_series: dict[str, set[str]] = {}
        # Request durations: one BucketCounts per label tuple, observed with bisect (about a
        # microsecond; prometheus_client's labels() + observe() cost ten times that).
        self._request_counts: dict[tuple[str, str, str], BucketCounts] = {}
        _, labels, text = _DOCS["kanmoe_rejected_total"]
        self._rejected = Counter("kanmoe_rejected_total", text, labels, registry=self.registry)
        self.registry.register(_BatchCollector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def add_model(self, spec: ModelSpec, providers: list[str]) -> None:
        """Start the series of a loaded version.

        Adding a version again (a reload) keeps its counters and drift window when features,
        ranges and gates are unchanged, else starts them afresh.
        """
        state = _VersionMetrics(spec, providers, self.drift_window)
        with self._lock:
            old = self._versions.get((spec.name, spec.version))
            if old is None:
                self._models[spec.name] = self._models.get(spec.name, 0) + 1
                # Every reason at zero from the first scrape, so rate() sees the first refusal
                # (a series born at 1 has no earlier sample to rise from).
                for reason in REJECTION_REASONS:
                    self._rejection_series.setdefault(spec.name, set()).add(reason)
                    self._rejected.labels(spec.name, reason)
            elif _same_series(old.spec, spec):
                old.spec, old.providers = spec, state.providers
                return
            self._versions[(spec.name, spec.version)] = state

    def remove_model(self, model: str, version: str) -> None:
        """Drop the version's series; the model's request/rejection series go with its last."""
        with self._lock:
            if self._versions.pop((model, version), None) is None:
                return
            self._models[model] -= 1
            if self._models[model] > 0:
                return
            del self._models[model]
            for labels in self._request_series.pop(model, set()):
                self._request_counts.pop(labels, None)
            for reason in self._rejection_series.pop(model, set()):
                self._rejected.remove(model, reason)

    def _model_label(self, model: str) -> str:
        return model if model == "" or model in self._models else UNKNOWN_MODEL

    def observe_request(self, model: str, route: str, status: int, seconds: float) -> None:
        """One finished HTTP request; ``route`` is a template name such as ``"v1_predict"``."""
        status_label = status_class(status)
        # Under the lock, so a concurrent remove_model cannot leave an orphaned series behind.
        with self._lock:
            labels = (self._model_label(model), route, status_label)
            counts = self._request_counts.get(labels)
            if counts is None:
                counts = self._request_counts[labels] = BucketCounts(REQUEST_BUCKETS)
                self._request_series.setdefault(labels[0], set()).add(labels)
            counts.observe(seconds)

    def observe_rejection(self, model: str, reason: str) -> None:
        """A request refused before inference; ``reason`` is one of a fixed set of words."""
        with self._lock:
            label = self._model_label(model)
            self._rejection_series.setdefault(label, set()).add(reason)
            self._rejected.labels(label, reason).inc()

    def set_queue_depth(self, model: str, version: str, rows: int) -> None:
        """Rows waiting for this version's batcher (ignored for a version not loaded)."""
        state = self._versions.get((model, version))
        if state is not None:
            state.queue_depth = float(rows)

    def observe_batch(
        self,
        spec: ModelSpec,
        rows: int,
        seconds: float,
        raw_inputs: np.ndarray,
        gates: Mapping[str, np.ndarray],
    ) -> None:
        """Record one micro-batch: ``raw_inputs`` ``(rows, F)`` or ``(rows, T, F)``, ``gates``
        layer -> ``(rows, E)`` (a ``(rows, T, E)`` array is read at its last step).

        A version that is not (or no longer) loaded, or was reloaded with other gates or
        features than ``spec`` has, is ignored: a batch finishing during an unload or reload
        must not fail the requests it answers.
        """
        state = self._versions.get((spec.name, spec.version))
        if state is None or (state.spec is not spec and not _same_series(state.spec, spec)):
            return  # unloaded, or replaced by a reload with other experts/features
        weights = []
        for layer in state.layers:
            w = gates.get(layer.layer)
            if w is None:
                raise ValueError(f"observe_batch: gate weights of layer {layer.layer!r} missing")
            w = np.asarray(w)
            if w.ndim == 3:
                w = w[:, -1]
            if w.shape != (rows, len(layer.experts)):
                raise ValueError(
                    f"observe_batch: gate weights of layer {layer.layer!r} have "
                    f"shape {w.shape}, expected ({rows}, {len(layer.experts)})"
                )
            weights.append(w)
        x = np.asarray(raw_inputs)
        n = len(state.features)
        if state.low is not None and (
            x.ndim not in (2, 3) or x.shape[0] != rows or x.shape[-1] != n
        ):
            raise ValueError(
                f"observe_batch: raw inputs have shape {x.shape}, "
                f"expected ({rows}, {n}) or ({rows}, T, {n})"
            )
        with self._lock:
            state.rows += rows
            state.inference.observe(seconds)
            state.batch_size.observe(rows)
            state.pending.append((x, weights, rows))
            state.pending_rows += rows
            if state.pending_rows < FOLD_ROWS:
                return
            batches, total = state.take_pending()
        self._fold(state, batches, total)

    def _fold(
        self,
        state: _VersionMetrics,
        batches: list[tuple[np.ndarray, list[np.ndarray], int]],
        rows: int,
    ) -> None:
        """Per-row statistics of buffered batches, in order: computed outside the lock when
        called from observe_batch, added under it (re-entrant from collect, which holds it)."""
        if not batches:
            return
        per_layer = []
        for i, layer in enumerate(state.layers):
            w = (
                batches[0][1][i]
                if len(batches) == 1
                else np.concatenate([b[1][i] for b in batches])
            )
            per_layer.append((layer, w, layer.stats(w)))
        out_of_range: list[tuple[int, np.ndarray]] = []
        if state.low is not None:
            shapes = {b[0].shape[1:] for b in batches}
            groups = (
                [np.concatenate([b[0] for b in batches])]
                if len(shapes) == 1 and len(batches) > 1
                else [b[0] for b in batches]
            )
            for x in groups:
                out_of_range += state.range_stats(x)
        with self._lock:
            for layer, w, stats in per_layer:
                layer.apply(w, stats)
            for side, counts in out_of_range:
                state.out_of_range[side] += counts

    def expert_traffic(self, model: str, version: str) -> dict[str, dict[str, Any]] | None:
        """Live traffic of a loaded version per MoE layer, for the model card: ``{layer:
        {"experts", "rows", "routed" (top-1 counts), "mean_weight"}}``; None if not loaded.

        Buffered batches are folded first, so the numbers match the next scrape.
        """
        with self._lock:
            state = self._versions.get((model, version))
            if state is None:
                return None
            self._fold(state, *state.take_pending())
            out: dict[str, dict[str, Any]] = {}
            for layer in state.layers:
                rows = int(layer.weights.counts[0].sum())  # one weight per row per expert
                out[layer.layer] = {
                    "experts": list(layer.experts),
                    "rows": rows,
                    "routed": layer.routed.tolist(),
                    "mean_weight": (layer.weights.sums / max(rows, 1)).tolist(),
                }
            return out

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """Exposition body and its content type: OpenMetrics if ``accept`` asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
