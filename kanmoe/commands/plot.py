"""``kanmoe plot``: readable figures of every learned KAN layer of a run.

torch and matplotlib are imported inside the command so ``kanmoe --help`` stays light.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kanmoe.commands import one_line_errors


def register(app: typer.Typer) -> None:
    @app.command()
    @one_line_errors
    def plot(
        run_dir: Path = typer.Argument(..., help="trained run dir (config.yaml, weights, ...)"),
    ) -> None:
        """Write RUN_DIR/plots/kan_<layer>.png for every KAN layer (experts and gate too)."""
        from kanmoe.model.kan_run_plots import write_kan_plots

        written = write_kan_plots(run_dir)
        if not written:
            raise ValueError(f"run {run_dir} has no KAN layers to plot")
        for path in written:
            typer.echo(f"wrote {path}")
