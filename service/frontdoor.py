"""The ASGI front door: request ids, bearer auth, body limits, request metrics, access log,
and the two hot routes (v1 predict, v2 infer) answered without FastAPI's per-request work.

Profiling a FastAPI route that only reads the body and returns bytes showed most of a
one-row request's time in routing, dependency solving and Response objects; the hot routes
here parse the path with one regex, read the body, call the same :class:`Service` methods
the FastAPI routes call, and send the bytes. Everything else goes to FastAPI unchanged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from typing import Any

import orjson

from kanmoe.service.deadlines import DeadlineSweeper
from kanmoe.service.handlers import Reply, Service, error_body
from kanmoe.service.settings import ServeSettings

access_log = logging.getLogger("kanmoe.access")
log = logging.getLogger("kanmoe.service")

HOT_ROUTE = re.compile(r"^/(v1|v2)/models/([^/]+)(?:/versions/([^/]+))?/(predict|infer)$")
MODEL_ROUTE = re.compile(r"^/v[12]/(?:models|repository/models)/([^/]+)")
# The request headers any handler reads (uvicorn gives them lower-cased, as bytes).
READ_HEADERS = {
    k.encode(): k
    for k in (
        "content-length",
        "content-type",
        "content-encoding",
        "accept-encoding",
        "inference-header-content-length",
    )
}
OPEN_PATHS = ("/v2/health/", "/metrics", "/docs", "/redoc", "/openapi.json")


def _route_label(path: str) -> str:
    """A bounded route name for the request metric (never the raw path)."""
    if path.startswith("/v2/health/"):
        return "health"
    if path == "/metrics":
        return "metrics"
    if path.startswith("/v2/repository"):
        return "repository"
    if path.startswith(("/v1/models", "/v2/models", "/v2")):
        return "metadata"
    return "other"


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class FrontDoor:
    def __init__(self, app: Any, service: Service, settings: ServeSettings, metrics: Any) -> None:
        self.app = app
        self.service = service
        self.deadlines = DeadlineSweeper()
        self.settings = settings
        self.metrics = metrics
        self.token = (
            f"Bearer {settings.api_token}".encode() if settings.api_token is not None else None
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers: dict[str, str] = {}
        auth = b""
        request_id = ""
        for key, value in scope["headers"]:
            name = READ_HEADERS.get(key)
            if name is not None:
                headers[name] = value.decode("latin-1")
            elif key == b"authorization":
                auth = value
            elif key == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
        request_id = request_id or os.urandom(8).hex()
        path: str = scope["path"]
        method: str = scope["method"]

        needs_token = self.token is not None and not path.startswith(OPEN_PATHS)
        if needs_token and method != "OPTIONS" and not hmac.compare_digest(auth, self.token):
            reply = Reply(
                401,
                error_body("missing or wrong bearer token"),
                {"content-type": "application/json", "www-authenticate": "Bearer"},
            )
            await self._send(send, reply, request_id)
            self._record(method, path, reply.status, start, request_id, "", "auth")
            return

        match = HOT_ROUTE.match(path) if method == "POST" else None
        if match is not None and (match[1] == "v1") == (match[4] == "predict"):
            await self._hot(scope, receive, send, match, headers, request_id, start)
            return

        status_box = [500]

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        await self.app(scope, receive, send_with_id)
        model = MODEL_ROUTE.match(path)
        self._record(
            method,
            path,
            status_box[0],
            start,
            request_id,
            model[1] if model and status_box[0] != 404 else "",
            _route_label(path),
        )

    async def _hot(self, scope, receive, send, match, headers, request_id, start) -> None:
        version_label, name, version, _ = match.groups()
        # One deadline bounds the whole request: a body that trickles in (slow loris) gets
        # 408, a result that does not come in time 503.
        key, deadline = self.deadlines.start(self.settings.request_timeout_s)
        reading = True
        try:
            body = await self._read_body(receive, headers)
            reading = False
            if version_label == "v1":
                reply = await self.service.v1_predict(
                    name, version, body, headers.get("content-type")
                )
            else:
                reply = await self.service.v2_infer(name, version, body, headers)
        except BodyTooLarge:
            reply = Reply(
                413,
                error_body(
                    f"request body larger than {self.settings.max_body_bytes} bytes "
                    "(KANMOE_MAX_BODY_BYTES)"
                ),
                {"content-type": "application/json"},
            )
        except ClientGone:
            return
        except asyncio.CancelledError:
            if not self.deadlines.absorb(deadline):
                raise
            reply = self._timed_out(name, reading)
        except Exception:  # a bug or a runtime failure: logged, answered, never a crash
            log.exception("request %s to %s failed", request_id, scope["path"])
            reply = Reply(
                500,
                error_body(f"internal error (request id {request_id}); see the server log"),
                {"content-type": "application/json"},
            )
        finally:
            self.deadlines.finish(key)
        await self._send(send, reply, request_id)
        route = "v1_predict" if version_label == "v1" else "v2_infer"
        self._record(
            "POST",
            scope["path"],
            reply.status,
            start,
            request_id,
            reply.model if reply.status != 404 else "",
            route,
        )

    def _timed_out(self, name: str, reading: bool) -> Reply:
        timeout = self.settings.request_timeout_s
        if reading:
            return Reply(
                408,
                error_body(f"request body not received within {timeout} s"),
                {"content-type": "application/json", "connection": "close"},
            )
        self.service.reject(name, "timeout")
        return Reply(
            503,
            error_body(f"no result within {timeout} s; the server is overloaded"),
            {"content-type": "application/json", "retry-after": "1"},
            name,
        )

    async def _read_body(self, receive: Any, headers: dict[str, str]) -> bytes:
        limit = self.settings.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BodyTooLarge
        message = await receive()  # a small body has fully arrived with its headers
        if message["type"] == "http.disconnect":
            raise ClientGone
        first = message.get("body", b"")
        if len(first) > limit:
            raise BodyTooLarge
        if not message.get("more_body", False):
            return first
        chunks = [first]
        size = len(first)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _send(send: Any, reply: Reply, request_id: str) -> None:
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
        raw.append((b"content-length", str(len(reply.body)).encode()))
        raw.append((b"x-request-id", request_id.encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": raw})
        await send({"type": "http.response.body", "body": reply.body})

    def _record(
        self,
        method: str,
        path: str,
        status: int,
        start: float,
        request_id: str,
        model: str,
        route: str,
    ) -> None:
        seconds = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.observe_request(model, route, status, seconds)
        if self.settings.access_log:
            access_log.info(
                orjson.dumps(
                    {
                        "ts": time.time(),
                        "request_id": request_id,
                        "method": method,
                        "path": path,
                        "status": status,
                        "ms": round(seconds * 1000, 3),
                        "model": model,
                    }
                ).decode()
            )
