"""``kanmoe explain``: which features the model, each expert and each gate use.

torch and matplotlib are imported inside the command so ``kanmoe --help`` stays light.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kanmoe.commands import one_line_errors


def _line(title: str, ranking: list[dict], top: int) -> str:
    best = ", ".join(f"{r['feature']} {r['share']:.2f}" for r in ranking[:top])
    return f"{title}: {best}"


def register(app: typer.Typer) -> None:
    @app.command()
    @one_line_errors
    def explain(
        run_dir: Path = typer.Argument(..., help="trained run dir (config.yaml, weights, ...)"),
        rows: int = typer.Option(2048, "--rows", min=16, help="training rows to score on"),
        top: int = typer.Option(5, "--top", min=1, help="features to print per group"),
    ) -> None:
        """Rank the features of RUN_DIR: importance.json and plots/feature_importance.png."""
        from kanmoe.model.explain_run import IMPORTANCE_FILE, PLOT_FILE, importance_report

        report = importance_report(run_dir, rows=rows)
        typer.echo(f"scored on {report['rows']} rows ({report['data']})")
        typer.echo(_line(f"model ({report['model']['method']})", report["model"]["ranking"], top))
        for layer, parts in report["moe"].items():
            for expert, ranking in parts["experts"].items():
                typer.echo(_line(f"{layer} {expert}", ranking, top))
            typer.echo(_line(f"{layer} gate", parts["gate"], top))
        typer.echo(
            f"wrote {Path(run_dir) / IMPORTANCE_FILE} and {Path(run_dir) / 'plots' / PLOT_FILE}"
        )
