"""``kanmoe symbolic``: symbolic forms of every learned KAN edge of a run, and its formula.

torch and sympy are imported inside the command so ``kanmoe --help`` stays light.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import typer

from kanmoe.commands import one_line_errors


def _summary(layer: dict[str, Any], threshold: float) -> str:
    edges = layer["edges"]
    locked = [e for e in edges if e["locked"]]
    forms = Counter(e["best"]["name"] for e in locked)
    common = ", ".join(f"{name} {n}" for name, n in forms.most_common(6))
    return (
        f"{layer['label']} ({layer['basis']}, {len(layer['inputs'])} inputs): "
        f"{len(locked)}/{len(edges)} edges symbolic at R² >= {threshold:g}"
        + (f" [{common}]" if common else "")
    )


def _rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for layer in report["layers"]:
        for e in layer["edges"]:
            best = e["best"]
            form = best["name"] if best else "-"
            r2 = f"{best['r2']:.4f}" if best else "-"
            rows.append((layer["label"], e["input"], str(e["out"]), form, r2))
    return rows


def register(app: typer.Typer) -> None:
    @app.command()
    @one_line_errors
    def symbolic(
        run_dir: Path = typer.Argument(..., help="trained run dir (config.yaml, weights, ...)"),
        threshold: float = typer.Option(
            0.99, "--threshold", "-t", min=0.0, max=1.0, help="R² an edge needs to be symbolic"
        ),
        digits: int = typer.Option(4, "--digits", min=0, help="decimals of formula constants"),
        max_rows: int = typer.Option(
            60, "--max-rows", min=0, help="edge rows to print (all of them go to symbolic.json)"
        ),
        use_data: bool = typer.Option(
            True, "--data/--grid", help="fit over the training data's range, or the whole grid"
        ),
    ) -> None:
        """Fit a·f(b·x+c)+d to every KAN edge of RUN_DIR; write RUN_DIR/symbolic.json."""
        from kanmoe.model.symbolic_run import SYMBOLIC_FILE, symbolic_report

        report = symbolic_report(run_dir, threshold, digits=digits, use_data=use_data)
        typer.echo(f"fitted over: {report['fitted_over']}")
        for layer in report["layers"]:
            typer.echo(_summary(layer, threshold))
        rows = _rows(report)
        if rows and max_rows:
            header = ("layer", "input", "out", "best form", "R²")
            shown = [header, *rows[:max_rows]]
            widths = [max(len(r[i]) for r in shown) for i in range(5)]
            for r in shown:
                typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
            if len(rows) > max_rows:
                typer.echo(f"... {len(rows) - max_rows} more edges in {SYMBOLIC_FILE}")
        for f in report["formulas"]:
            if f["formula"] is None:
                typer.echo(f"no formula for {f['module']}: {f['why_not']}")
                continue
            for i, expr in enumerate(f["formula"]):
                typer.echo(f"formula {f['module']} output {i}: {expr}")
            for target, expr in f.get("raw_units", {}).items():
                typer.echo(f"raw units: {target} = {expr}")
            if "raw_units_valid" in f:
                typer.echo(f"  (valid {f['raw_units_valid']})")
        typer.echo(f"wrote {Path(run_dir) / SYMBOLIC_FILE}")
