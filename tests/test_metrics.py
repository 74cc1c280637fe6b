"""The service's Prometheus metrics, read back from the exposition text and checked against
independent numpy/scipy computations of the same statistics."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as scipy_entropy

from kanmoe.service.drift import GateWindow, js_divergence
from kanmoe.service.metrics import (
    ENTROPY_FRACTIONS,
    GATE_WEIGHT_BUCKETS,
    METRIC_DOCS,
    UNKNOWN_MODEL,
    ServiceMetrics,
    status_class,
)
from kanmoe.service.model_spec import GateLayer, ModelSpec

FEATURES = tuple(f"f{i}" for i in range(4))
EXPERTS = ("e0", "e1", "e2")
REFERENCE = (0.2, 0.3, 0.5)


def make_spec(
    name: str = "m",
    version: str = "1",
    ranges: bool = True,
    reference: tuple[float, ...] | None = REFERENCE,
    sequence: bool = False,
    layers: tuple[str, ...] = ("moe",),
) -> ModelSpec:
    return ModelSpec(
        name=name,
        version=version,
        feature_names=FEATURES,
        target_names=("y",),
        gates=tuple(GateLayer(layer, f"gate_{layer}", EXPERTS, reference) for layer in layers),
        is_sequence=sequence,
        seq_len=5 if sequence else None,
        feature_ranges={f: (-1.0, 2.0) for f in FEATURES} if ranges else None,
    )


def samples(metrics: ServiceMetrics, name: str, **match: str) -> list[tuple[dict, float]]:
    """Every sample called ``name`` in the text exposition whose labels include ``match``."""
    body, _ = metrics.render()
    out = []
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
                out.append((s.labels, s.value))
    return out


def value(metrics: ServiceMetrics, name: str, **match: str) -> float:
    found = samples(metrics, name, **match)
    assert len(found) == 1, (name, match, found)
    return found[0][1]


def buckets(metrics: ServiceMetrics, name: str, **match: str) -> dict[float, float]:
    """Cumulative bucket counts of one histogram series, keyed by ``le`` as a float."""
    return {float(lab["le"]): v for lab, v in samples(metrics, f"{name}_bucket", **match)}


def dirichlet(rng: np.random.Generator, rows: int, alpha=(1.0, 1.0, 1.0)) -> np.ndarray:
    return rng.dirichlet(alpha, size=rows).astype(np.float32)


def observe(metrics, spec, w, x=None, layer="moe"):
    rows = w.shape[0]
    if x is None:
        x = np.zeros((rows, len(FEATURES)), np.float32)
    metrics.observe_batch(spec, rows, 0.002, x, {layer: w})


def test_gate_weight_histogram_counts_sums_and_routing_match_numpy():
    rng = np.random.default_rng(0)
    metrics, spec = ServiceMetrics(), make_spec()
    metrics.add_model(spec, ["CPUExecutionProvider"])
    edge = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.05, 0.95, 0.0]], np.float32)
    batches = [dirichlet(rng, 64), edge, dirichlet(rng, 1), dirichlet(rng, 200, (0.3, 1, 3))]
    for w in batches:
        observe(metrics, spec, w)
    w = np.concatenate(batches)
    assert value(metrics, "kanmoe_rows_total", model="m", version="1") == len(w)
    for e, expert in enumerate(EXPERTS):
        lab = dict(model="m", version="1", layer="moe", expert=expert)
        assert value(metrics, "kanmoe_expert_gate_weight_count", **lab) == len(w)
        assert value(metrics, "kanmoe_expert_gate_weight_sum", **lab) == pytest.approx(
            float(w[:, e].astype(np.float64).sum()), rel=1e-12
        )
        got = buckets(metrics, "kanmoe_expert_gate_weight", **lab)
        assert sorted(got) == [*GATE_WEIGHT_BUCKETS, math.inf]
        for le, count in got.items():
            # In float64, as prometheus_client's Histogram.observe(float(x)) would compare: the
            # float32 weight 0.05 is 0.0500000007 and belongs above le="0.05".
            assert count == int((w[:, e].astype(np.float64) <= le).sum()), (expert, le)
    routed = np.bincount(w.argmax(axis=1), minlength=3)
    for e, expert in enumerate(EXPERTS):
        got = value(metrics, "kanmoe_expert_routed_total", layer="moe", expert=expert)
        assert got == routed[e]
    assert sum(v for _, v in samples(metrics, "kanmoe_expert_routed_total")) == len(w)


def test_gate_entropy_histogram_matches_scipy_for_softmax_and_sigmoid_gates():
    rng = np.random.default_rng(1)
    metrics, spec = ServiceMetrics(), make_spec()
    metrics.add_model(spec, ["CPUExecutionProvider"])
    uniform = np.full((3, 3), 1 / 3, np.float32)
    one_hot = np.eye(3, dtype=np.float32)
    # Sigmoid gates: independent weights in (0, 1) that do not sum to 1.
    sigmoid = (1 / (1 + np.exp(-rng.normal(size=(50, 3))))).astype(np.float32)
    batches = [dirichlet(rng, 100, (0.5, 0.5, 0.5)), uniform, one_hot, sigmoid]
    for w in batches:
        observe(metrics, spec, w)
    w = np.concatenate(batches).astype(np.float64)
    h = scipy_entropy(w, axis=1)  # normalises each row itself
    top = math.log(3)
    got = buckets(metrics, "kanmoe_gate_entropy", model="m", version="1", layer="moe")
    assert sorted(got) == pytest.approx([*(f * top for f in ENTROPY_FRACTIONS), math.inf])
    for le, count in got.items():
        # The uniform rows sit at ln 3 exactly; they belong to the le=ln(3) bucket.
        assert count == int((h <= le + (1e-9 if le >= top - 1e-12 else 0)).sum()), le
    assert got[min(got)] >= 3  # the one-hot rows have entropy 0
    assert value(metrics, "kanmoe_gate_entropy_sum", layer="moe") == pytest.approx(h.sum())
    assert value(metrics, "kanmoe_gate_entropy_count", layer="moe") == len(w)


def test_out_of_range_counts_match_numpy_for_rows_and_sequences():
    rng = np.random.default_rng(2)
    lo, hi = -1.0, 2.0
    metrics = ServiceMetrics()
    flat, seq = make_spec("flat"), make_spec("seq", sequence=True)
    for spec in (flat, seq):
        metrics.add_model(spec, ["CPUExecutionProvider"])
    x2 = rng.normal(0.5, 1.5, size=(300, 4)).astype(np.float32)
    x2[0] = [lo, hi, lo, hi]  # on the boundary: inside
    x3 = rng.normal(0.5, 1.2, size=(120, 5, 4)).astype(np.float32)
    x3[:, :, 3] = 0.0  # one feature never out: its counters stay at 0
    for x, spec in ((x2[:200], flat), (x2[200:], flat), (x3, seq)):
        w = dirichlet(rng, x.shape[0])
        metrics.observe_batch(spec, x.shape[0], 0.001, x, {"moe": w})
    for x, name in ((x2, "flat"), (x3, "seq")):
        below, above = x < lo, x > hi
        if x.ndim == 3:  # a row counts once per feature if any step is out
            below, above = below.any(axis=1), above.any(axis=1)
        for f, feature in enumerate(FEATURES):
            for side, ref in (("below", below), ("above", above)):
                got = value(
                    metrics, "kanmoe_input_out_of_range_total", model=name, feature=feature,
                    side=side,
                )  # fmt: skip
                assert got == int(ref[:, f].sum()), (name, feature, side)
    assert value(metrics, "kanmoe_input_out_of_range_total", model="seq", feature="f3",
                 side="above") == 0  # fmt: skip
    assert sum(v for _, v in samples(metrics, "kanmoe_input_out_of_range_total")) > 0


def test_no_range_or_drift_series_without_ranges_or_reference():
    metrics, spec = ServiceMetrics(), make_spec(ranges=False, reference=None)
    metrics.add_model(spec, ["CPUExecutionProvider"])
    x = np.full((4, 4), 1e6, np.float32)  # far outside anything, but no ranges to compare
    observe(metrics, spec, dirichlet(np.random.default_rng(3), 4), x)
    assert samples(metrics, "kanmoe_input_out_of_range_total") == []
    assert samples(metrics, "kanmoe_gate_drift") == []
    assert value(metrics, "kanmoe_rows_total") == 4


def test_gate_drift_near_zero_on_reference_and_scipy_jsd_when_one_expert_takes_all():
    rng = np.random.default_rng(4)
    window = 500
    metrics, spec = ServiceMetrics(drift_window=window), make_spec()
    metrics.add_model(spec, ["CPUExecutionProvider"])
    assert samples(metrics, "kanmoe_gate_drift") == []  # no rows yet: no value
    # Rows whose expected weights are the reference shares.
    alpha = 20 * np.array(REFERENCE)
    seen = [dirichlet(rng, n, alpha) for n in (37, 37, 200, 37, 300)]
    for w in seen:
        observe(metrics, spec, w)
    recent = np.concatenate(seen)[-window:].astype(np.float64)
    expected = jensenshannon(recent.mean(axis=0), REFERENCE, base=2) ** 2
    drift = value(metrics, "kanmoe_gate_drift", model="m", version="1", layer="moe")
    assert drift == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert drift < 0.005
    # Every row to expert 0: the window fills with one-hot rows and the drift climbs.
    previous = drift
    collapsed = np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (150, 1))
    for _ in range(4):
        observe(metrics, spec, collapsed)
        seen.append(collapsed)
        drift = value(metrics, "kanmoe_gate_drift", layer="moe")
        recent = np.concatenate(seen)[-window:].astype(np.float64)
        assert drift == pytest.approx(
            jensenshannon(recent.mean(axis=0), REFERENCE, base=2) ** 2, rel=1e-9
        )
        assert drift > previous
        previous = drift
    full = jensenshannon([1, 0, 0], REFERENCE, base=2) ** 2
    assert drift == pytest.approx(full, rel=1e-9)  # the window now holds only one-hot rows
    assert 0.4 < full < 1.0


def test_js_divergence_is_scipy_squared_distance_and_bounded():
    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(2, 9))
        p, q = rng.random(n), rng.random(n)
        p[rng.random(n) < 0.3] = 0.0
        if p.sum() == 0:
            p[0] = 1.0
        assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2, abs=1e-12)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_divergence([0.2, 0.8], [2, 8]) == pytest.approx(0.0, abs=1e-15)


def test_gate_window_keeps_exactly_the_last_rows_across_wraps():
    rng = np.random.default_rng(6)
    window = GateWindow(n_experts=3, window=10)
    assert window.mean_shares() is None
    seen = []
    for n in (3, 4, 5, 1, 9, 25, 2):
        w = rng.random((n, 3))
        window.add(w)
        seen.append(w)
        recent = np.concatenate(seen)[-10:]
        assert window.rows == len(recent)
        mean = recent.sum(axis=0) / recent.sum()
        np.testing.assert_allclose(window.mean_shares(), mean, rtol=1e-12)


def test_sequence_gate_weights_are_read_at_the_last_step():
    rng = np.random.default_rng(7)
    metrics, spec = ServiceMetrics(), make_spec(sequence=True)
    metrics.add_model(spec, ["CPUExecutionProvider"])
    w3 = rng.dirichlet((1, 1, 1), size=(40, 5)).astype(np.float32)
    x = np.zeros((40, 5, 4), np.float32)
    metrics.observe_batch(spec, 40, 0.001, x, {"moe": w3})
    routed = np.bincount(w3[:, -1].argmax(axis=1), minlength=3)
    for e, expert in enumerate(EXPERTS):
        assert value(metrics, "kanmoe_expert_routed_total", expert=expert) == routed[e]
        assert value(metrics, "kanmoe_expert_gate_weight_sum", expert=expert) == pytest.approx(
            float(w3[:, -1, e].sum())
        )


def test_batch_inference_and_queue_series():
    metrics, spec = ServiceMetrics(), make_spec(ranges=False)
    metrics.add_model(spec, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    rng = np.random.default_rng(8)
    sizes, times = [1, 3, 64, 1024, 2000], [0.0004, 0.001, 0.003, 0.02, 3.0]
    for n, t in zip(sizes, times, strict=True):
        metrics.observe_batch(spec, n, t, np.zeros((n, 4), np.float32), {"moe": dirichlet(rng, n)})
    got = buckets(metrics, "kanmoe_batch_size", model="m", version="1")
    assert got == {le: sum(s <= le for s in sizes) for le in got}
    assert got[1024.0] == 4 and got[math.inf] == 5
    assert value(metrics, "kanmoe_batch_size_sum") == sum(sizes)
    got = buckets(metrics, "kanmoe_inference_duration_seconds", model="m", version="1")
    assert got == {le: sum(t <= le for t in times) for le in got}
    assert value(metrics, "kanmoe_inference_duration_seconds_sum") == pytest.approx(sum(times))
    metrics.set_queue_depth("m", "1", 17)
    metrics.set_queue_depth("m", "9", 5)  # not loaded: ignored, no series
    assert samples(metrics, "kanmoe_queue_depth") == [({"model": "m", "version": "1"}, 17.0)]
    info = samples(metrics, "kanmoe_model_info")
    assert info == [
        ({"model": "m", "version": "1", "providers": "CUDAExecutionProvider,CPUExecutionProvider"},
         1.0)
    ]  # fmt: skip


def test_request_and_rejection_labels_stay_bounded():
    metrics = ServiceMetrics()
    metrics.add_model(make_spec(), ["CPUExecutionProvider"])
    for i, status in enumerate([200, 201, 204, 400, 404, 413, 422, 429, 500, 503] * 3):
        metrics.observe_request("m", "v1_predict", status, 0.001 * (i + 1))
    for i in range(50):  # clients probing model names must not create series
        metrics.observe_request(f"nope{i}", "v2_infer", 404, 0.001)
        metrics.observe_rejection(f"nope{i}", "not_ready")
    metrics.observe_rejection("m", "queue_full")
    metrics.observe_request("", "metrics", 200, 0.0001)
    series = {
        (lab["model"], lab["route"], lab["status"])
        for lab, _ in samples(metrics, "kanmoe_request_duration_seconds_count")
    }
    assert series == {
        ("m", "v1_predict", "2xx"), ("m", "v1_predict", "4xx"), ("m", "v1_predict", "5xx"),
        (UNKNOWN_MODEL, "v2_infer", "4xx"), ("", "metrics", "2xx"),
    }  # fmt: skip
    assert value(metrics, "kanmoe_request_duration_seconds_count", status="4xx", model="m") == 15
    assert value(metrics, "kanmoe_rejected_total", model=UNKNOWN_MODEL, reason="not_ready") == 50
    assert value(metrics, "kanmoe_rejected_total", model="m", reason="queue_full") == 1
    assert [status_class(s) for s in (100, 299, 302, 499, 599, 600, 0)] == [
        "1xx", "2xx", "3xx", "4xx", "5xx", "other", "other"
    ]  # fmt: skip


def test_remove_model_drops_its_series_and_ignores_late_batches():
    rng = np.random.default_rng(9)
    metrics = ServiceMetrics()
    v1, v2, other = make_spec(version="1"), make_spec(version="2"), make_spec("other")
    for spec in (v1, v2, other):
        metrics.add_model(spec, ["CPUExecutionProvider"])
        observe(metrics, spec, dirichlet(rng, 10), np.full((10, 4), 5.0, np.float32))
        metrics.observe_request(spec.name, "v1_predict", 200, 0.01)
        metrics.observe_rejection(spec.name, "queue_full")
    metrics.remove_model("m", "1")
    body = metrics.render()[0].decode()
    assert 'version="1"' in body  # other/1 is still there
    assert not [s for s in body.splitlines() if 'model="m"' in s and 'version="1"' in s]
    # The model keeps its request/rejection series while a version is loaded...
    assert value(metrics, "kanmoe_rejected_total", model="m", reason="queue_full") == 2
    assert value(metrics, "kanmoe_rejected_total", model="m", reason="timeout") == 0
    metrics.remove_model("m", "2")
    metrics.remove_model("m", "2")  # twice: a no-op
    body = metrics.render()[0].decode()
    assert 'model="m"' not in body  # ... and loses them with its last version
    assert value(metrics, "kanmoe_rows_total", model="other") == 10
    observe(metrics, v1, dirichlet(rng, 10))  # a batch finishing after the unload: ignored
    assert 'model="m"' not in metrics.render()[0].decode()


def test_observe_batch_rejects_wrong_shapes_with_a_message():
    metrics, spec = ServiceMetrics(), make_spec()
    metrics.add_model(spec, ["CPUExecutionProvider"])
    w, x = np.full((4, 3), 1 / 3, np.float32), np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="layer 'moe' have shape"):
        metrics.observe_batch(spec, 4, 0.001, x, {"moe": w[:, :2]})
    with pytest.raises(ValueError, match="layer 'moe' missing"):
        metrics.observe_batch(spec, 4, 0.001, x, {"other": w})
    with pytest.raises(ValueError, match="raw inputs have shape"):
        metrics.observe_batch(spec, 4, 0.001, x[:, :3], {"moe": w})
    with pytest.raises(ValueError, match="drift_window"):
        ServiceMetrics(drift_window=0)


def test_concurrent_batches_are_all_counted():
    metrics, spec = ServiceMetrics(drift_window=64), make_spec()
    metrics.add_model(spec, ["CPUExecutionProvider"])
    w = np.tile(np.array([[0.1, 0.2, 0.7]], np.float32), (16, 1))
    x = np.full((16, 4), 3.0, np.float32)

    def work() -> None:
        for _ in range(200):
            metrics.observe_batch(spec, 16, 0.001, x, {"moe": w})
            metrics.observe_request("m", "v1_predict", 200, 0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    scrape = threading.Thread(target=lambda: [metrics.render() for _ in range(20)])
    for t in [*threads, scrape]:
        t.start()
    for t in [*threads, scrape]:
        t.join()
    rows = 4 * 200 * 16
    assert value(metrics, "kanmoe_rows_total") == rows
    assert value(metrics, "kanmoe_expert_routed_total", expert="e2") == rows
    assert value(metrics, "kanmoe_expert_gate_weight_count", expert="e0") == rows
    assert value(metrics, "kanmoe_input_out_of_range_total", feature="f0", side="above") == rows
    assert value(metrics, "kanmoe_request_duration_seconds_count", model="m") == 800


def test_every_documented_metric_is_exported_with_its_type_and_labels():
    metrics, spec = ServiceMetrics(), make_spec()
    metrics.add_model(spec, ["CPUExecutionProvider"])
    observe(metrics, spec, dirichlet(np.random.default_rng(10), 8))
    metrics.observe_request("m", "v1_predict", 200, 0.01)
    metrics.observe_rejection("m", "too_large")
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name, kind, labels, help_text in METRIC_DOCS:
        family = families[name.removesuffix("_total")]
        assert family.type == kind and family.documentation == help_text, name
        sample_labels = {k for s in family.samples for k in s.labels} - {"le"}
        assert sample_labels == set(labels), name
    # The plain Histogram/Counter also export *_created gauges (unless prometheus_client's
    # PROMETHEUS_DISABLE_CREATED_SERIES is set); they are not metrics of their own.
    exported = {n for n in families if n.startswith("kanmoe_") and not n.endswith("_created")}
    assert exported == {n.removesuffix("_total") for n, *_ in METRIC_DOCS}
    assert any(n.startswith("process_") for n in families)  # process collector on Linux
    assert "python_info" in families


def test_render_speaks_openmetrics_when_asked():
    metrics, spec = ServiceMetrics(), make_spec()
    metrics.add_model(spec, ["CPUExecutionProvider"])
    observe(metrics, spec, dirichlet(np.random.default_rng(11), 8))
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}
    assert families["kanmoe_expert_routed"].type == "counter"
    assert families["kanmoe_expert_gate_weight"].type == "histogram"


def test_default_registry_is_private_per_instance():
    a, b = ServiceMetrics(), ServiceMetrics()
    a.add_model(make_spec(), ["CPUExecutionProvider"])
    assert a.registry is not b.registry
    assert samples(b, "kanmoe_model_info") == []


def test_reload_keeps_series_of_an_unchanged_version_and_restarts_a_changed_one():
    rng = np.random.default_rng(12)
    metrics, spec = ServiceMetrics(), make_spec()
    metrics.add_model(spec, ["CPUExecutionProvider"])
    observe(metrics, spec, dirichlet(rng, 10))
    same = make_spec()  # a reload: an equal spec, a new object, other providers
    metrics.add_model(same, ["CUDAExecutionProvider"])
    observe(metrics, spec, dirichlet(rng, 5))  # the old batcher draining: still counted
    observe(metrics, same, dirichlet(rng, 7))
    assert value(metrics, "kanmoe_rows_total") == 22
    assert samples(metrics, "kanmoe_model_info")[0][0]["providers"] == "CUDAExecutionProvider"
    changed = make_spec(reference=(0.6, 0.2, 0.2))  # re-exported with another reference
    metrics.add_model(changed, ["CPUExecutionProvider"])
    assert value(metrics, "kanmoe_rows_total") == 0
    observe(metrics, spec, dirichlet(rng, 5))  # a batch of the replaced version: ignored
    assert value(metrics, "kanmoe_rows_total") == 0
    assert len(samples(metrics, "kanmoe_model_info")) == 1
    metrics.remove_model("m", "1")  # one version counted once: removing it drops the model
    assert 'model="m"' not in metrics.render()[0].decode()


def test_buffered_batches_fold_in_order_past_the_threshold_and_on_scrape():
    """Batches are folded in chunks (FOLD_ROWS rows, or at a scrape); nothing is lost or
    reordered: counts, out-of-range rows and the drift window equal a one-shot numpy pass."""
    from kanmoe.service.metrics import FOLD_ROWS

    rng = np.random.default_rng(3)
    metrics, spec = ServiceMetrics(drift_window=500), make_spec()
    metrics.add_model(spec, ["CPUExecutionProvider"])
    ws, xs = [], []
    for _ in range(2 * FOLD_ROWS // 97 + 3):  # crosses the threshold twice, leaves a tail
        w = dirichlet(rng, 97)
        x = rng.uniform(-2, 3, size=(97, len(FEATURES))).astype(np.float32)
        observe(metrics, spec, w, x)
        ws.append(w)
        xs.append(x)
    w, x = np.concatenate(ws), np.concatenate(xs)
    lab = dict(model="m", version="1", layer="moe")
    for e, expert in enumerate(EXPERTS):
        assert value(metrics, "kanmoe_expert_gate_weight_count", expert=expert, **lab) == len(w)
        assert value(metrics, "kanmoe_expert_routed_total", expert=expert, **lab) == int(
            (w.argmax(1) == e).sum()
        )
    for f, feature in enumerate(FEATURES):
        got = value(metrics, "kanmoe_input_out_of_range_total", feature=feature, side="above")
        assert got == int((x[:, f] > 2.0).sum())
    live = w[-500:].astype(np.float64).mean(0)
    want = jensenshannon(live / live.sum(), np.asarray(REFERENCE), base=2) ** 2
    assert value(metrics, "kanmoe_gate_drift", **lab) == pytest.approx(want, rel=1e-6)


def test_rejection_series_start_at_zero_for_every_reason():
    """rate() needs a sample before the first refusal: each reason exists at 0 on load."""
    from kanmoe.service.metrics import REJECTION_REASONS

    metrics, spec = ServiceMetrics(), make_spec()
    metrics.add_model(spec, ["CPUExecutionProvider"])
    for reason in REJECTION_REASONS:
        assert value(metrics, "kanmoe_rejected_total", model="m", reason=reason) == 0
