"""``kanmoe serve`` as a Ray Serve application: N replicas of the same ASGI app.

Each replica builds the app with :func:`kanmoe.service.app.create_app` inside its own Ray
actor (``serve.ingress`` with a builder function, evaluated on the replica), so every
replica has its own model store, ONNX Runtime session and micro-batcher, and Ray's proxy
spreads HTTP requests over them. The settings reach the replicas as ``KANMOE_*``
environment variables in the actor's ``runtime_env``, which Ray ships to any node, so the
same application runs on a laptop or a multi-node cluster.

Every response carries ``x-kanmoe-replica: HOST:PID``, which says which replica answered.

Run it with ``serve run kanmoe.service.ray_app:build num_replicas=2`` (any
:class:`~kanmoe.service.settings.ServeSettings` field is also an argument, e.g.
``repository=/models``), or from Python with :func:`run`. Ray is an optional extra
(``pip install 'kanmoe[ray]'``): nothing else in ``kanmoe.service`` imports this module.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from kanmoe.errors import KanmoeError
from kanmoe.service.settings import ServeSettings

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise KanmoeError(
        "Ray Serve is not installed: pip install 'kanmoe[ray]' (or 'ray[serve]>=2.40')"
    ) from exc

DEPLOYMENT_NAME = "kanmoe"
REPLICA_HEADER = b"x-kanmoe-replica"
# Arguments of `build` that configure Ray itself rather than the service.
RAY_ARGS = ("num_replicas", "num_cpus", "num_gpus", "max_ongoing_requests")


def settings_env(settings: ServeSettings) -> dict[str, str]:
    """``KANMOE_*`` variables that make ``ServeSettings()`` in a replica equal ``settings``.

    The repository becomes absolute (replicas do not share the driver's working directory)
    and ``workers`` is 1: Ray's replicas replace uvicorn's worker processes.
    """
    values = settings.model_dump()
    values["repository"] = str(Path(values["repository"]).resolve())
    values["workers"] = 1
    env = {}
    for name, value in values.items():
        if value is None:
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        env[f"KANMOE_{name.upper()}"] = text
    return env


class ReplicaHeader:
    """ASGI wrapper adding ``x-kanmoe-replica: HOST:PID`` to every HTTP response."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.value = f"{socket.gethostname()}:{os.getpid()}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (REPLICA_HEADER, self.value)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


def build_replica_app() -> Any:
    """The ASGI app of one replica (runs inside the replica's actor, reads ``KANMOE_*``)."""
    from kanmoe.service.app import create_app

    return ReplicaHeader(create_app(ServeSettings()))


def deployment(
    settings: ServeSettings,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_ongoing_requests: int = 256,
) -> Any:
    """The bound Ray Serve application: ``num_replicas`` copies of the kanmoe app.

    ``num_cpus``/``num_gpus`` are Ray resources per replica (fractions let several replicas
    share a core or a GPU); ``max_ongoing_requests`` bounds what the proxy sends one replica
    at once (the replica's own queue limit still answers 429 past ``max_queue_rows``).
    """
    if num_replicas < 1:
        raise KanmoeError(f"num_replicas must be at least 1, got {num_replicas}")
    if not settings.repository.is_dir():
        raise KanmoeError(f"repository {settings.repository} is not a directory")
    ingress = serve.ingress(build_replica_app)()
    options = serve.deployment(
        name=DEPLOYMENT_NAME,
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "runtime_env": {"env_vars": settings_env(settings)},
        },
    )
    return options(ingress).bind()


def build(args: dict[str, str]) -> Any:
    """Application builder for ``serve run kanmoe.service.ray_app:build key=value ...``.

    Keys are ``num_replicas``, ``num_cpus``, ``num_gpus``, ``max_ongoing_requests`` and any
    ``ServeSettings`` field; ``KANMOE_*`` variables of the driver fill the rest.
    """
    args = dict(args)
    ray_opts: dict[str, Any] = {}
    for key, cast in zip(RAY_ARGS, (int, float, float, int), strict=True):
        if key in args:
            ray_opts[key] = cast(args.pop(key))
    unknown = sorted(set(args) - set(ServeSettings.model_fields))
    if unknown:
        raise KanmoeError(f"unknown argument(s) {', '.join(unknown)} for kanmoe's Ray app")
    return deployment(ServeSettings(**args), **ray_opts)


def run(
    settings: ServeSettings,
    num_replicas: int = 2,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    address: str | None = None,
    blocking: bool = True,
) -> None:
    """Start (or join, with ``address``) a Ray cluster and serve on ``settings.host:port``.

    With ``blocking`` it serves until SIGINT/SIGTERM, then deletes the application and
    stops Serve (and the local cluster, when it started one).
    """
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = deployment(settings, num_replicas=num_replicas, num_cpus=num_cpus, num_gpus=num_gpus)
    serve.run(app, name=DEPLOYMENT_NAME, route_prefix="/")
    if not blocking:
        return

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        if started_ray:
            ray.shutdown()


def __getattr__(name: str) -> Any:
    # `serve run kanmoe.service.ray_app:app` serves the defaults (KANMOE_* from the driver)
    # without building anything at import time.
    if name == "app":
        return build({})
    raise AttributeError(name)
