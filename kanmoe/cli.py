"""The ``kanmoe`` command line: train, export, serve, predict, bench, plot.

Sub-commands live in ``kanmoe.commands.*`` and import heavy packages lazily.
"""

import importlib

import typer

from kanmoe import __version__

app = typer.Typer(
    name="kanmoe",
    help="Train, export and serve Kolmogorov-Arnold Networks and KAN Mixtures of Experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines register(app). A module that does not exist yet is simply absent.
_COMMAND_MODULES = ("train", "export", "serve", "symbolic", "explain")


@app.command()
def version() -> None:
    """Print the kanmoe version."""
    typer.echo(__version__)


for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"kanmoe.commands.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"kanmoe.commands.{_name}":
            raise
        continue
    _module.register(app)


if __name__ == "__main__":
    app()
