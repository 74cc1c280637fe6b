"""Run the service under uvicorn (uvloop + httptools) and drain cleanly on SIGTERM.

On SIGTERM/SIGINT the service first marks itself draining (readiness turns 503 and any new
request gets 503), then uvicorn stops accepting connections and waits for in-flight
requests; the lifespan shutdown closes each batcher after its queue is empty. Exit code 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from kanmoe.service.app import create_app
from kanmoe.service.settings import ServeSettings

log = logging.getLogger("kanmoe.service")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the service told to refuse new work before uvicorn stops."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self._service = getattr(app, "state_service", None)
        if self._service is not None:
            connections = self.server_state.connections
            self._service.connections = lambda: len(connections)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._service is not None and not self._service.draining:
            self._service.draining = True
            log.info("signal %s: draining in-flight requests, then exiting", sig)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's handlers, minus its re-raise of the signal after shutdown: a drained
        SIGTERM is a clean exit (status 0), which is what orchestrators expect."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def settings_to_env(settings: ServeSettings) -> None:
    """Export the settings as ``KANMOE_*`` so worker processes rebuild the same ones."""
    for name, value in settings.model_dump().items():
        if value is None:
            os.environ.pop(f"KANMOE_{name.upper()}", None)
        elif isinstance(value, list):
            os.environ[f"KANMOE_{name.upper()}"] = ",".join(map(str, value))
        else:
            os.environ[f"KANMOE_{name.upper()}"] = str(value)


def serve(settings: ServeSettings) -> None:
    """Serve forever (until SIGTERM / SIGINT)."""
    _configure_logging(settings.log_level)
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "auto",
        "http": "auto",
        "log_level": settings.log_level,
        "access_log": False,
        "timeout_graceful_shutdown": settings.drain_timeout_s,
        "lifespan": "on",
        "timeout_keep_alive": 5,
        # No X-Forwarded-* rewriting: it costs a middleware hop per request and the service
        # uses no client address; put a proxy's own access log in front if you need one.
        "proxy_headers": False,
    }
    if settings.workers > 1:
        settings_to_env(settings)
        uvicorn.run(
            "kanmoe.service.app:create_app", factory=True, workers=settings.workers, **common
        )
        return
    app = create_app(settings)
    server = DrainingServer(uvicorn.Config(app, **common), app)
    server.run()
    if not server.started:  # e.g. the port is taken: uvicorn logged why
        raise SystemExit(1)
