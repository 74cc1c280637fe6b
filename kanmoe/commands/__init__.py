"""CLI sub-commands, one module per area; each exposes ``register(app)``.

Modules import torch (and other heavy packages) inside the command functions only, so that
``kanmoe --help`` and ``kanmoe serve`` start without torch.
"""

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from kanmoe.errors import KanmoeError

P = ParamSpec("P")
R = TypeVar("R")


def one_line_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn kanmoe's own errors (and ValueError/FileNotFoundError) into one line and exit 2."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (KanmoeError, ValueError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper
