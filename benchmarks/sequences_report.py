"""Rendering for benchmarks/sequences.py: the mean ± std table with paired differences, the
RESULTS.md section text and the gates-vs-regime plot (kept apart from the training code)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd
import results_file  # sibling module: the scripts run as files, not as a package

REFERENCE = "GRU (minimal)"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows: list[dict], datasets: list[str], horizons: list[int], models: list[str]) -> str:
    """Mean ± std test R² per cell, s/epoch, and KAMoE_GRU − GRU per horizon (paired by seed)."""
    lines = []
    for ds in datasets:
        head = (
            "| model | "
            + " | ".join(f"h={h} R²" for h in horizons)
            + " | mean R² | s/epoch | epochs |"
        )
        lines += [f"**{ds}**", "", head, "|" + "---|" * (len(horizons) + 4)]
        for m in models:
            cells, means, spe, eps = [], [], [], []
            for h in horizons:
                got = [r for r in rows if (r["dataset"], r["model"], r["horizon"]) == (ds, m, h)]
                if not got:
                    cells.append("–")
                    continue
                mu, sd = mean_std([r["test_r2"] for r in got])
                means.append(mu)
                spe += [r["sec_per_epoch"] for r in got]
                eps += [r["epochs"] for r in got]
                cells.append(f"{mu:.3f} ± {sd:.3f}")
            if not means:
                continue
            lines.append(
                f"| {m} | " + " | ".join(cells) + f" | {statistics.fmean(means):.3f} | "
                f"{statistics.median(spe):.2f} | {statistics.fmean(eps):.0f} |"
            )
        lines.append("")
        tags = {m[len("GRU") :] for m in models if m.startswith("GRU (") and m != REFERENCE}
        pairs = [("KAMoE_GRU", "GRU"), ("GRU", REFERENCE)]
        pairs += [(f"KAMoE_GRU{t}", f"GRU{t}") for t in sorted(tags)]
        pairs += [(f"GRU{t}", REFERENCE) for t in sorted(tags)]
        for a, b in pairs:
            diffs = []
            for h in horizons:
                pa = {
                    r["seed"]: r["test_r2"]
                    for r in rows
                    if (r["dataset"], r["model"], r["horizon"]) == (ds, a, h)
                }
                pb = {
                    r["seed"]: r["test_r2"]
                    for r in rows
                    if (r["dataset"], r["model"], r["horizon"]) == (ds, b, h)
                }
                d = [pa[s] - pb[s] for s in sorted(pa.keys() & pb.keys())]
                if d:
                    mu, sd = mean_std(d)
                    diffs.append(f"h={h}: {mu:+.3f} ± {sd:.3f}")
            if diffs:
                lines.append(f"- {a} − {b} (paired by seed): " + "; ".join(diffs))
        for m in (m for m in models if m.startswith("KAMoE_GRU")):
            nmis = [r["nmi"] for r in rows if (r["dataset"], r["model"]) == (ds, m) and "nmi" in r]
            if nmis:
                mu, sd = mean_std(nmis)
                lines.append(f"- {m} routed expert vs true regime, NMI: {mu:.3f} ± {sd:.3f}")
        lines.append("")
    return "\n".join(lines)


def plot_gates(
    rows: pd.DataFrame, gate_cols: list[str], nmi: float, test_start: int, plots: Path
) -> Path:
    """Gate weights at each window's last step over one series vs its true regime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 4.2), sharex=True, height_ratios=[3, 1])
    for col in gate_cols:
        ax1.plot(rows["time"], rows[col], label=col.split(".")[-1], lw=1.2)
    ax1.set_ylabel("gate weight")
    ax1.legend(loc="upper right", ncols=len(gate_cols), fontsize=8)
    series = rows["series"].iloc[0]
    ax1.set_title(
        f"KAMoE_GRU gate at each step vs true regime, series {series} (test NMI {nmi:.2f})"
    )
    for ax in (ax1, ax2):
        ax.axvline(test_start, color="grey", ls="--", lw=1)
    ax1.text(
        test_start, 0.02, " test", transform=ax1.get_xaxis_transform(), fontsize=8, color="grey"
    )
    ax2.step(rows["time"], rows["regime"], where="post", color="k")
    ax2.set_yticks(sorted(set(rows["regime"].tolist())))
    ax2.set_ylabel("regime")
    ax2.set_xlabel("time step")
    fig.tight_layout()
    plots.mkdir(parents=True, exist_ok=True)
    path = plots / "gates_vs_regime.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def section_text(args, text: str) -> str:
    """The whole ``sequences`` section: how it was run, the table, then the notes."""
    return (
        "## Sequences: minimal paper-recipe GRU vs kanmoe's sequence models\n\n"
        f"`python benchmarks/sequences.py` on {results_file.machine_line()}, "
        f"{args.threads} torch thread(s). Hidden widths {args.hidden}, seeds {args.seeds}, "
        f"at most {args.max_epochs} epochs (early stopping ends most runs first), windows of "
        + (f"{args.lookback} steps" if args.lookback else "max(45, 5·h) steps")
        + ". Test R² is over all horizon steps in the normalised units."
        + (f" Overrides: {args.overrides}." if args.overrides else "")
        + "\n\n"
        + text
        + ("\n" + args.notes.read_text() if args.notes else "")
    )
