"""The HTML model card: one self-contained page that says what a served model is and does.

It shows the version's training metrics, its experts with the reference gate shares (from
``kanmoe.json``) next to the live traffic share (the service's own counters), the feature
ranges, and the learned KAN edge functions from ``functions.json`` as inline SVG drawn here
on the server. The page loads nothing from anywhere (no external CSS, JS or fonts: the
service may run offline), and every string that comes from a file is HTML-escaped.

Plots: one ``<svg class="kan-panel">`` per (first KAN layer of a stack, input) with that
input's strongest edges over the data range and the data density underneath (square root,
as in ``kanmoe`` run plots); deeper KAN layers are summarised by one ``<svg
class="kan-summary">`` heat map of every edge's spread. Pure functions of their inputs: the
route module caches the functions section per version.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from kanmoe.service.model_spec import ModelSpec

CARD_EDGES = 4  # curves drawn per panel: the strongest of those in functions.json
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
PANEL_W, PANEL_H = 170, 118  # seven panels to a row in a 1280-pixel window
PAD_L, PAD_R, PAD_T, PAD_B = 34, 6, 16, 18

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:20px;color:#222;
 background:#fff;max-width:1240px}
h1{margin:0 0 4px;font-size:24px}h2{margin:28px 0 8px;font-size:18px;border-bottom:1px solid #ddd}
h3{margin:18px 0 6px;font-size:14px}.sub{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}
.bar{display:inline-block;height:10px;background:#1f77b4;vertical-align:middle}
.bar.live{background:#ff7f0e}.note{color:#666;font-size:12px}
.grid{display:flex;flex-wrap:wrap;gap:3px}
svg text{font-family:inherit}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}" if math.isfinite(value) else _e(value)


def _bar(share: float | None, live: bool = False) -> str:
    if share is None:
        return '<span class="note">n/a</span>'
    width = max(0.0, min(1.0, share)) * 120
    cls = "bar live" if live else "bar"
    return f'<span class="{cls}" style="width:{width:.1f}px"></span> {share:.1%}'


# -- sections ---------------------------------------------------------------------------


def _metrics_section(metrics: Mapping[str, Any]) -> str:
    if not metrics:
        return "<h2>Training metrics</h2><p class='note'>none recorded in kanmoe.json</p>"
    splits = {k: v for k, v in metrics.items() if isinstance(v, Mapping)}
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
    out = ["<h2>Training metrics</h2>"]
    if splits:
        cols = sorted({c for v in splits.values() for c in v})
        head = "".join(f"<th>{_e(c)}</th>" for c in cols)
        rows = "".join(
            f"<tr><td>{_e(s)}</td>" + "".join(f"<td>{_num(v.get(c))}</td>" for c in cols) + "</tr>"
            for s, v in splits.items()
        )
        out.append(f'<table class="metrics"><tr><th>split</th>{head}</tr>{rows}</table>')
    if scalars:
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_num(v)}</td></tr>" for k, v in scalars.items())
        out.append(f"<table>{rows}</table>")
    return "".join(out)


def _experts_section(spec: ModelSpec, traffic: Mapping[str, Any] | None) -> str:
    out = ["<h2>Experts and traffic</h2>"]
    if not spec.gates:
        return out[0] + "<p class='note'>this model has no mixture-of-experts layer</p>"
    reference = spec.raw.get("gate_reference") or {}
    for gate in spec.gates:
        ref = reference.get(gate.layer) if isinstance(reference, Mapping) else None
        ref = ref if isinstance(ref, Mapping) else {}
        ref_top1 = ref.get("top1_shares") if isinstance(ref.get("top1_shares"), list) else None
        live = (traffic or {}).get(gate.layer)
        rows = int(live["rows"]) if live else 0
        if traffic is None:
            live_note = "live counters are off (KANMOE_METRICS=false)"
        else:
            live_note = f"live: {rows:,} rows served since this version loaded"
        ref_note = (
            f"reference: {_num(ref.get('rows'))} rows of the {_e(ref.get('split', '?'))} split"
            if ref
            else "no reference recorded at export"
        )
        out.append(
            f"<h3>MoE layer {_e(gate.layer)}</h3><p class='note'>{ref_note}; {live_note}</p>"
            "<table class='experts'><tr><th>expert</th><th>reference mean gate weight</th>"
            "<th>reference top-1 share</th><th>live mean gate weight</th>"
            "<th>live top-1 share</th></tr>"
        )
        for i, expert in enumerate(gate.experts):
            shares = gate.reference_shares
            live_mean = live["mean_weight"][i] if live and rows else None
            live_top1 = live["routed"][i] / rows if live and rows else None
            data = {
                "ref-mean": shares[i] if shares else None,
                "live-mean": live_mean,
                "live-top1": live_top1,
            }
            attrs = "".join(f' data-{k}="{v!r}"' for k, v in data.items() if v is not None)
            out.append(
                f'<tr class="expert" data-layer="{_e(gate.layer)}" data-expert="{_e(expert)}"'
                f"{attrs}>"
                f"<td>{_e(expert)}</td><td>{_bar(shares[i] if shares else None)}</td>"
                f"<td>{_bar(float(ref_top1[i]) if ref_top1 else None)}</td>"
                f"<td>{_bar(live_mean, True)}</td><td>{_bar(live_top1, True)}</td></tr>"
            )
        out.append("</table>")
    return "".join(out)


def _features_section(spec: ModelSpec, functions: Mapping[str, Any] | None) -> str:
    """Training ranges, and per expert how strongly its first KAN layer reacts to each input."""
    ranges = spec.feature_ranges or {}
    firsts = [
        layer
        for layer in (functions or {}).get("layers", [])
        if layer.get("depth") == 0 and layer.get("role") in ("expert", "kan")
    ]
    head = "".join(f"<th>{_e(layer['label'])} spread</th>" for layer in firsts)
    out = [
        "<h2>Features</h2><table class='features'><tr><th>feature</th><th>training min</th>"
        f"<th>training max</th>{head}</tr>"
    ]
    for p, name in enumerate(spec.feature_names):
        lo, hi = ranges.get(name, (None, None))
        cells = ""
        for layer in firsts:
            inputs = layer.get("inputs") or []
            if p >= len(inputs) or inputs[p].get("name") != name:
                cells += "<td>&ndash;</td>"  # this layer does not read the feature itself
                continue
            spread = layer.get("spread") or []
            total = sum(row[p] for row in spread if p < len(row) and row[p] is not None)
            cells += f"<td>{_num(float(total), 3)}</td>"
        out.append(f"<tr><td>{_e(name)}</td><td>{_num(lo)}</td><td>{_num(hi)}</td>{cells}</tr>")
    out.append("</table>")
    if firsts:
        out.append(
            "<p class='note'>spread: summed standard deviation over the training data of the "
            "input's edge functions in that first KAN layer (how much the layer reacts to it)</p>"
        )
    return "".join(out)


# -- plots --------------------------------------------------------------------------------


def _scale(lo: float, hi: float, a: float, b: float):
    span = hi - lo if hi > lo else 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _panel(layer: Mapping[str, Any], inp: Mapping[str, Any], edges: Sequence[Any]) -> str:
    """One input of a first KAN layer: its strongest edges and the data density."""
    xs = [float(v) for v in inp.get("x", [])]
    curves = [[v for v in e.get("y", [])] for e in edges[:CARD_EDGES]]
    title = str(inp.get("name", inp.get("index")))
    if inp.get("units") == "scaled":
        title += "*"  # the layer's note says: standardised units
    attrs = (
        f'class="kan-panel" data-layer="{_e(layer.get("label"))}" '
        f'data-input="{_e(inp.get("index"))}" data-edges="{len(curves)}" '
        f'width="{PANEL_W}" height="{PANEL_H}" viewBox="0 0 {PANEL_W} {PANEL_H}" '
        f'role="img" aria-label="{_e(layer.get("label"))}: {_e(title)}"'
    )
    parts = [
        f"<svg {attrs}>",
        f'<rect x="0.5" y="0.5" width="{PANEL_W - 1}" height="{PANEL_H - 1}" fill="#fff" '
        'stroke="#ddd"/>',
        f'<text x="{PANEL_W / 2:.0f}" y="11" font-size="10" text-anchor="middle">'
        f"{_e(title[:32])}</text>",
    ]
    values = [v for c in curves for v in c if isinstance(v, int | float)]
    if len(xs) < 2 or not values:
        parts.append(
            f'<text x="{PANEL_W / 2:.0f}" y="{PANEL_H / 2:.0f}" font-size="9" '
            'text-anchor="middle" fill="#888">no live edges</text></svg>'
        )
        return "".join(parts)
    x0, x1, y0, y1 = xs[0], xs[-1], min(values), max(values)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = PAD_L, PANEL_W - PAD_R, PAD_T, PANEL_H - PAD_B
    sx, sy = _scale(x0, x1, left, right), _scale(y0, y1, bottom, top)
    density = [float(d) for d in inp.get("density", []) if isinstance(d, int | float)]
    if density and max(density) > 0:
        # one step-shaped path for the whole histogram (square root: spikes leave room)
        peak, width = max(density), (right - left) / len(density)
        steps = [f"M{left},{bottom}"]
        for i, d in enumerate(density):
            y = bottom - 0.3 * (bottom - top) * math.sqrt(d / peak)
            steps.append(f"V{y:.1f}H{left + (i + 1) * width:.1f}")
        steps.append(f"V{bottom}Z")
        parts.append(f'<path class="density" d="{"".join(steps)}" fill="#e3e3e3"/>')
    parts.append(
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#999"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#999"/>'
    )
    for k, curve in enumerate(curves):
        pts = " ".join(
            f"{sx(x):.1f},{sy(y):.1f}"
            for x, y in zip(xs, curve, strict=False)
            if isinstance(y, int | float)
        )
        color = COLORS[k % len(COLORS)]
        parts.append(
            f'<polyline class="edge" data-out="{_e(edges[k].get("out"))}" points="{pts}" '
            f'fill="none" stroke="{color}" stroke-width="1.3"/>'
        )
    tick = 'font-size="8" fill="#555"'
    parts.append(
        f'<text x="{left}" y="{PANEL_H - 5}" {tick}>{_num(x0, 3)}</text>'
        f'<text x="{right}" y="{PANEL_H - 5}" {tick} text-anchor="end">{_num(x1, 3)}</text>'
        f'<text x="{left - 2}" y="{top + 7}" {tick} text-anchor="end">{_num(y1, 2)}</text>'
        f'<text x="{left - 2}" y="{bottom}" {tick} text-anchor="end">{_num(y0, 2)}</text>'
        "</svg>"
    )
    return "".join(parts)


def _heat(value: float, peak: float) -> str:
    t = 0.0 if peak <= 0 else max(0.0, min(1.0, value / peak))
    r, g, b = (int(255 - t * (255 - c)) for c in (31, 119, 180))
    return f"rgb({r},{g},{b})"


def _summary(layer: Mapping[str, Any]) -> str:
    """A deeper KAN layer: every edge's spread as one heat-map cell (outputs x inputs)."""
    spread = [
        [float(v) if isinstance(v, int | float) else 0.0 for v in row]
        for row in layer.get("spread", [])
    ]
    n_out, n_in = len(spread), max((len(r) for r in spread), default=0)
    cell = max(4, min(14, 480 // max(n_in, 1)))
    width, height = n_in * cell + 2, n_out * cell + 2
    peak = max((v for r in spread for v in r), default=0.0)
    rects = "".join(
        f'<rect x="{1 + p * cell}" y="{1 + q * cell}" width="{cell}" height="{cell}" '
        f'fill="{_heat(v, peak)}"/>'
        for q, row in enumerate(spread)
        for p, v in enumerate(row)
    )
    return (
        f'<svg class="kan-summary" data-layer="{_e(layer.get("label"))}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="edge spread of {_e(layer.get("label"))}">{rects}</svg>'
        f"<p class='note'>rows: {n_out} outputs, columns: {n_in} inputs; darker = larger "
        f"spread (max {_num(peak, 3)})</p>"
    )


def functions_section(functions: Mapping[str, Any] | None) -> str:
    """The learned-functions part of the card (static per version: cache it)."""
    out = ["<h2>Learned functions</h2>"]
    if functions is None:
        out.append(
            "<p class='note'>this version was exported without functions.json; "
            "re-export with kanmoe export</p>"
        )
        return "".join(out)
    data = functions.get("data") or {}
    out.append(
        f"<p class='note'>sampled at export over the range of {_e(data.get('source', '?'))} "
        f"({_num(data.get('rows'))} rows); up to {CARD_EDGES} strongest edges per input "
        "(colour = output), grey: square root of the data density. Named features are in raw "
        "units; * marks standardised units (e.g. rotated coordinate projections); hidden units "
        "are in their own.</p>"
    )
    for layer in functions.get("layers", []):
        label = _e(layer.get("label"))
        head = (
            f"<h3>{label}: KAN {_num(layer.get('in_features'))}&rarr;"
            f"{_num(layer.get('out_features'))} ({_e(layer.get('basis'))}, "
            f"{_e(layer.get('role'))})</h3>"
        )
        out.append(head)
        if layer.get("depth") != 0:
            out.append(_summary(layer))
            continue
        edges_by_input: dict[Any, list[Any]] = {}
        for edge in layer.get("edges", []):
            edges_by_input.setdefault(edge.get("in"), []).append(edge)
        panels = "".join(
            _panel(layer, inp, edges_by_input.get(inp.get("index"), []))
            for inp in layer.get("inputs", [])
        )
        out.append(f'<div class="grid" data-layer="{label}">{panels}</div>')
    formulas = ((functions.get("symbolic") or {}).get("formulas")) or []
    shown = [f for f in formulas if isinstance(f, Mapping) and f.get("formula")]
    if shown:
        out.append("<h3>Symbolic formulas</h3>")
        for f in shown:
            body = f["formula"] if isinstance(f["formula"], list) else [f["formula"]]
            out.append(
                f"<p><b>{_e(f.get('module'))}</b>: "
                + "<br>".join(f"<code>{_e(v)}</code>" for v in body)
                + "</p>"
            )
    return "".join(out)


def render_card(
    spec: ModelSpec,
    functions: Mapping[str, Any] | None,
    traffic: Mapping[str, Any] | None,
    functions_html: str | None = None,
) -> str:
    """The whole page: header, metrics, experts and traffic, features, learned functions.

    ``functions``: the version's functions.json (None: exported without it); ``traffic``:
    :meth:`ServiceMetrics.expert_traffic` (None: metrics off); ``functions_html``: a cached
    :func:`functions_section` of ``functions``.
    """
    if functions_html is None:
        functions_html = functions_section(functions)
    title = f"{spec.name} · version {spec.version}"
    info = (
        f"{spec.n_features} features &rarr; {_e(', '.join(spec.target_names))}"
        f" · kanmoe {_e(spec.kanmoe_version or '?')}"
        f" · config {_e(spec.config_hash or '?')}"
    )
    if spec.is_sequence:
        info += f" · sequences of {_num(spec.seq_len)} steps"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width'><title>{_e(title)}</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1><div class='sub'>{info}</div>"
        + _metrics_section(spec.metrics)
        + _experts_section(spec, traffic)
        + _features_section(spec, functions)
        + functions_html
        + "</body></html>"
    )
