"""Plot every learned 1-D edge function of a KAN layer (in x out grid of small plots)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from .layers import KANLinear


def save_figure_atomic(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Write ``fig`` as PNG to ``path`` through a temp file + os.replace (no torn files)."""
    from .run import atomic_save

    path = Path(path)
    FigureCanvasAgg(fig)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return path


@torch.no_grad()
def plot_layer(
    layer: KANLinear,
    path: str | os.PathLike[str] | None = None,
    max_inputs: int = 16,
    max_outputs: int = 16,
    n_points: int = 200,
) -> Figure:
    """One figure, rows = outputs q, columns = inputs p, each panel phi_{q,p}(x_p).

    The x range of input p is its current grid (after ``update_grid``) widened by 10%.
    Pruned edges are drawn grey, locked edges red. Layers larger than
    ``max_inputs`` x ``max_outputs`` show the first edges only (the title says so).
    """
    n_in = min(layer.in_features, max_inputs)
    n_out = min(layer.out_features, max_outputs)
    xs = layer.input_domain(n_points)[:, :n_in]  # (n_points, in) raw input values
    full = torch.zeros(n_points, layer.in_features, dtype=xs.dtype, device=xs.device)
    full[:, :n_in] = xs
    acts = layer.edge_activations(full)[:, :n_out, :n_in].cpu()  # (n_points, out, in)
    xs = xs.cpu()
    keep = layer.edge_mask[:n_out, :n_in].cpu()
    locked = layer.lock_mask[:n_out, :n_in].cpu()
    fig = Figure(figsize=(1.6 * n_in + 0.6, 1.2 * n_out + 0.6), layout="constrained")
    axes = fig.subplots(n_out, n_in, squeeze=False)
    for q in range(n_out):
        for p in range(n_in):
            ax = axes[q][p]
            color = "0.7" if keep[q, p] == 0 else ("tab:red" if locked[q, p] else "tab:blue")
            ax.plot(xs[:, p].numpy(), acts[:, q, p].numpy(), color=color, lw=1.2)
            ax.tick_params(labelsize=5)
            if q == n_out - 1:
                ax.set_xlabel(f"x{p}", fontsize=7)
            if p == 0:
                ax.set_ylabel(f"y{q}", fontsize=7)
    shown = "" if (n_in, n_out) == (layer.in_features, layer.out_features) else " (first edges)"
    fig.suptitle(
        f"KANLinear[{layer.basis}] {layer.in_features}->{layer.out_features}{shown}", fontsize=9
    )
    if path is not None:
        save_figure_atomic(fig, path)
    return fig
