"""Run plots: learning curves, gate-weight distribution per expert, learned KAN functions.

Every figure is written atomically to ``run_dir/plots/*.png`` with the Agg backend (no
display needed). Plots that do not apply to a model (gates for a plain MLP) are skipped.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from torch import nn

from kanmoe.model.run import atomic_save, predict_raw


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def learning_curves(history: list[dict], path: str | Path) -> Path:
    """Train and validation loss (log scale) and the learning rate per epoch."""
    fig, (ax, ax_lr) = plt.subplots(
        2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    fig.subplots_adjust(hspace=0.08)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    if history:
        best = min(history, key=lambda h: h["val_loss"])
        ax.axvline(best["epoch"], color="grey", ls="--", lw=0.8, label=f"best (ep {best['epoch']})")
    ax.set_yscale("log")
    ax.set_ylabel("loss (scaled targets)")
    ax.legend()
    ax.set_title("Learning curves")
    ax_lr.plot(epochs, [h["lr"] for h in history], color="tab:green")
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("epoch")
    return save_figure(fig, path)


def gate_weights(
    gates: dict[str, np.ndarray], expert_names: dict[str, list[str]], path: str | Path
) -> Path:
    """Box plots of each expert's gate weight over the given rows, one panel per MoE layer."""
    layers = list(gates)
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 4), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        w = gates[layer].reshape(-1, gates[layer].shape[-1])
        names = expert_names.get(layer) or [f"expert_{i}" for i in range(w.shape[1])]
        ax.boxplot([w[:, i] for i in range(w.shape[1])], showfliers=False)
        ax.set_xticks(range(1, w.shape[1] + 1), names, fontsize=8)
        share = w.mean(axis=0)
        for i, s in enumerate(share):
            ax.annotate(f"mean {s:.2f}", (i + 1, 1.0), ha="center", fontsize=8)
        ax.set_ylim(0, 1.08)
        ax.set_title(f"gate weights: {layer}")
        ax.set_ylabel("weight (test set)")
    return save_figure(fig, path)


def _first_kan(module: nn.Module) -> nn.Module | None:
    from kanmoe.model.layers import KANLinear

    return next((m for m in module.modules() if isinstance(m, KANLinear)), None)


def gate_kan_layer(model: nn.Module) -> nn.Module | None:
    """The first KANLinear of the first GRKAN gate, if the model has one."""
    try:
        from kanmoe.model.gates import GRKANGate
    except ImportError:
        return None
    gate = next((m for m in model.modules() if isinstance(m, GRKANGate)), None)
    return _first_kan(gate) if gate is not None else None


def kan_functions(
    layer: nn.Module, path: str | Path, max_in: int = 8, max_out: int = 8, title: str = ""
) -> Path:
    """Learned edge functions phi_{q,p}: one panel per input p, one curve per output q.

    A compact view (first ``max_in`` inputs, first ``max_out`` outputs) instead of one panel
    per edge: a 32x32 gate layer would be 1,024 panels, slow to draw and unreadable.
    ``layer.plot()`` gives the full edge grid when wanted.
    """
    import torch

    n_in = min(layer.in_features, max_in)
    n_out = min(layer.out_features, max_out)
    with torch.no_grad():
        xs = layer.input_domain(120)  # (points, in) raw input values over each grid
        acts = layer.edge_activations(xs)  # (points, out, in)
    cols = min(4, n_in)
    rows = (n_in + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for p in range(rows * cols):
        ax = axes[p // cols][p % cols]
        if p >= n_in:
            ax.axis("off")
            continue
        for q in range(n_out):
            ax.plot(xs[:, p].numpy(), acts[:, q, p].numpy(), lw=1.0, label=f"y{q}")
        ax.set_title(f"input x{p}", fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=5, ncol=2)
    shown = f"first {n_in} of {layer.in_features} inputs, {n_out} of {layer.out_features} outputs"
    fig.suptitle(f"{title or 'KAN'} learned functions ({shown})", fontsize=9)
    return save_figure(fig, path)


def write_all_plots(
    run_dir: str | Path, servable: nn.Module, history: list[dict], x_test
) -> list[Path]:
    """All plots that apply to this model; returns the written paths."""
    plots = Path(run_dir) / "plots"
    written = [learning_curves(history, plots / "learning_curves.png")]
    model = servable.model
    if servable.expert_names:
        _, gates = predict_raw(servable, np.asarray(x_test))
        if gates:
            written.append(gate_weights(gates, servable.expert_names, plots / "gate_weights.png"))
    try:
        gate_kan = gate_kan_layer(model)
        if gate_kan is not None:
            path = plots / "gate_kan_functions.png"
            written.append(kan_functions(gate_kan, path, title="GRKAN gate layer 1"))
        elif servable.config.get("model", {}).get("kind") in ("kan", "kanmlp"):
            first = _first_kan(model)
            if first is not None:
                path = plots / "kan_functions.png"
                written.append(kan_functions(first, path, title="KAN layer 1"))
    except ImportError:
        pass
    if not servable.is_sequence:  # per-layer KAN plots read tabular inputs
        from kanmoe.model.kan_run_plots import write_kan_plots

        written += write_kan_plots(run_dir, servable, x_test)
    return written
