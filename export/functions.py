"""``functions.json``: every learned 1-D KAN edge function of a run, sampled for serving.

The service cannot run torch, so what a KAN learned is sampled here, at export, into a small
JSON document that ``GET /v1/models/{m}/functions`` serves as is and the HTML model card
draws. Every ``KANLinear`` of the model is covered: a plain KAN stack, each MoE expert's KAN
layers and the GRKAN gate's two KAN layers.

Each input is sampled over the range the training data cover (min to max of what reaches
the layer), never the grid's untrained margins. Inputs that are network features are given
in RAW feature units with their names: the layer sees ``h = w · (x - mean) / std`` (MoE
input transform ``w``, standardisation of the run), so ``x = offset + factor · h`` with
``offset = mean`` and ``factor = std / w``; both are in the document, so a reader can map
any ``x`` back to what the layer receives. Rotation projections (``rot..``) and hidden
units stay in their own units ("scaled" and "hidden").

Size (the default model is a 3-expert KAMoE with 38 inputs x 32 outputs per expert, about
3,900 edges in all): sampling every edge would be ~1.6 MB, so the document keeps, for every
input of every layer, its ``edges_per_input`` (default 8) strongest live edges, strength
being the standard deviation of the edge's output over the data ("spread"), sampled at
``points`` (default 48) evenly spaced values; the full ``(out, in)`` spread matrix of each
layer is included too (3 significant digits), so no edge's strength is left out. Curves
are rounded to 5 significant digits, x axes to 7 (so mapping x back to the layer's input
loses nothing visible). The default model's document is about 0.5 MB.

Schema (``format`` 1; keys are stable, new keys may be added)::

    {"format": 1, "kanmoe_version", "model", "features": [...], "targets": [...],
     "data": {"source": "training data"|"Gaussian probe ...", "rows": N},
     "input_clip": 3.0|null,             # standardised inputs are clipped to ±this
     "points": 48, "edges_per_input": 8, "density_bins": 24,
     "layers": [{
        "label": "moe.expert_0.0", "path": "1.experts.0.0",
        "role": "kan"|"expert"|"gate", "moe": "moe"|null, "expert": 0|null,
        "depth": 0,                      # position among its stack's KAN layers (0 = first)
        "basis": "linear", "in_features": 38, "out_features": 32,
        "live_edges": 1216,              # edges not pruned
        "spread": [[...in] ...out],      # every edge's spread over the data
        "inputs": [{"index": 0, "name": "MedInc", "units": "raw"|"scaled"|"hidden",
                    "x": [...points],    # in the input's units
                    "to_layer": {"offset": m, "factor": f} | null,  # x = offset + factor*h
                    "density": [...bins]}],  # fraction of data rows per equal-width bin
        "edges": [{"in": 0, "out": 5, "y": [...points], "spread": 0.31,
                   "symbolic": {"form": "sin", "a", "b", "c", "d", "r2", "locked"} | null
                   }]}],       # "symbolic" only when the run has symbolic.json
     "symbolic": {"threshold": 0.99, "fitted_over": "training data",
                  "formulas": [...],   # as in symbolic.json
                  "layers": [{"label", "edges": 1216, "symbolic_edges": 37}]} | null}

Edges are listed input by input, strongest first within an input. A symbolic form reads
``y = a · form(b · h + c) + d`` in the layer's own input ``h`` (``kanmoe symbolic`` fits the
layer, not the raw feature); ``symbolic`` is null when ``RUN_DIR/symbolic.json`` is absent.
Only each sampled edge's best form is kept (the full table runs to megabytes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kanmoe.model.kan_run_plots import raw_axis

FUNCTIONS_FILE = "functions.json"
FORMAT = 1
POINTS = 48
EDGES_PER_INPUT = 8
DENSITY_BINS = 24
PROBE_ROWS = 1 << 15  # all of California Housing's 16,512 training rows
SPREAD_ROWS = 4096  # rows used to rank edges: edge_activations costs rows*in*out floats


def _round(values: Any, digits: int) -> Any:
    """Floats (nested lists too) rounded to ``digits`` significant digits, JSON-ready."""
    if isinstance(values, list):
        return [_round(v, digits) for v in values]
    v = float(values)
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def _stacks(servable: Any) -> dict[int, tuple[str, str | None, int | None]]:
    """id(KANLinear) -> (role, moe name, expert index) from the module tree."""
    from kanmoe.model.layers import KANLinear
    from kanmoe.model.moe import moe_layers

    found: dict[int, tuple[str, str | None, int | None]] = {}
    for name, moe in moe_layers(servable.model):
        for e, expert in enumerate(moe.experts):
            for m in expert.modules():
                if isinstance(m, KANLinear):
                    found.setdefault(id(m), ("expert", name, e))
        for m in moe.gate.modules():
            if isinstance(m, KANLinear):
                found.setdefault(id(m), ("gate", name, None))
    return found


@torch.no_grad()
def _layer_entry(
    info: Any,
    servable: Any,
    h: torch.Tensor,
    stack: tuple[str, str | None, int | None],
    depth: int,
    points: int,
    edges_per_input: int,
    density_bins: int,
) -> dict[str, Any]:
    layer = info.layer
    h = h.reshape(-1, layer.in_features).to(layer.grid_scale)
    lo, hi = h.min(0).values, h.max(0).values
    flat = (hi - lo) <= 1e-9 * (1 + hi.abs())  # a constant input: sample around its value
    lo, hi = torch.where(flat, lo - 0.5, lo), torch.where(flat, hi + 0.5, hi)
    steps = torch.linspace(0, 1, points, dtype=h.dtype, device=h.device)[:, None]
    xs = lo + (hi - lo) * steps  # (P, in), the data range of each input
    acts = layer.edge_activations(xs).double().cpu().numpy()  # (P, out, in)
    spread = layer.edge_activations(h[:SPREAD_ROWS]).double().std(0).cpu().numpy()  # (out, in)
    live = layer.edge_mask.cpu().numpy() > 0
    spread = np.where(live, spread, 0.0)
    hn, xn = h.double().cpu().numpy(), xs.double().cpu().numpy()
    inputs, edges = [], []
    for p in range(layer.in_features):
        raw = raw_axis(info, servable, p)
        x = xn[:, p] if raw is None else raw[0] + raw[1] * xn[:, p]
        counts, _ = np.histogram(hn[:, p], bins=density_bins, range=(xn[0, p], xn[-1, p]))
        units = "raw" if raw is not None else ("scaled" if info.named_inputs else "hidden")
        inputs.append(
            {
                "index": p,
                "name": info.input_names[p],
                "units": units,
                "x": _round(x.tolist(), 7),
                "to_layer": None
                if raw is None
                else {"offset": _round(raw[0], 9), "factor": _round(raw[1], 9)},
                "density": _round((counts / max(len(hn), 1)).tolist(), 4),
            }
        )
        order = [q for q in np.argsort(-spread[:, p], kind="stable") if live[q, p]]
        for q in order[:edges_per_input]:
            edges.append(
                {
                    "in": p,
                    "out": int(q),
                    "y": _round(acts[:, q, p].tolist(), 5),
                    "spread": _round(spread[q, p], 4),
                }
            )
    role, moe, expert = stack
    return {
        "label": info.label,
        "path": info.path,
        "role": role,
        "moe": moe,
        "expert": expert,
        "depth": depth,
        "basis": layer.basis,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "live_edges": int(live.sum()),
        "spread": _round(spread.tolist(), 3),
        "inputs": inputs,
        "edges": edges,
    }


def read_symbolic(run_dir: str | Path | None) -> dict[str, Any] | None:
    """The run's ``symbolic.json`` (``kanmoe symbolic``) or None when it has none."""
    if run_dir is None:
        return None
    from kanmoe.model.symbolic_run import SYMBOLIC_FILE

    path = Path(run_dir) / SYMBOLIC_FILE
    if not path.is_file():
        return None
    from kanmoe.errors import ExportError

    try:
        table = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(table, dict) or not isinstance(table.get("layers", []), list):
        raise ExportError(f"{path} is not a kanmoe symbolic table (no 'layers' list)")
    return table


