"""Readable plots of every KAN layer of a run: named inputs, raw units, data range only.

One figure per KAN layer (plain stack, each MoE expert, the GRKAN gate), one panel per
input. Each panel draws that input's strongest edges (by spread over the data) only over
the range the training data cover, so no panel shows the untrained part of the grid (a
ReLU-fed gate input never goes below 0), with the data's density shaded underneath (square
root, so the rest stays visible next to a ReLU's spike at 0).
Inputs that are network features are labelled with their names and drawn against raw
feature units: the layer sees ``w · (x - mean) / std`` (MoE input transform ``w``), so the
raw value is ``mean + std · h / w``. Hidden units and rotation projections keep their own
units. Panels with many inputs are capped (``max_inputs``); the title says so.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .run import ServableModel, load_run
from .run_inspect import KANLayerInfo, capture_inputs, kan_layers, probe_inputs


def raw_axis(info: KANLayerInfo, servable: ServableModel, p: int) -> tuple[float, float] | None:
    """(offset, factor) with raw = offset + factor · h for a named feature input, else None."""
    if not info.named_inputs or info.input_scale is None or p >= servable.n_features:
        return None
    w = float(info.input_scale[p])
    if abs(w) < 1e-12:
        return None
    return float(servable.x_mean[p]), float(servable.x_std[p]) / w


@torch.no_grad()
def plot_kan_layer(
    info: KANLayerInfo,
    servable: ServableModel,
    h: torch.Tensor,
    path: str | Path,
    max_inputs: int = 24,
    edges_per_input: int = 4,
    n_points: int = 150,
) -> Path:
    """Figure of ``info.layer`` over the data ``h`` (N, in) that reaches it; saved to ``path``."""
    from .plots import plt, save_figure

    layer = info.layer
    h = h.reshape(-1, layer.in_features).to(layer.grid_scale)
    lo, hi = h.min(0).values, h.max(0).values
    steps = torch.linspace(0, 1, n_points, dtype=h.dtype)[:, None]
    xs = lo + (hi - lo) * steps  # (P, in) over the data range only
    acts = layer.edge_activations(xs).cpu().numpy()  # (P, out, in)
    spread = layer.edge_activations(h[:2048]).std(0).cpu().numpy()  # (out, in)
    keep = layer.edge_mask.cpu().numpy() > 0
    n_in = min(layer.in_features, max_inputs)
    cols = min(6, n_in)
    rows = (n_in + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows + 0.5), squeeze=False)
    hn = h.cpu().numpy()
    for p, ax in enumerate(axes.flat):
        if p >= n_in:
            ax.axis("off")
            continue
        raw = raw_axis(info, servable, p)
        x_plot = xs[:, p].cpu().numpy()
        data = hn[:, p]
        if raw is not None:
            x_plot, data = raw[0] + raw[1] * x_plot, raw[0] + raw[1] * data
        order = [q for q in np.argsort(-spread[:, p]) if keep[q, p]][:edges_per_input]
        for q in order:
            ax.plot(x_plot, acts[:, q, p], lw=1.1, label=f"→{q}")
        if order:
            y0, y1 = ax.get_ylim()
            dens, edges = np.histogram(data, bins=40, range=(x_plot.min(), x_plot.max()))
            if dens.max() > 0:
                height = (y1 - y0) * 0.25 * np.sqrt(dens / dens.max())  # √: ReLU spikes at 0
                ax.fill_between(
                    np.repeat(edges, 2)[1:-1], y0, y0 + np.repeat(height, 2), color="0.85", lw=0
                )
            ax.set_ylim(y0, y1)
            ax.legend(fontsize=5, loc="upper right", frameon=False)
        unit = "" if raw is not None else (" (scaled)" if info.named_inputs else "")
        ax.set_title(f"{info.input_names[p]}{unit}", fontsize=7)
        ax.tick_params(labelsize=5)
    shown = "" if n_in == layer.in_features else f", first {n_in} of {layer.in_features} inputs"
    fig.suptitle(
        f"{info.label}: KAN {layer.in_features}→{layer.out_features} ({layer.basis}), "
        f"{edges_per_input} strongest edges per input{shown}; grey: √ training-data density",
        fontsize=8,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def plot_file_name(label: str) -> str:
    return "kan_" + re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") + ".png"


def write_kan_plots(
    run_dir: str | Path, servable: ServableModel | None = None, x_raw: torch.Tensor | None = None
) -> list[Path]:
    """``plots/kan_<label>.png`` for every KAN layer of the run; returns the written paths.

    ``x_raw``: raw training inputs (N, F) when the caller has them (training does), else
    the run's training split is loaded again.
    """
    servable = servable if servable is not None else load_run(run_dir)
    if x_raw is None:
        x_raw, _ = probe_inputs(servable)
    x_raw = torch.as_tensor(np.asarray(x_raw), dtype=torch.float32)[:2048]
    infos = kan_layers(servable, x_raw)
    seen = capture_inputs(servable.model, [i.layer for i in infos], lambda: servable(x_raw))
    out = Path(run_dir) / "plots"
    return [
        plot_kan_layer(info, servable, seen[id(info.layer)], out / plot_file_name(info.label))
        for info in infos
    ]
