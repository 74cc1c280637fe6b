"""``kanmoe symbolic``'s work: the symbolic table of every KAN layer of a run, and formulas.

Each KAN layer (plain stack, MoE experts, GRKAN gate) is fitted over the range of the
activations that actually reach it on the training data (the grid's untrained margins
would spoil the fits), edges reaching the threshold are locked in memory only (the run's
weights are never rewritten), and every ``KAN`` stack whose live edges all became symbolic
gets a formula. For a run whose network is a plain KAN the formula is also given in raw
units: standardised inputs ``(X - mean) / std`` substituted and the target scaling undone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .layers import KAN
from .run import ServableModel, atomic_write_text, load_run
from .run_inspect import KANLayerInfo, capture_inputs, kan_layers, probe_inputs
from .symbolic import LibraryLike
from .symbolic_formula import EdgeReport, auto_symbolic_layer, round_floats, symbolic_formula

SYMBOLIC_FILE = "symbolic.json"


def _raw_formula(servable: ServableModel, exprs: list[Any], var_names: list[str]) -> list[Any]:
    """Standardised-unit formulas of the whole network rewritten in raw feature/target units."""
    import sympy as sp

    if servable.target_transform == "log":
        return []  # expm1 of a long sum: no formula worth printing
    subs = {
        sp.Symbol(n): (sp.Symbol(n) - float(m)) / float(s)
        for n, m, s in zip(
            var_names, servable.x_mean.tolist(), servable.x_std.tolist(), strict=True
        )
    }
    out = []
    for e, m, s in zip(exprs, servable.y_mean.tolist(), servable.y_std.tolist(), strict=True):
        raw = sp.expand(e.xreplace(subs) * float(s) + float(m))
        out.append(raw)
    return out


def _formulas(
    servable: ServableModel, infos: list[KANLayerInfo], digits: int
) -> list[dict[str, Any]]:
    by_layer = {id(i.layer): i for i in infos}
    out = []
    for path, module in servable.model.named_modules():
        if not isinstance(module, KAN):
            continue
        first = by_layer.get(id(module.layers[0]))
        names = first.input_names if first is not None else None
        try:
            exprs = symbolic_formula(module, names, simplify=True, digits=digits)
        except ValueError as exc:
            out.append({"module": path or "kan", "formula": None, "why_not": str(exc)})
            continue
        scale = first.input_scale if first is not None and first.named_inputs else None
        if scale is not None and names is not None and any(abs(w - 1.0) > 1e-6 for w in scale):
            import sympy as sp

            # the stack reads w ⊙ z (an MoE input transform): state it in z itself
            subs = {sp.Symbol(n): w * sp.Symbol(n) for n, w in zip(names, scale, strict=True)}
            exprs = [round_floats(sp.expand(e.xreplace(subs)), digits) for e in exprs]
        entry: dict[str, Any] = {
            "module": path or "kan",
            "inputs": "standardised features" if scale is not None else "hidden units",
            "formula": [str(e) for e in exprs],
        }
        if module is servable.model and scale is not None and names is not None:
            raw = _raw_formula(servable, exprs, names)
            if raw:
                entry["raw_units"] = {
                    t: str(round_floats(e, digits))
                    for t, e in zip(servable.target_names, raw, strict=True)
                }
                if servable.input_clip is not None:
                    entry["raw_units_valid"] = (
                        f"while every standardised input is within ±{servable.input_clip:g}"
                    )
        out.append(entry)
    return out


def symbolic_report(
    run_dir: str | Path,
    r2_threshold: float = 0.99,
    library: LibraryLike = None,
    digits: int = 4,
    n_points: int = 128,
    use_data: bool = True,
    write: bool = True,
) -> dict[str, Any]:
    """Fit every KAN edge of the run in ``run_dir``; write ``symbolic.json`` when ``write``."""
    servable = load_run(run_dir)
    if use_data:
        x_raw, source = probe_inputs(servable)
    else:
        x_raw, source = None, "grid"
    infos = kan_layers(servable, x_raw)
    if not infos:
        raise ValueError(f"run {run_dir} has no KAN layers (model kind without KANLinear)")
    reach: dict[int, torch.Tensor] = {}
    if x_raw is not None:
        reach = capture_inputs(servable.model, [i.layer for i in infos], lambda: servable(x_raw))
        if "Gaussian" in source:  # a probe tells the range poorly: fit over the grid
            reach, source = {}, "grid (training data not found)"
    layers = []
    for index, info in enumerate(infos):  # an edge's "layer" is its index in "layers"
        reports: list[EdgeReport] = auto_symbolic_layer(
            info.layer,
            r2_threshold,
            library,
            x=reach.get(id(info.layer)),
            layer_index=index,
            n_points=n_points,
        )
        layers.append(
            {
                "label": info.label,
                "module": info.path,
                "basis": info.layer.basis,
                "inputs": info.input_names,
                "edges": [{**r.to_dict(), "input": info.input_names[r.in_idx]} for r in reports],
            }
        )
    report = {
        "run": str(Path(run_dir)),
        "threshold": r2_threshold,
        "fitted_over": source,
        "layers": layers,
        "formulas": _formulas(servable, infos, digits),
    }
    if write:
        import json

        atomic_write_text(Path(run_dir) / SYMBOLIC_FILE, json.dumps(report, indent=1) + "\n")
    return report
