"""``kanmoe export``: a trained run dir -> a model-repository entry (ONNX + config.pbtxt).

torch and onnx are imported inside the command so ``kanmoe --help`` stays light.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kanmoe.commands import one_line_errors


def register(app: typer.Typer) -> None:
    @app.command()
    @one_line_errors
    def export(
        run_dir: Path = typer.Argument(..., help="trained run dir (config.yaml, weights, ...)"),
        repository: Path = typer.Option(
            Path("model_repository"), "--repository", "-r", help="model repository root"
        ),
        name: str = typer.Option(None, "--name", "-n", help="model name (default: run dir name)"),
        version: int = typer.Option(
            None, "--version", "-v", min=1, help="version number (default: next free)"
        ),
        check: bool = typer.Option(
            False, "--check", help="compare ORT and ReferenceEvaluator with torch before writing"
        ),
        force: bool = typer.Option(False, "--force", help="replace an existing version"),
    ) -> None:
        """Export RUN_DIR to REPOSITORY/NAME/VERSION/model.onnx with its config.pbtxt."""
        import logging

        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        from kanmoe.export.repository import export_run

        model_name = name or run_dir.resolve().name
        result = export_run(
            run_dir, repository, model_name, version=version, check=check, force=force
        )
        if result.report is not None:
            typer.echo(result.report.summary())
        typer.echo(f"wrote {result.written.onnx_path}")
