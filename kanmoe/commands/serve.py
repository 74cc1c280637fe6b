"""``kanmoe serve``: the REST service (not built yet; the service issue adds it)."""

import sys
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        repository: Path = typer.Option(Path("model_repository"), help="model repository"),
        host: str = typer.Option("0.0.0.0", help="address to bind"),
        port: int = typer.Option(8000, help="port to bind"),
    ) -> None:
        """Serve the models in REPOSITORY over REST (FastAPI + ONNX Runtime)."""
        typer.echo(
            "error: the serving layer (kanmoe.service) is not built yet; "
            f"models in {repository} can be run with onnxruntime directly "
            "(see README, 'Export').",
            err=True,
        )
        sys.exit(1)
