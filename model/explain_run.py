"""``kanmoe explain``'s work: feature importance of a run, as ``importance.json`` and a plot.

Scores are computed on (up to 2,048) training rows as the network sees them (standardised
and clipped), so they are per raw feature: every feature has spread 1 there, and rotations or
MoE input transforms inside the network are differentiated through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .attribution import feature_importance
from .run import atomic_write_text, load_run
from .run_inspect import probe_inputs, scaled_inputs

IMPORTANCE_FILE = "importance.json"
PLOT_FILE = "feature_importance.png"


def _ranked(names: list[str], group: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [
        {"feature": n, "score": s, "share": sh}
        for n, s, sh in zip(names, group["scores"], group["shares"], strict=True)
    ]
    return sorted(rows, key=lambda r: -r["score"])


def importance_report(run_dir: str | Path, rows: int = 2048, write: bool = True) -> dict[str, Any]:
    """Feature importance of the run in ``run_dir``; writes importance.json and the plot."""
    servable = load_run(run_dir)
    x_raw, source = probe_inputs(servable, rows=rows)
    imp = feature_importance(servable.model, scaled_inputs(servable, x_raw))
    names = list(servable.feature_names)
    report: dict[str, Any] = {
        "run": str(Path(run_dir)),
        "rows": int(x_raw.shape[0]),
        "data": source,
        "model": {"method": imp["model"]["method"], "ranking": _ranked(names, imp["model"])},
        "moe": {
            layer: {
                "experts": {e["name"]: _ranked(names, e) for e in parts["experts"]},
                "gate": _ranked(names, parts["gate"]),
            }
            for layer, parts in imp["moe"].items()
        },
    }
    if write:
        atomic_write_text(Path(run_dir) / IMPORTANCE_FILE, json.dumps(report, indent=1) + "\n")
        plot_importance(report, Path(run_dir) / "plots" / PLOT_FILE)
    return report


def _panels(report: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    panels = [(f"whole model ({report['model']['method']})", report["model"]["ranking"])]
    for layer, parts in report["moe"].items():
        for expert, ranking in parts["experts"].items():
            panels.append((f"{layer}: {expert}", ranking))
        panels.append((f"{layer}: gate", parts["gate"]))
    return panels


def plot_importance(report: dict[str, Any], path: str | Path, top: int = 12) -> Path:
    """Ranked horizontal bars (share of the total score), one panel per expert and gate."""
    from .plots import plt, save_figure

    panels = _panels(report)
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    n = min(top, len(panels[0][1]))
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 0.3 * n * rows + 1.2 * rows + 0.4), squeeze=False
    )
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.axis("off")
            continue
        title, ranking = panels[k]
        shown = ranking[:n][::-1]  # largest on top
        values = np.array([r["share"] for r in shown])
        ax.barh(
            range(len(shown)), values, color="tab:blue" if "gate" not in title else "tab:orange"
        )
        ax.set_yticks(range(len(shown)), [r["feature"] for r in shown], fontsize=7)
        ax.set_xlim(0, max(0.05, float(values.max()) * 1.15) if len(values) else 1)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("share of importance", fontsize=7)
    fig.suptitle(f"Feature importance ({report['data']}, {report['rows']} rows)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
