"""CLI sub-commands, one module per area; each exposes ``register(app)``.

Modules import torch (and other heavy packages) inside the command functions only, so that
``kanmoe --help`` and ``kanmoe serve`` start without torch.
"""

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from kanmoe.errors import KanmoeError, one_line

P = ParamSpec("P")
R = TypeVar("R")


def one_line_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn kanmoe's own errors (and ValueError/OSError) into one line and exit 2.

    OSError covers what the user's machine refuses (a path that is a file, a full disk, no
    permission): things to fix outside kanmoe, not bugs worth a traceback. Messages that span
    lines (a parity table, a library's multi-line text) are joined with "; " so that scripts
    reading stderr always get exactly one line.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (KanmoeError, ValueError, OSError) as exc:
            typer.echo(f"error: {one_line(exc)}", err=True)
            sys.exit(2)

    return wrapper