def _edge_form(edge: dict[str, Any]) -> dict[str, Any] | None:
    best = edge.get("best")
    if not isinstance(best, dict) or "name" not in best:
        return None
    form = {k: _round(best[k], 4) for k in ("a", "b", "c", "d", "r2") if k in best}
    return {"form": str(best["name"]), **form, "locked": bool(edge.get("locked", False))}


def attach_symbolic(layers: list[dict[str, Any]], table: dict[str, Any]) -> dict[str, Any]:
    """Put each sampled edge's best symbolic form on it; return the document's summary.

    A default run's full table is ~1.4 MB (every candidate of ~3,900 edges), too much to
    serve, so the document keeps the best form of the edges it samples and, per layer, how
    many edges reach the threshold (or are locked), plus the run's formulas.
    """
    threshold = table.get("threshold")
    by_label = {t.get("label"): t for t in table.get("layers", []) if isinstance(t, dict)}
    summary = []
    for layer in layers:
        fitted = by_label.get(layer["label"])
        if fitted is None:
            continue
        forms = {(e.get("in"), e.get("out")): e for e in fitted.get("edges", [])}
        for edge in layer["edges"]:
            found = forms.get((edge["in"], edge["out"]))
            edge["symbolic"] = None if found is None else _edge_form(found)
        good = sum(
            1
            for e in forms.values()
            if e.get("locked")
            or (threshold is not None and (_edge_form(e) or {}).get("r2", -1.0) >= threshold)
        )
        summary.append({"label": layer["label"], "edges": len(forms), "symbolic_edges": good})
    return {
        "threshold": threshold,
        "fitted_over": table.get("fitted_over"),
        "formulas": table.get("formulas", []),
        "layers": summary,
    }


def functions_document(
    servable: Any,
    run_dir: str | Path | None = None,
    x_raw: Any = None,
    *,
    points: int = POINTS,
    edges_per_input: int = EDGES_PER_INPUT,
    density_bins: int = DENSITY_BINS,
) -> dict[str, Any]:
    """The JSON-ready ``functions.json`` document of ``servable`` (schema: module docstring).

    ``x_raw``: raw training inputs (N, F) or (N, L, F) when the caller has them; otherwise
    the run's training split is rebuilt (or, failing that, a Gaussian probe with the
    training mean and std is used, and ``data.source`` says so). ``run_dir``: where to find
    ``symbolic.json``.
    """
    from kanmoe import __version__
    from kanmoe.model.run_inspect import capture_inputs, kan_layers, probe_inputs

    for name, value, least in (
        ("points", points, 2),
        ("edges_per_input", edges_per_input, 1),
        ("density_bins", density_bins, 1),
    ):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if x_raw is None:
        x_raw, source = probe_inputs(servable, rows=PROBE_ROWS)
    else:
        source = "training data"
    x_raw = torch.as_tensor(np.asarray(x_raw), dtype=torch.float32)
    servable.eval()
    infos = kan_layers(servable, x_raw)
    seen = capture_inputs(servable.model, [i.layer for i in infos], lambda: servable(x_raw))
    stacks = _stacks(servable)
    depth: dict[tuple[str, str | None, int | None], int] = {}
    layers = []
    for info in infos:
        stack = stacks.get(id(info.layer), ("kan", None, None))
        d = depth.get(stack, 0)
        depth[stack] = d + 1
        h = seen[id(info.layer)]
        layers.append(
            _layer_entry(info, servable, h, stack, d, points, edges_per_input, density_bins)
        )
    table = read_symbolic(run_dir)
    return {
        "format": FORMAT,
        "kanmoe_version": __version__,
        "model": str(servable.config.get("name", "")),
        "features": list(servable.feature_names),
        "targets": list(servable.target_names),
        "data": {"source": source, "rows": len(x_raw)},
        # |standardised input| is clipped to this before the network: raw values past it
        # reach the first layers as the clip value, so their x axes end there.
        "input_clip": servable.input_clip,
        "points": points,
        "edges_per_input": edges_per_input,
        "density_bins": density_bins,
        "layers": layers,
        "symbolic": None if table is None else attach_symbolic(layers, table),
    }


def functions_json_bytes(doc: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON of ``doc`` (what is written and served)."""
    return (json.dumps(doc, separators=(",", ":"), allow_nan=False) + "\n").encode()


def write_functions(
    version_dir: str | Path, servable: Any, run_dir: str | Path | None = None, x_raw: Any = None
) -> Path:
    """Write ``version_dir/functions.json`` atomically (temp file + rename); returns its path."""
    from kanmoe.model.run import atomic_write_bytes

    path = Path(version_dir) / FUNCTIONS_FILE
    atomic_write_bytes(path, functions_json_bytes(functions_document(servable, run_dir, x_raw)))
    return path
