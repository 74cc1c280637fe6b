"""``kanmoe serve``: serve a model repository over REST (FastAPI + ONNX Runtime).

The options are generated from :class:`kanmoe.service.settings.ServeSettings`, so every flag
has a ``KANMOE_*`` twin with the same name and ``--help`` lists them all. A flag given on the
command line wins over its environment variable. Nothing here imports torch.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import typer


def _option_type(annotation: Any) -> Any:
    text = str(annotation)
    if annotation is bool or text == "bool":
        return bool
    if annotation is int or text == "int":
        return int
    if annotation is float or text == "float":
        return float
    if annotation is Path or "Path" in text:
        return Path
    return str


def _parameters() -> list[inspect.Parameter]:
    from kanmoe.service.settings import ServeSettings

    params = []
    for name, field in ServeSettings.model_fields.items():
        kind = _option_type(field.annotation)
        flag = "--" + name.replace("_", "-")
        env = f"KANMOE_{name.upper()}"
        default = field.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = f"{field.description} (env {env}, default {shown})"
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        option = typer.Option(None, *decls, help=help_text, show_default=False)
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None
            )
        )
    ray_options = (
        ("ray", bool, typer.Option(False, "--ray", help="serve as a Ray Serve application: "
         "--replicas processes, each with its own ORT session and batcher, behind Ray's proxy "
         "on --host/--port (pip install 'kanmoe[ray]'; docs/scaling.md)")),
        ("replicas", int, typer.Option(2, "--replicas", min=1, help="Ray Serve replicas (--ray)")),
        ("replica_cpus", float, typer.Option(1.0, "--replica-cpus", min=0.0,
         help="Ray CPUs per replica (--ray; fractions share a core)")),
        ("ray_address", str | None, typer.Option(None, "--ray-address",
         help="join this Ray cluster (--ray; default: start a local one)")),
    )  # fmt: skip
    for name, kind, option in ray_options:
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
        )
    return params


def register(app: typer.Typer) -> None:
    def serve(**given: Any) -> None:
        """Serve every model and version in the repository (default: the embedded model)."""
        from pydantic import ValidationError

        from kanmoe.service.settings import ServeSettings

        use_ray, replicas = given.pop("ray"), given.pop("replicas")
        replica_cpus, ray_address = given.pop("replica_cpus"), given.pop("ray_address")
        values = {k: v for k, v in given.items() if v is not None}
        if isinstance(values.get("cors_origins"), str):
            values["cors_origins"] = [
                o.strip() for o in values["cors_origins"].split(",") if o.strip()
            ]
        try:
            settings = ServeSettings(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            typer.echo(f"error: --{field.replace('_', '-')}: {first['msg']}", err=True)
            sys.exit(2)
        if not settings.repository.is_dir():
            typer.echo(f"error: --repository {settings.repository} is not a directory", err=True)
            sys.exit(2)
        if use_ray:
            from kanmoe.errors import KanmoeError

            try:
                from kanmoe.service.ray_app import run as run_ray

                run_ray(settings, replicas, num_cpus=replica_cpus, address=ray_address)
            except KanmoeError as exc:
                typer.echo(f"error: {exc}", err=True)
                sys.exit(2)
            return
        from kanmoe.service.server import serve as run_server

        run_server(settings)

    serve.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]
    app.command(name="serve")(serve)
